#!/usr/bin/env bash
# Benchmark: realtime /ws (issue 12), with the C load client
# tests/integration/drivers/rtload.c.
#
# 1. Memory: 15,000 authenticated connections, each subscribed to one topic,
#    to one realtime process (load clients in 2 processes, source addresses
#    127.0.0.2-5); RSS growth / connections. Anchor, same run: the same
#    15,000 connections to wsapp_demo, the bare wsapp/libwebsockets server
#    with no messaging state. Bar: <= 8 KiB per connection.
# 2. 50,000 connections across 4 realtime processes sharing the port
#    (SO_REUSEPORT) and Redis; one broadcast must reach all 50,000.
# 3. Fan-out: one publisher (its own load process) to a topic with 10,000
#    subscribers (2 load processes) for 5 s at each of BENCH_RT_RATES
#    (52 60) messages/s: deliveries/s and publish-to-receive p99 (bars
#    >= 500,000/s and <= 50 ms, read together at BENCH_RT_BAR_RATE, 52: the
#    lowest rate whose measured deliveries/s pass 500,000; 60 is the
#    saturated rate), with the CPU
#    per delivery of realtime and of the load clients, medians of
#    BENCH_RT_ROUNDS (3) interleaved rounds of one realtime process and of
#    two sharing the port through Redis (BENCH_RT_PROCS, "1 2"). Centrifugo's
#    published figure for comparison: ~500k deliveries/s on 40 CPUs, p99
#    200 ms, ~30 KB per connection (its million-connection test).
#
# Environment: BINDIR, O (build), DATABASE_URL and REDIS_URL (scripts/bench.sh),
# BENCH_RT_RATES ("52 60"), BENCH_RT_BAR_RATE (52), BENCH_RT_PROCS ("1 2"), BENCH_RT_ROUNDS (3),
# BENCH_RT_SUBS (10000: fewer for a smoke run), BENCH_RT_PARTS (all; or a comma list of mem,50k,fanout);
# BENCH_RT_TRACE=1: each broadcast's fastest and slowest delivery in $WORK/trace-*.txt (rtload -L);
# BENCH_RT_PERF=1: perf record -g of the first realtime process over the traffic (all: of the
# machine; syscalls: counts of each system call of realtime and of the load clients).
# BENCH_RT_LOAD: the rtload binary to use (default $O/tests/drivers/rtload), so an A/B
# comparison runs another build's load client beside BINDIR's realtime.
set -euo pipefail

# The kernel shares CPU time between sessions (autogroup) before nice
# counts, so other sessions' niced builds and fuzzers take as much as this
# one: under the bench lock this benchmark runs in a session of its own at
# autogroup nice -10 when it may, and its result lines say which.
if [[ -z ${BENCH_RT_SESSION:-} && -w /proc/self/autogroup ]] && command -v setsid >/dev/null; then
    BENCH_RT_SESSION=1 exec setsid -w bash "$0" "$@"
fi
if (echo -10 >/proc/self/autogroup) 2>/dev/null; then AUTOGROUP="autogroup nice -10"; else AUTOGROUP="autogroup as found"; fi

# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init realtime
LOAD=${BENCH_RT_LOAD:-$ROOT/$O/tests/drivers/rtload}
DEMO=$ROOT/$O/tests/drivers/wsapp_demo
PORT=18860
SECRET=bench-realtime-secret-0123456789abcdef
PARTS=${BENCH_RT_PARTS:-mem,50k,fanout}
FAILED=0

bench_drivers rtload wsapp_demo

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

start_rt() { # start_rt NAME [VAR=VALUE...]: one realtime on $PORT
    local name=$1
    shift
    # DATABASE_URL: every handshake checks its user's token state (sign-out
    # everywhere); the load's users have no row, each read once.
    bench_spawn "$name" "$WORK/$name.log" env PORT=$PORT HOST=127.0.0.1 JWT_SECRET=$SECRET MAX_CONNECTIONS=19000 \
        DATABASE_URL="${DATABASE_URL:?DATABASE_URL is needed (scripts/bench.sh sets it)}" \
        RATE_LIMIT_ENABLED=false LOG_LEVEL=warn HEARTBEAT_INTERVAL=30s CLIENT_TIMEOUT=120s "$@" "$BINDIR/realtime"
    wait_http "http://127.0.0.1:$PORT/info" 30 200 "$BENCH_LAST_PID"
}

