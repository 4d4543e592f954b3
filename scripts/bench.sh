#!/usr/bin/env bash
# bench.sh: runs the benchmarks in scripts/bench.d (`make bench`).
#
#   scripts/bench.sh            every scripts/bench.d/NN-name.sh, in order
#   scripts/bench.sh health aw  only those whose file name contains a word
#
# Starts the local servers, exports their URLs and the development secrets
# (as `make up` would), then runs each benchmark as its own process. A
# benchmark prints its result lines (our figure, the anchor's figure from the
# same run, the ratio and the bar) on stdout and progress on stderr, and
# exits non-zero when it fails or misses its bar. The summary repeats every
# result line; the exit status is non-zero when any benchmark failed.
#
# Adding one: scripts/bench.d/NN-name.sh, executable, sourcing
# scripts/bench.d/lib.sh for wait_http, wrk_rps, ratio, bench_spawn...;
# ports 18800-18999 are free for benchmarks. Each prints, beside
# throughput, CPU time per request of our process and of the anchor's
# (lib.sh: wrk_measure, proc_ticks, cpu_run), as medians of interleaved
# rounds (median): that figure holds on a busy machine, where a ratio of
# throughputs moves with the load generator's share of the cores.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
export BINDIR=${BINDIR:-bin}
export BENCH_ROOT=$ROOT BENCH_VAR=$ROOT/var/bench

log() { printf 'bench: %s\n' "$*" >&2; }

# True when benchmark file $1 is selected by the words in the rest.
selected() {
    local f=${1##*/} w
    shift
    (($# == 0)) && return 0
    for w in "$@"; do
        [[ $f == *"$w"* ]] && return 0
    done
    return 1
}

setup_env() {
    # `flock /tmp/bench.lock scripts/bench.sh` passes the lock on as a
    # descriptor (3): servers started here outlive the benchmark and would
    # hold the lock for good, so they start with none of ours above 2.
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            ((fd > 2)) && exec {fd}>&-
        done
        exec scripts/servers.sh start all >/dev/null
    )
    eval "$(scripts/stack.sh env)"
    # The gateway would register a proxied service for each of these.
    unset AE_GATEWAY_URL AE_REALTIME_URL AE_RUNTIME_URL AE_EVENT_PROCESSOR_URL AE_ACTION_WORKERS_URL
}

main() {
    local f rc out name
    local -a results=() failed=()
    mkdir -p "$BENCH_VAR"
    setup_env
    for f in scripts/bench.d/[0-9][0-9]-*.sh; do
        [[ -f $f ]] || continue
        selected "$f" "$@" || continue
        name=${f##*/}
        log "== $name"
        out=$(mktemp)
        rc=0
        bash "$f" | tee "$out" || rc=$?
        [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
        mapfile -t -O "${#results[@]}" results <"$out"
        rm -f "$out"
    done
    echo
    echo "==== benchmarks"
    if ((${#results[@]} > 0)); then printf '  %s\n' "${results[@]}"; fi
    if ((${#failed[@]} > 0)); then
        echo "failed or below the bar: ${failed[*]}"
        exit 1
    fi
    ((${#results[@]} > 0)) || { log "no benchmark ran"; exit 1; }
}

main "$@"
