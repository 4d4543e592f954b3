# shellcheck shell=bash disable=SC2034
# lib.sh: helpers shared by the benchmarks in scripts/bench.d (sourced, not
# run). Only function definitions and a few defaults: sourcing it changes no
# option, trap or directory of the caller (bench_init does, when called).
#
#   bench_init NAME                             a benchmark's preamble: cd to the tree's root (ROOT),
#                                               BINDIR (bin) made absolute, O (build) defaulted,
#                                               WORK=$BENCH_VAR/NAME created, bench_cleanup on EXIT;
#                                               NAME prefixes bench_built's message
#   bench_session NAME "$@"                     the calling script again (exec) in a session of its
#                                               own, once, then at autogroup nice -10 when it may;
#                                               AUTOGROUP says which ("autogroup nice -10" or
#                                               "autogroup as found"). Call it before bench_init.
#   bench_env                                   var/env's settings, when `make up` wrote one
#   bench_servers VAR...                        scripts/servers.sh's URLs (DATABASE_URL, REDIS_URL,
#                                               AMQP_URL) unless every VAR is set already
#   bench_built PROG...                         fails "NAME: build first (make)" unless each
#                                               $BINDIR/PROG is built
#   bench_drivers DRIVER...                     makes $O/tests/drivers/DRIVER... (a no-op when
#                                               they are up to date)
#   free_port                                   a free local TCP port (below the ephemeral range)
#   wait_http URL [TIMEOUT_S=30] [STATUS=200] [PID]
#                                               wait until URL answers STATUS; gives up
#                                               early when process PID exits
#   wrk_rps URL [DURATION=10s] [CONNS=64] [THREADS=2]
#                                               requests/s (integer) on stdout; fails on
#                                               non-2xx answers or when wrk fails
#   wrk_measure URL DURATION CONNS THREADS PID...
#                                               one wrk run: sets M_RPS (requests/s), M_REQS
#                                               (requests), M_US (CPU us per request of PID...
#                                               and their descendants over the run: proc_ticks)
#                                               and M_WRK_US (wrk's own CPU us per request);
#                                               fails like wrk_rps
#   proc_ticks PID...                           CPU (clock ticks) of the processes and all their
#                                               descendants, threads and reaped children included
#   cpu_run VAR CMD...                          runs CMD; VAR gets its CPU seconds (user+sys,
#                                               children included)
#   ticks_us TICKS N                            microseconds per item: TICKS clock ticks / N
#   median X...                                 the median of the numbers (mean of the middle two)
#   listener_pid PORT                           the pid of the process listening on local TCP PORT
#   bench_need TOOL...                          fails with one line naming each tool's package
#   nginx_start NAME DIR WORKERS SERVER         an nginx sink serving the server block SERVER
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