stop_all() {
    bench_cleanup
    BENCH_PIDS=()
    wait_port_free $PORT 70
}

# load NAME N BASE SRCS [rtload options...]: a load process in the background
load() {
    local name=$1 n=$2 base=$3 srcs=$4
    shift 4
    rm -f "$WORK/$name.ready" "$WORK/$name.ready.go" "$WORK/$name.out"
    bench_spawn "$name" "$WORK/$name.out" "$LOAD" -p $PORT -n "$n" -b "$base" -s "$srcs" -k $SECRET \
        -R "$WORK/$name.ready" "$@"
}

wait_ready() { # wait_ready NAME...: every load process wrote its ready file
    local deadline=$((SECONDS + 240)) n
    for n in "$@"; do
        while [[ ! -s $WORK/$n.ready ]]; do
            ((SECONDS < deadline)) || { bench_log "$n never got ready"; return 1; }
            sleep 0.5
        done
    done
}

go() { local n; for n in "$@"; do touch "$WORK/$n.ready.go"; done; }

wait_done() { # waits for the load processes (their output is the JSON line)
    local deadline=$((SECONDS + 120)) n
    for n in "$@"; do
        while ! grep -q '^{' "$WORK/$n.out" 2>/dev/null; do
            ((SECONDS < deadline)) || { bench_log "$n did not finish"; return 1; }
            sleep 0.2
        done
    done
}

