#!/usr/bin/env bash
# tests/fuzz/run.sh BIN...: runs each libFuzzer target for FUZZ_SECONDS
# (default 10) over its seed corpus tests/fuzz/corpus/<target>/ (read only)
# plus a working corpus under var/fuzz/<target>/ (new inputs go there, so
# the seeds in git stay small). A crash, sanitizer report, leak, timeout
# (FUZZ_TIMEOUT s per input) or out-of-memory stops the target; the input
# is kept under var/fuzz/artifacts/. Prints each target's executions; exits
# non-zero when any target found something. FUZZ_RUNS=N also stops a
# target after N executions (whichever of the two limits comes first);
# FUZZ_ARGS adds libFuzzer flags (-max_len=1024...).
#
#   make fuzz                    # every target, 10 s each
#   make fuzz FUZZ_SECONDS=600   # longer runs
#   nice -n 19 tests/fuzz/run.sh build-fuzz/fuzz/fuzz_url  # one target
#   FUZZ_SECONDS=36000 FUZZ_RUNS=10000000 nice -n 19 make fuzz  # the 10M runs
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
SECS=${FUZZ_SECONDS:-10}
RUNS=${FUZZ_RUNS:-}
TIMEOUT=${FUZZ_TIMEOUT:-10}
ART=$ROOT/var/fuzz/artifacts
failed=()

if (($# == 0)); then
    echo "usage: tests/fuzz/run.sh BIN..." >&2
    exit 2
fi
mkdir -p "$ART"
for bin in "$@"; do
    name=${bin##*/}
    seeds=$ROOT/tests/fuzz/corpus/$name
    work=$ROOT/var/fuzz/$name
    mkdir -p "$work" "$seeds"
    log=$ROOT/var/fuzz/$name.log
    echo "== $name: ${SECS}s"
    rc=0
    args=(-max_total_time="$SECS" -timeout="$TIMEOUT" -rss_limit_mb=2048 -malloc_limit_mb=1024
          -print_final_stats=1 -artifact_prefix="$ART/$name-")
    [[ -z $RUNS ]] || args+=(-runs="$RUNS")
    # shellcheck disable=SC2206 # flags, split on blanks
    args+=(${FUZZ_ARGS:-})
    ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1} \
        "$bin" "${args[@]}" "$work" "$seeds" >"$log" 2>&1 || rc=$?
    execs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | awk '{ s += $2 } END { print s + 0 }')
    if ((rc != 0)); then
        grep -E 'ERROR|SUMMARY|runtime error|Test unit written' "$log" | head -n 20 || true
        echo "FAIL $name: exit $rc after $execs executions (log: ${log#"$ROOT"/})"
        failed+=("$name")
    else
        took=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | awk '{ print $5 }' | tail -n 1)
        echo "ok   $name: $execs executions in ${took:-$SECS}s"
    fi
done
((${#failed[@]} == 0)) || { echo "fuzz: findings in ${failed[*]}"; exit 1; }