bench_init() {
    BENCH_NAME=$1
    ROOT=$BENCH_ROOT
    cd "$ROOT" || exit 1
    BINDIR=${BINDIR:-bin}
    [[ $BINDIR == /* ]] || BINDIR=$ROOT/$BINDIR
    # O stays as given: make's targets are spelled with it ($O/tests/drivers/x).
    O=${O:-build}
    WORK=$BENCH_VAR/$1
    mkdir -p "$WORK"
    trap bench_cleanup EXIT
}

# The kernel shares CPU time between sessions (autogroup) before nice
# counts, so other sessions' niced builds and fuzzers take as much as a
# benchmark does: under the bench lock a benchmark may run in a session of
# its own at autogroup nice -10, both sides of each ratio alike. The
# variable BENCH_SESSION_<NAME> marks the second run (exported by the exec).
bench_session() {
    local var=BENCH_SESSION_${1^^}
    shift
    var=${var//[^A-Z0-9_]/_}
    if [[ -z ${!var:-} && -w /proc/self/autogroup ]] && command -v setsid >/dev/null; then
        export "$var=1"
        exec setsid -w bash "$0" "$@"
    fi
    if (echo -10 >/proc/self/autogroup) 2>/dev/null; then AUTOGROUP="autogroup nice -10"; else AUTOGROUP="autogroup as found"; fi
}

# Only where a benchmark asks: var/env also names the services `make up`
# started, which scripts/bench.sh leaves out of the environment on purpose.
bench_env() {
    # shellcheck source=/dev/null
    if [[ -f $BENCH_ROOT/var/env ]]; then . "$BENCH_ROOT/var/env"; fi
}

# Run alone (not from scripts/bench.sh): the local servers' URLs.
bench_servers() {
    local v
    for v in "$@"; do
        [[ -n ${!v:-} ]] || { eval "$("$BENCH_ROOT/scripts/servers.sh" env)"; return; }
    done
}

bench_built() {
    local p
    for p in "$@"; do
        [[ -x $BINDIR/$p ]] || { echo "${BENCH_NAME:-bench}: build first (make): $BINDIR/$p is missing" >&2; exit 1; }
    done
}

bench_drivers() {
    local d t=()
    for d in "$@"; do t+=("$O/tests/drivers/$d"); done
    make -C "$BENCH_ROOT" --no-print-directory -s O="$O" "${t[@]}" >&2
}

# The tests' pick (pgtmp.free_port): below the ephemeral range, which the
# load clients' tens of thousands of source ports come from.
free_port() { PYTHONPATH=$BENCH_ROOT/tests/integration /usr/bin/python3 -c 'from pgtmp import free_port; print(free_port())'; }

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

# CPU per request is the figure that does not depend on how fast the load
# generator is: on a 2-core box wrk and the server share the cores, and a
# faster anchor there can make a ratio of throughputs move without our
# process changing (issue 9.6). Process CPU comes from /proc/PID/stat
# (utime + stime, fields 14 and 15, every thread), summed over the process
# tree (nginx's workers are its master's children).
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# CPU ticks of the given processes and everything below them, from one
# read of every /proc/PID/stat (cat, not awk, opens them: a process that
# ends meanwhile is skipped, where mawk would give up on the whole list).
# Each process counts utime + stime + cutime + cstime: the last two hold
# its children that ended and were reaped, so a short-lived child (a
# PostgreSQL backend of one connection) is counted once it is gone, and a
# live one through its own figures. After "pid (comm) " a line holds state,
# ppid, ... utime, stime, cutime, cstime at its 2nd and 12th-15th fields
# (comm may hold spaces and parentheses).
proc_ticks() {
    # cat fails when a process ends meanwhile: not an error here (pipefail).
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v roots=" $* " '{
            pid = $1; s = $0; sub(/^[^(]*\(.*\) /, "", s); split(s, f, " ")
            ppid[pid] = f[2]; ticks[pid] = f[12] + f[13] + f[14] + f[15]
        }
        END {
            n = split(roots, want, " ")
            for (i = 1; i <= n; i++) keep[want[i]] = 1
            do {
                added = 0
                for (p in ppid)
                    if ((ppid[p] in keep) && !(p in keep)) { keep[p] = 1; added = 1 }
            } while (added)
            for (p in keep) total += ticks[p]
            print total + 0
        }'
}

# The machine's stolen and total CPU ticks so far ("steal total", from
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal).
# On a virtual machine the hypervisor may give the vCPUs to others: a
# latency measured while it does is the host's, so benchmarks print the
# stolen share beside their figures (steal_pct).
steal_ticks() { awk '$1 == "cpu" { print $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat; }
# steal_pct "BEFORE" "AFTER": the stolen share of the CPU time between two
# steal_ticks readings, in percent.
steal_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        t = y[2] - x[2]
        if (t <= 0) print "0.0"; else printf "%.1f\n", (y[1] - x[1]) * 100 / t
    }'
}

ticks_us() { awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { if (n == 0) print "0.0"; else printf "%.1f\n", t * 1e6 / hz / n }'; }

cpu_run() {
    local __var=$1 __t __rc=0
    shift
    __t=$(mktemp)
    # bash's `time` keyword: user and system CPU of the command, children included.
    { TIMEFORMAT='%3U %3S'; time "$@"; } 2>"$__t" || __rc=$?
    printf -v "$__var" '%s' "$(awk 'END { printf "%.3f", $(NF-1) + $NF }' "$__t")"
    rm -f "$__t"
    return "$__rc"
}

listener_pid() {
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2
}

median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) print 0; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

wrk_measure() {
    local url=$1 duration=$2 conns=$3 threads=$4 out t0 t1 cpu non2xx
    shift 4
    out=$(mktemp)
    t0=$(proc_ticks "$@")
    if ! cpu_run cpu wrk -t"$threads" -c"$conns" -d"$duration" "$url" >"$out" 2>&1; then
        bench_log "wrk failed on $url:"
        cat "$out" >&2
        rm -f "$out"
        return 1
    fi
    t1=$(proc_ticks "$@")
    M_RPS=$(awk '/^Requests\/sec:/ { printf "%d", $2 }' "$out")
    M_REQS=$(awk '/requests in/ { print $1; exit }' "$out")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$out")
    if [[ -z $M_RPS || -z $M_REQS ]] || [[ -n $non2xx && $non2xx != 0 ]]; then
        bench_log "wrk: $url: no count, or non-2xx answers; run is void"
        cat "$out" >&2
        rm -f "$out"
        return 1
    fi
    rm -f "$out"
    M_US=$(ticks_us $((t1 - t0)) "$M_REQS")
    M_WRK_US=$(awk -v c="$cpu" -v n="$M_REQS" 'BEGIN { printf "%.1f\n", n ? c * 1e6 / n : 0 }')
}

# nginx_start NAME DIR WORKERS SERVER: an nginx for a benchmark in DIR
# (its config, pid, logs and temp files there, access log off, keep-alive
# without limit), WORKERS worker processes (1: no master, so its pid is the
# one that works), serving the server-block body SERVER; started with
# bench_spawn (pid in BENCH_LAST_PID).
nginx_start() {
    local name=$1 dir=$2 workers=$3 server=$4 k
    mkdir -p "$dir/tmp"
    {
        echo "# Written by scripts/bench.d for $name."
        ((workers == 1)) && echo "master_process off;"
        echo "daemon off;"
        echo "worker_processes $workers;"
        echo "pid $dir/nginx.pid;"
        echo "error_log $dir/error.log warn;"
        echo "events { worker_connections 4096; }"
        echo "http {"
        echo "    access_log off;"
        echo "    keepalive_requests 1000000;"
        echo "    keepalive_timeout 60s;"
        for k in client_body proxy fastcgi uwsgi scgi; do echo "    ${k}_temp_path $dir/tmp/$k;"; done
        echo "    server {"
        echo "$server"
        echo "    }"
        echo "}"
    } >"$dir/nginx.conf"
    # -e: nginx opens its default error log before reading the config;
    # point it at ours so that /var/log/nginx need not be writable.
    bench_spawn "$name" "$dir/nginx.out" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

# The Debian package of each command the benchmarks run (scripts/deps.sh).
bench_need() {
    local t pkg rc=0
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 && continue
        case $t in
            nginx) pkg=nginx-light ;; psql) pkg=postgresql-client ;; pgbench) pkg=postgresql ;;
            redis-cli) pkg=redis-tools ;; ss) pkg=iproute2 ;; perf) pkg="linux-perf (BENCH_PERF only)" ;;
            *) pkg=$t ;;
        esac
        echo "bench: $t not found: install the Debian package $pkg (scripts/deps.sh does)" >&2
        rc=1
    done
    return "$rc"
}

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