field() { grep '^{' "$WORK/$1.out" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"; }

# ---------------------------------------------------------------- 1. memory
mem_run() { # mem_run KIND: prints bytes per connection of 15,000
    local kind=$1 pid before after conns
    if [[ $kind == realtime ]]; then
        start_rt rt-mem
        pid=$BENCH_LAST_PID
    else
        bench_spawn demo "$WORK/demo.log" "$DEMO" $PORT
        pid=$BENCH_LAST_PID
        sleep 0.5
    fi
    sleep 1
    before=$(rss_kb "$pid")
    if [[ $kind == realtime ]]; then
        load m1 7500 0 127.0.0.2,127.0.0.3 -w 1
        load m2 7500 7500 127.0.0.4,127.0.0.5 -w 1
    else
        load m1 7500 0 127.0.0.2,127.0.0.3 -w 1 -S -u "/echo?key=ok&t="
        load m2 7500 7500 127.0.0.4,127.0.0.5 -w 1 -S -u "/echo?key=ok&t="
    fi
    wait_ready m1 m2
    sleep 2
    after=$(rss_kb "$pid")
    conns=$(($(awk '{ print $2 }' "$WORK/m1.ready") + $(awk '{ print $2 }' "$WORK/m2.ready")))
    bench_log "$kind: RSS ${before} KiB -> ${after} KiB with $conns connections"
    go m1 m2
    wait_done m1 m2 || true
    stop_all
    if ((conns < 15000)); then
        bench_log "$kind: only $conns of 15000 connections were ready"
        echo 0
        return
    fi
    echo $(((after - before) * 1024 / conns))
}

if [[ $PARTS == *mem* ]]; then
    ours=$(mem_run realtime)
    anchor=$(mem_run demo)
    bar_ok=ok
    if ((ours == 0 || ours > 8192)); then bar_ok=MISSED; FAILED=1; fi
    echo "realtime memory per idle subscribed connection (15000): ours ${ours} B, bare wsapp/lws ${anchor} B," \
        "ratio $(ratio "$ours" "$anchor"), bar <= 8192 B: $bar_ok (Centrifugo published ~30 KB)"
fi

# ---------------------------------------------------------------- 2. 50,000
if [[ $PARTS == *50k* ]]; then
    for i in 1 2 3 4; do
        start_rt "rt50-$i" REUSE_PORT=1 REDIS_URL="${REDIS_URL:?REDIS_URL is needed}" PRESENCE_TTL=30s
    done
    sleep 1
    base=0
    for i in 1 2 3 4; do
        load "l$i" 12500 $base "127.0.0.$((2 * i)),127.0.0.$((2 * i + 1))" -t everyone -e 1 -w 60
        base=$((base + 12500))
    done
    wait_ready l1 l2 l3 l4
    ready=0
    for i in 1 2 3 4; do ready=$((ready + $(awk '{ print $2 }' "$WORK/l$i.ready"))); done
    bench_log "50k: $ready connections subscribed across 4 processes"
    go l1 l2 l3 l4
    sleep 1
    load pub 0 900000 127.0.0.20 -t everyone -P 1 -r 1 -d 0 -w 1
    go pub
    wait_done l1 l2 l3 l4 || true
    got=0 maxms=0
    for i in 1 2 3 4; do
        got=$((got + $(field "l$i" conns_with_all)))
        m=$(field "l$i" max_ms)
        maxms=$(awk -v a="$m" -v b="$maxms" 'BEGIN { print (a > b ? a : b) }')
    done
    ok=ok
    ((ready >= 50000 && got >= 50000)) || { ok=MISSED; FAILED=1; }
    echo "realtime 50000 connections over 4 processes (SO_REUSEPORT + Redis): $ready subscribed," \
        "one broadcast reached $got in ${maxms} ms: $ok"
    stop_all
fi

# ---------------------------------------------------------------- 3. fan-out
fanout_run() { # fanout_run PROCS RATE: one round; sets F_DPS F_P99 F_P50 F_GOT F_SRV_US F_LOAD_US F_STEAL
    local procs=$1 rate=$2 n=$(($2 * 5)) i p t0 t1 st0 rx tag="$1p-$2"
    local -a pids=() trace=() perfpids=()
    for ((i = 1; i <= procs; i++)); do
        if ((procs > 1)); then
            start_rt "rt-fan$i" REUSE_PORT=1 REDIS_URL="${REDIS_URL:?REDIS_URL is needed}"
        else
            start_rt rt-fan1
        fi
        pids+=("$BENCH_LAST_PID")
    done
    # -i 1000: the load reads every socket in rounds a millisecond apart,
    # so one recv takes what came meanwhile (it shares the 2 cores).
    [[ -z ${BENCH_RT_TRACE:-} ]] || trace=(-L "$WORK/trace-$tag-f1.txt")
    load f1 $((SUBS / 2)) 0 127.0.0.2 -t fan -e "$n" -w 10 -i 1000 "${trace[@]}"
    [[ -z ${BENCH_RT_TRACE:-} ]] || trace=(-L "$WORK/trace-$tag-f2.txt")
    load f2 $((SUBS / 2)) $((SUBS / 2)) 127.0.0.3 -t fan -e "$n" -w 10 -i 1000 "${trace[@]}"
    wait_ready f1 f2
    load pub 0 900000 127.0.0.4 -t fan -w 2 -P "$n" -r "$rate"
    wait_ready pub
    if [[ -n ${BENCH_RT_PERF:-} ]]; then
        # A profile over the traffic (not holding the bench lock's fd):
        # 1, perf record -g of the first realtime process; all, of the
        # whole machine (the load clients, and the kernel's share of both
        # sides); syscalls, a count of each system call of realtime and of
        # the load clients (perf stat, cheap enough not to change them).
        case $BENCH_RT_PERF in
        syscalls)
            perf stat -e 'syscalls:sys_enter_*' -p "${pids[0]}" -o "$WORK/syscalls-$tag-realtime.txt" \
                </dev/null >/dev/null 2>&1 9>&- &
            perfpids+=($!)
            perf stat -e 'syscalls:sys_enter_*' -p "$(pgrep -d, -x rtload)" -o "$WORK/syscalls-$tag-load.txt" \
                </dev/null >/dev/null 2>&1 9>&- &
            ;;
        all) perf record -q -g -a -o "$WORK/perf-$tag.data" </dev/null >/dev/null 2>&1 9>&- & ;;
        *) perf record -q -g -p "${pids[0]}" -o "$WORK/perf-$tag.data" </dev/null >/dev/null 2>&1 9>&- & ;;
        esac
        perfpids+=($!)
        sleep 0.3
    fi
    t0=$(proc_ticks "${pids[@]}")
    st0=$(steal_ticks)
    go f1 f2 pub
    wait_done pub f1 f2 || true
    t1=$(proc_ticks "${pids[@]}")
    F_STEAL=$(steal_pct "$st0" "$(steal_ticks)")
    for p in "${perfpids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    read -r F_DPS F_P99 F_P50 F_GOT rx F_LOAD_US <<<"$(python3 - "$WORK/f1.out" "$WORK/f2.out" <<'EOF'
import json, sys
a = [json.loads([l for l in open(f) if l.startswith("{")][0]) for f in sys.argv[1:]]
rx = sum(x["received"] for x in a)
t = (max(x["last_us"] for x in a) - min(x["first_us"] for x in a)) / 1e6
cpu = sum(x["traffic_cpu_us"] for x in a)
print("%d %.1f %.1f %d %d %.2f" % (rx / t if t > 0 else 0, max(x["p99_ms"] for x in a), max(x["p50_ms"] for x in a),
                                  sum(x["conns_with_all"] for x in a), rx, cpu / rx if rx else 0))
EOF
)"
    F_SRV_US=$(awk -v t="$((t1 - t0))" -v n="$rx" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", n ? t * 1e6 / hz / n : 0 }')
    stop_all
    bench_log "fan-out round, $procs process(es) at $rate msg/s: $F_DPS deliveries/s, p50 $F_P50 ms, p99 $F_P99 ms," \
        "$F_GOT of $SUBS got all $n; CPU per delivery: realtime $F_SRV_US us, load clients $F_LOAD_US us" \
        "(load average $(cut -d' ' -f1 /proc/loadavg), steal $F_STEAL%)"
}

