#!/usr/bin/env bash
# run.sh: every test against real servers (`make test`, `.ci/run`).
#
#   O=build BINDIR=bin tests/run.sh
#
# 1. starts the local PostgreSQL, Redis and RabbitMQ (scripts/servers.sh),
#    exports their URLs as TEST_DATABASE_URL, TEST_REDIS_URL and
#    TEST_AMQP_URL (with O and BINDIR), runs $BINDIR/migrate;
# 2. runs each cmocka binary $O/tests/test_*;
# 3. runs each tests/integration/test_*.py with Debian's /usr/bin/python3
#    (python3-psycopg2 and python3-redis live there; a pyenv python earlier
#    in PATH would not have them), one process per file, `-m unittest -v`;
# 4. runs each tests/integration/test_*.sh (exit code 0 = pass);
# 5. runs each libFuzzer target of $FUZZ_BINDIR (make test sets it to
#    build-fuzz/fuzz) for FUZZ_SECONDS (default 10) through tests/fuzz/run.sh;
#    a SANITIZE build leaves FUZZ_BINDIR empty (the targets are built with
#    ASan and UBSan already) and the stage is reported as skipped.
# 6. with VALGRIND_RUN=1 (make test sets it unless SANITIZE: memcheck
#    cannot run ASan programs), scripts/valgrind.sh: the five services
#    under memcheck for one short integration run (about 40 s).
#
# Each suite runs under a timeout, its output is shown live and kept in
# var/test-logs/<O>/<suite>.log, and every process it started (services,
# throwaway PostgreSQL clusters...) is found by an environment mark
# (AE_TEST_RUN) and killed when it ends. The local servers stay up.
#
# Counts are test cases: cmocka's "[  PASSED  ] N test(s)." / "[  FAILED  ]
# N test(s)", unittest's "Ran N tests" and "FAILED (failures=, errors=)".
# A suite that crashes, times out or runs no test counts as a failure; so
# does a missing Python module (unittest reports it as an error). The last
# line is "N passed, N failed"; the exit status is non-zero on any failure
# or when no test ran at all.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
export O=${O:-build}
export BINDIR=${BINDIR:-bin}
PY=/usr/bin/python3
UNIT_TIMEOUT=${UNIT_TIMEOUT:-300}
PY_TIMEOUT=${PY_TIMEOUT:-1500}
SH_TIMEOUT=${SH_TIMEOUT:-900}
LOGDIR=$ROOT/var/test-logs/${O//\//_}

TOTAL_PASSED=0
TOTAL_FAILED=0
SUITE_LINES=()
FAILED_NAMES=()

log() { printf 'run.sh: %s\n' "$*" >&2; }

abspath() { [[ $1 == /* ]] && echo "$1" || echo "$ROOT/$1"; }

# ---------------------------------------------------------------- bookkeeping

# record KIND NAME PASSED FAILED SKIPPED SECONDS NOTE
record() {
    local kind=$1 name=$2 passed=$3 failed=$4 skipped=$5 secs=$6 note=${7:-}
    local verdict=ok line
    ((failed == 0)) || verdict=FAIL
    TOTAL_PASSED=$((TOTAL_PASSED + passed))
    TOTAL_FAILED=$((TOTAL_FAILED + failed))
    line=$(printf '%-4s %-6s %-32s %4d passed, %3d failed' "$verdict" "$kind" "$name" "$passed" "$failed")
    ((skipped == 0)) || line+=", $skipped SKIPPED"
    line+=$(printf '  (%ss)' "$secs")
    [[ -z $note ]] || line+="  $note"
    SUITE_LINES+=("$line")
}

# ---------------------------------------------------------------- processes

# Pids of the processes that carry mark $1 in their environment (inherited
# from the suite, even by daemons that left its process group).
marked_pids() {
    grep -lzx "AE_TEST_RUN=$1" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx "$$" || true
}

kill_marked() {
    local id=$1 name=$2 sig pid i
    local -a pids
    for sig in TERM KILL; do
        mapfile -t pids < <(marked_pids "$id")
        ((${#pids[@]} > 0)) || return 0
        if [[ $sig == TERM ]]; then
            local -a what=()
            for pid in "${pids[@]}"; do what+=("$pid:$(cat "/proc/$pid/comm" 2>/dev/null || echo '?')"); done
            log "$name left ${#pids[@]} process(es) running; stopping them: ${what[*]}"
        fi
        kill -"$sig" "${pids[@]}" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            mapfile -t pids < <(marked_pids "$id")
            ((${#pids[@]} > 0)) || return 0
            sleep 0.1
        done
    done
}

# run_logged NAME TIMEOUT SIGNAL CMD...: runs CMD marked and under a
# timeout, output to $LOGDIR/NAME.log and (live) to ours; sets RC, SECS.
# The output goes to a file rather than through a pipe so that a stray
# process holding the descriptor cannot block us.
RC=0
SECS=0
run_logged() {
    local name=$1 limit=$2 sig=$3 out id pid start
    shift 3
    out=$LOGDIR/$name.log
    id="$$-$RANDOM-$RANDOM"
    start=$SECONDS
    AE_TEST_RUN=$id timeout -k 15 -s "$sig" "$limit" "$@" >"$out" 2>&1 </dev/null &
    pid=$!
    tail -n +1 -s 0.2 -f --pid="$pid" "$out" 2>/dev/null || true
    RC=0
    wait "$pid" || RC=$?
    SECS=$((SECONDS - start))
    kill_marked "$id" "$name"
    if ((RC == 124 || RC == 137)); then
        echo "run.sh: $name timed out after ${limit}s" | tee -a "$out" >&2
    fi
}

# ---------------------------------------------------------------- suites

bootstrap() {
    local start=$SECONDS
    mkdir -p "$LOGDIR"
    rm -f "$LOGDIR"/*.log
    if ! scripts/servers.sh start all; then
        record boot servers 0 1 0 $((SECONDS - start)) "the local servers did not start"
        return 1
    fi
    # The tests get the servers' URLs under their own names (aetest.py reads
    # TEST_DATABASE_URL...). DATABASE_URL, REDIS_URL, AMQP_URL and the
    # secrets are deliberately not exported to them: a test that starts a
    # program with os.environ plus a few variables (DB_PORT=5x, no
    # JWT_SECRET...) must see exactly those, not the shared defaults.
    eval "$(scripts/servers.sh env | sed 's/^export /export TEST_/')"
    # Sanitizer reports with stacks; cmocka's plain-text summary for parsing.
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
    export CMOCKA_MESSAGE_OUTPUT=STDOUT
    export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
    if ! run_migrate; then
        return 1
    fi
}

run_migrate() {
    local bin
    bin=$(abspath "$BINDIR")/migrate
    if [[ ! -x $bin ]]; then
        record boot migrate 0 1 0 0 "$bin is not built"
        return 1
    fi
    run_logged migrate 300 TERM env DATABASE_URL="$TEST_DATABASE_URL" "$bin"
    if ((RC != 0)); then
        record boot migrate 0 1 0 "$SECS" "exit $RC"
        return 1
    fi
}

# Sums the numbers that follow regex $1 at the start of lines of file $2.
sum_matches() {
    { grep -oE "$1 [0-9]+" "$2" 2>/dev/null || true; } | awk '{ s += $NF } END { print s + 0 }'
}

run_unit() {
    local bin=$1 name passed failed note=""
    name=${bin##*/}
    echo "==== unit: $name"
    run_logged "$name" "$UNIT_TIMEOUT" TERM "$bin"
    passed=$(sum_matches '^\[  PASSED  \]' "$LOGDIR/$name.log")
    # A crash cuts the summary short; count the tests that got through.
    if ! grep -qE '^\[==========\] [0-9]+ test\(s\) run' "$LOGDIR/$name.log"; then
        passed=$(grep -cE '^\[       OK \] ' "$LOGDIR/$name.log" || true)
    fi
    failed=$(sum_matches '^\[  FAILED  \]' "$LOGDIR/$name.log")
    if ((RC != 0 && failed == 0)); then
        failed=1
        note="exited with $RC (crash, sanitizer or timeout)"
    elif ((RC == 0 && passed == 0)); then
        failed=1
        note="ran no tests"
    fi
    ((failed == 0)) || collect_unit_failures "$name"
    record unit "$name" "$passed" "$failed" 0 "$SECS" "$note"
}

collect_unit_failures() {
    local t
    while read -r t; do
        FAILED_NAMES+=("$1: $t")
    done < <(grep -E '^\[  FAILED  \] ' "$LOGDIR/$1.log" | grep -vE '^\[  FAILED  \] [0-9]+ test' |
        sed 's/^\[  FAILED  \] //' | sort -u)
}

# Reads "name=N" out of unittest's final "FAILED (failures=1, errors=2)".
py_count() {
    local summary=$1 key=$2
    sed -nE "s/.*[(, ]$key=([0-9]+).*/\1/p" <<<"$summary" | head -n1 | grep . || echo 0
}

run_python() {
    local file=$1 name ran summary failures errors skipped unexpected passed failed note="" t
    name=${file##*/}
    name=${name%.py}
    echo "==== integration: $name"
    run_logged "$name" "$PY_TIMEOUT" ABRT \
        env -C "$ROOT/tests/integration" "$PY" -m unittest -v "$name"
    local out=$LOGDIR/$name.log
    ran=$({ grep -E '^Ran [0-9]+ tests? in ' "$out" || true; } | tail -n1 | awk '{ print $2 }')
    summary=$(grep -E '^(OK|FAILED)( \(.*\))?$' "$out" | tail -n1 || true)
    failures=$(py_count "$summary" failures)
    errors=$(py_count "$summary" errors)
    skipped=$(py_count "$summary" skipped)
    unexpected=$(py_count "$summary" 'unexpected successes')
    if [[ -z $ran || -z $summary ]]; then
        ran=${ran:-0}
        failed=1
        passed=0
        note="crashed or timed out (exit $RC) before unittest's summary"
    else
        failed=$((failures + errors + unexpected))
        passed=$((ran - failed - skipped))
        ((passed >= 0)) || passed=0
        if ((RC != 0 && failed == 0)); then
            failed=1
            note="exited with $RC"
        elif ((ran == 0 && failed == 0)); then
            failed=1
            note="ran no tests"
        fi
    fi
    while read -r t; do
        FAILED_NAMES+=("$name: $t")
    done < <(grep -E '^(FAIL|ERROR|UNEXPECTED SUCCESS): ' "$out" | sort -u)
    record py "$name" "$passed" "$failed" "$skipped" "$SECS" "$note"
}

run_fuzz() {
    local bin=$1 name execs
    name=${bin##*/}
    echo "==== fuzz: $name"
    run_logged "$name" $((${FUZZ_SECONDS:-10} + 120)) TERM tests/fuzz/run.sh "$bin"
    execs=$(sed -nE 's/.* ([0-9]+) executions.*/\1/p' "$LOGDIR/$name.log" | tail -n1)
    if ((RC == 0)); then
        record fuzz "$name" 1 0 0 "$SECS" "${execs:-?} executions"
    else
        FAILED_NAMES+=("$name: finding or crash (exit $RC), see $LOGDIR/$name.log")
        record fuzz "$name" 0 1 0 "$SECS" "exit $RC"
    fi
}

run_shell() {
    local file=$1 name
    name=${file##*/}
    echo "==== integration: $name"
    run_logged "$name" "$SH_TIMEOUT" TERM bash "$file"
    if ((RC == 0)); then
        record sh "$name" 1 0 0 "$SECS"
    else
        FAILED_NAMES+=("$name: exit $RC")
        record sh "$name" 0 1 0 "$SECS" "exit $RC"
    fi
}

run_valgrind() {
    echo "==== valgrind: services"
    run_logged valgrind 900 TERM scripts/valgrind.sh
    if ((RC == 0)); then
        record valgrind services 1 0 0 "$SECS" "five services, 0 errors, 0 lost"
    else
        FAILED_NAMES+=("valgrind: exit $RC, see $LOGDIR/valgrind.log and var/valgrind/")
        record valgrind services 0 1 0 "$SECS" "exit $RC"
    fi
}

# ---------------------------------------------------------------- main

report() {
    echo
    echo "==== results ($O)"
    printf '  %s\n' "${SUITE_LINES[@]}"
    if ((${#FAILED_NAMES[@]} > 0)); then
        echo "failures:"
        printf '  %s\n' "${FAILED_NAMES[@]}"
    fi
    echo "logs: ${LOGDIR#"$ROOT"/}/"
    echo "$TOTAL_PASSED passed, $TOTAL_FAILED failed"
}

main() {
    local f
    [[ -x $PY ]] || log "warning: $PY is missing (scripts/deps.sh installs it)"
    if bootstrap; then
        for f in "$(abspath "$O")"/tests/test_*; do
            if [[ -f $f && -x $f ]]; then run_unit "$f"; fi
        done
        if [[ -n ${FUZZ_BINDIR:-} ]]; then
            for f in "$(abspath "$FUZZ_BINDIR")"/fuzz_*; do
                if [[ -f $f && -x $f ]]; then run_fuzz "$f"; fi
            done
        else
            record fuzz "(every target)" 0 0 1 0 "not run: SANITIZE build (the targets carry ASan+UBSan themselves)"
        fi
        for f in tests/integration/test_*.py; do
            if [[ -f $f ]]; then run_python "$f"; fi
        done
        # test_*.sh only: other scripts there (setup-node.sh...) are helpers
        # that the tests call themselves.
        for f in tests/integration/test_*.sh; do
            if [[ -f $f ]]; then run_shell "$f"; fi
        done
        if [[ -n ${VALGRIND_RUN:-} ]]; then
            run_valgrind
        else
            record valgrind services 0 0 1 0 "not run: SANITIZE build (memcheck cannot run ASan programs)"
        fi
    fi
    report
    if ((TOTAL_FAILED > 0)); then
        exit 1
    fi
    if ((TOTAL_PASSED == 0)); then
        echo "run.sh: no test ran" >&2
        exit 1
    fi
}

main "$@"
