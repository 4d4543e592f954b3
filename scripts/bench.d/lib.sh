# shellcheck shell=bash disable=SC2034
# lib.sh: helpers shared by the benchmarks in scripts/bench.d (sourced, not
# run). Only function definitions and a few defaults: sourcing it changes no
# option, trap or directory of the caller.
#
#   wait_http URL [TIMEOUT_S=30] [STATUS=200] [PID]
#                                               wait until URL answers STATUS; gives up
#                                               early when process PID exits
#   wrk_rps URL [DURATION=10s] [CONNS=64] [THREADS=2]
#                                               requests/s (integer) on stdout; fails on
#                                               non-2xx answers or when wrk fails
#   ratio A B                                   A/B with two decimals
#   max A B                                     the larger integer
#   at_least RATIO BAR                          true when RATIO >= BAR
#   port_free PORT                              true when no socket uses local port PORT
#   wait_port_free PORT [TIMEOUT_S=70]          waits for TIME-WAIT leftovers to clear
#   bench_spawn NAME LOG CMD...                 CMD in the background, remembered for
#                                               bench_cleanup; its pid in BENCH_LAST_PID
#   bench_cleanup                               SIGTERM (then KILL) everything bench_spawn started
#
# Benchmarks print their result lines on stdout and progress on stderr;
# scripts/bench.sh collects the stdout lines into its summary.

BENCH_ROOT=${BENCH_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)}
BENCH_VAR=${BENCH_VAR:-$BENCH_ROOT/var/bench}
BENCH_PIDS=()
BENCH_LAST_PID=""

bench_log() { printf '%s\n' "$*" >&2; }

wait_http() {
    local url=$1 timeout=${2:-30} want=${3:-200} pid=${4:-} code=""
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null || true)
        [[ $code == "$want" ]] && return 0
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            bench_log "wait_http: the process behind $url (pid $pid) exited"
            return 1
        fi
        sleep 0.1
    done
    bench_log "wait_http: $url answered '${code:-nothing}' for ${timeout}s (want $want)"
    return 1
}

wrk_rps() {
    local url=$1 duration=${2:-10s} conns=${3:-64} threads=${4:-2} out rps non2xx errors
    if ! out=$(wrk -t"$threads" -c"$conns" -d"$duration" "$url" 2>&1); then
        bench_log "wrk failed on $url:"
        bench_log "$out"
        return 1
    fi
    rps=$(awk '/^Requests\/sec:/ { printf "%d", $2 }' <<<"$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' <<<"$out")
    errors=$(awk '/Socket errors:/ { print }' <<<"$out")
    if [[ -z $rps ]]; then
        bench_log "wrk printed no Requests/sec for $url:"
        bench_log "$out"
        return 1
    fi
    # A server answering errors fast would look fast: such a run is void.
    if [[ -n $non2xx && $non2xx != 0 ]]; then
        bench_log "wrk: $url gave $non2xx non-2xx answers; run is void"
        bench_log "$out"
        return 1
    fi
    [[ -z $errors ]] || bench_log "wrk: $url: $errors"
    echo "$rps"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "0.00"; else printf "%.2f\n", a / b }'; }

max() { if (($1 >= $2)); then echo "$1"; else echo "$2"; fi; }

at_least() { awk -v r="$1" -v b="$2" 'BEGIN { exit !(r + 0 >= b + 0) }'; }

# Not only "nothing listens": a server that binds without SO_REUSEADDR also
# fails while connections of a previous run sit in TIME-WAIT on the port.
port_free() {
    if command -v ss >/dev/null 2>&1; then
        ! ss -Htan "sport = :$1" 2>/dev/null | grep -q .
    else
        ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

wait_port_free() {
    local port=$1 deadline=$((SECONDS + ${2:-70}))
    until port_free "$port"; do
        if ((SECONDS >= deadline)); then
            bench_log "port $port is still in use:"
            ss -Htanp "sport = :$port" >&2 2>/dev/null || true
            return 1
        fi
        sleep 1
    done
}

bench_spawn() {
    local name=$1 logf=$2
    shift 2
    "$@" </dev/null >>"$logf" 2>&1 &
    BENCH_PIDS+=("$!")
    BENCH_LAST_PID=$!
    bench_log "$name: started (pid $!, log $logf)"
}

bench_cleanup() {
    local pid i alive
    ((${#BENCH_PIDS[@]} > 0)) || return 0
    kill -TERM "${BENCH_PIDS[@]}" 2>/dev/null || true
    # Up to 10 s for a graceful exit, then KILL.
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in "${BENCH_PIDS[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then alive=1; fi
        done
        ((alive)) || break
        sleep 0.1
    done
    kill -KILL "${BENCH_PIDS[@]}" 2>/dev/null || true
    wait "${BENCH_PIDS[@]}" 2>/dev/null || true
    BENCH_PIDS=()
}