if [[ $PARTS == *fanout* ]]; then
    # Interleaved rounds of every rate and process count (one process, and
    # two sharing the port through Redis: SPEC 5a's scale-out path), medians
    # of each.
    # Both bars must hold at one rate (on one process or on two): 52 msg/s
    # (520,000 offered) is the lowest whose measured deliveries/s pass
    # 500,000 (at 50 the last broadcast's sweep, which ends after the
    # publisher stops, takes them to ~490,000). 60 (600,000 offered, the
    # server saturated) is printed beside it.
    rates=${BENCH_RT_RATES:-${BENCH_RT_RATE:-52 60}}
    bar_rate=${BENCH_RT_BAR_RATE:-52}
    bar_met=0
    procs_list=${BENCH_RT_PROCS:-1 2}
    SUBS=${BENCH_RT_SUBS:-10000}
    [[ -z ${BENCH_RT_PERF:-} ]] || bench_need perf
    declare -A DPS P99 GOT SRV LD STEAL
    for ((round = 1; round <= ${BENCH_RT_ROUNDS:-3}; round++)); do
        for rate in $rates; do
            for procs in $procs_list; do
                fanout_run "$procs" "$rate"
                k="$procs,$rate"
                DPS[$k]+=" $F_DPS" P99[$k]+=" $F_P99" GOT[$k]+=" $F_GOT" SRV[$k]+=" $F_SRV_US" LD[$k]+=" $F_LOAD_US" STEAL[$k]+=" $F_STEAL"
            done
        done
    done
    load_avg=$(cut -d' ' -f1-3 /proc/loadavg)
    for rate in $rates; do
        for procs in $procs_list; do
            k="$procs,$rate"
            # shellcheck disable=SC2086
            dps=$(median ${DPS[$k]}) p99=$(median ${P99[$k]}) got=$(median ${GOT[$k]})
            # shellcheck disable=SC2086
            srv=$(median ${SRV[$k]}) ld=$(median ${LD[$k]})
            ok=ok
            if ! awk -v d="$dps" -v p="$p99" 'BEGIN { exit !(d >= 500000 && p <= 50) }'; then ok=MISSED; fi
            if [[ $ok == ok && $rate == "$bar_rate" ]]; then bar_met=1; fi
            note=""
            [[ $rate != "$bar_rate" ]] || note=" (the bar's rate: the lowest delivering 500000/s)"
            what="one process"
            ((procs == 1)) || what="$procs processes (SO_REUSEPORT + Redis)"
            echo "realtime fan-out 1 publisher -> $SUBS subscribers at $rate msg/s$note, $what: ${dps%.*} deliveries/s," \
                "p99 ${p99} ms (median of ${BENCH_RT_ROUNDS:-3}; rounds:${DPS[$k]} /s,${P99[$k]} ms; $got of $SUBS got all)," \
                "CPU per delivery realtime ${srv} us + load clients ${ld} us; bars >= 500000/s and <= 50 ms: $ok" \
                "(load average $load_avg, steal per round${STEAL[$k]} %, $AUTOGROUP; Centrifugo published ~500k/s on 40 CPUs, p99 200 ms)"
        done
    done
    if [[ " $rates " == *" $bar_rate "* ]] && ((!bar_met)); then FAILED=1; fi
fi

exit $FAILED
