#!/usr/bin/env bash
# Benchmark: BENCH_SSE_CLIENTS (10,000) concurrent SSE streams on one
# api-gateway process, held by the C load client build/tests/drivers/sse_load
# from BENCH_SSE_SOURCES (50) source addresses 127.0.0.2... (200 streams per
# address, under the gateway's per-address limit). All streams follow one
# client id, so one published event (POST /internal/v1/sse/{id}) must reach
# every one of them. Figures: memory per stream (RSS growth of the process
# divided by the streams, measured 2 s after the last one was established)
# and the time from the publish to each stream having the event, over
# BENCH_SSE_EVENTS (20) events 300 ms apart (p99 over every delivery, and the
# p99 over events of the time until the last stream had it).
# Anchor, same run, same load client: a plain Node.js http SSE server
# (scripts/bench.d/sse_anchor.js) holding the streams in memory.
# Bars: <= 8 KiB per stream, publish-to-all p99 <= 100 ms (the gateway with
# its defaults). Delivery times are the kernel's receive timestamps (the
# client's read times and CPU are logged beside them). CPU per delivery is
# the server process's user + system time over the events (lib.sh
# proc_ticks) divided by the deliveries (streams x events). BENCH_SSE_ROUNDS
# (3) interleaved rounds, each server started afresh (RSS growth of a
# process that held streams before would count reused memory as free);
# the figures printed are the medians.
#
# Environment: BINDIR (bin), O (build), REDIS_URL (the local server's),
# BENCH_SSE_CLIENTS, BENCH_SSE_SOURCES, BENCH_SSE_EVENTS, BENCH_SSE_ROUNDS.
set -euo pipefail

# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# A session of its own at autogroup nice -10 when it may (lib.sh), and its
# result line says which. The load client runs as SCHED_BATCH (sse_load.c).
bench_session sse "$@"
bench_init sse
LOAD=$ROOT/$O/tests/drivers/sse_load
GW_PORT=18900
NODE_PORT=18901
CLIENTS=${BENCH_SSE_CLIENTS:-10000}
SOURCES=${BENCH_SSE_SOURCES:-50}
EVENTS=${BENCH_SSE_EVENTS:-20}
ROUNDS=${BENCH_SSE_ROUNDS:-3}
TOKEN=bench-internal-token

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# measure NAME PID PORT: prints "kib_per_stream p99 all_p99 lost p50 cpu_us".
measure() {
    local name=$1 pid=$2 port=$3 before after line result cid t0 t1 us
    cid=bench-$RANDOM$RANDOM
    before=$(rss_kib "$pid")
    coproc LOADP { "$LOAD" 127.0.0.1 "$port" "$cid" "$CLIENTS" "$SOURCES" "$EVENTS" "/internal/v1/sse/$cid" "$TOKEN" 2>&1; }
    local lpid=$LOADP_PID
    if ! read -r -t 180 line <&"${LOADP[0]}" || [[ $line != ready* ]]; then
        bench_log "sse: $name: the load client did not get its streams: $line"
        # A stream cut before its head is most often the header deadline (HTTP_HEADER_TIMEOUT): its request
        # waited behind other streams' connect round trips to Redis on a busy machine.
        bench_log "sse: $name: $(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" | grep '^http_header_timeouts_total' || true)"
        kill "$lpid" 2>/dev/null || true
        return 1
    fi
    sleep 2
    after=$(rss_kib "$pid")
    t0=$(proc_ticks "$pid")
    echo go >&"${LOADP[1]}"
    read -r -t 120 result <&"${LOADP[0]}" || result=""
    t1=$(proc_ticks "$pid")
    # Anything after the result line (SSE_LOAD_PER_EVENT=1: each event's time to the last stream) goes to the log.
    while [[ -n ${LOADP[0]:-} ]] && read -r -t 10 line <&"${LOADP[0]}"; do bench_log "sse: $name: $line"; done
    wait "$lpid" 2>/dev/null || true
    us=$(ticks_us $((t1 - t0)) $((CLIENTS * EVENTS)))
    bench_log "sse: $name: RSS $before -> $after KiB for $CLIENTS streams; $result; server CPU $us us/delivery"
    # latency_ms p50 A p99 B max C all_p99 D lost E
    awk -v b="$before" -v a="$after" -v n="$CLIENTS" -v r="$result" -v us="$us" 'BEGIN {
        split(r, f, " "); printf "%.2f %s %s %s %s %s\n", (a - b) / n, f[5], f[9], f[11], f[3], us }'
}

# One round of NAME: starts it, measures, stops it; the figures in ROUND_OUT.
round() {
    local name=$1 pid out
    ROUND_OUT=
    if [[ $name == node ]]; then
        bench_spawn node "$WORK/node.log" node "$ROOT/scripts/bench.d/sse_anchor.js" $NODE_PORT
        pid=$BENCH_LAST_PID
        wait_http "http://127.0.0.1:$NODE_PORT/" 30 404 "$pid" || return 1
        out=$(measure node "$pid" $NODE_PORT) || out=""
        stop_pid "$pid" $NODE_PORT
    else
        start_gateway
        pid=$BENCH_LAST_PID
        wait_http "http://127.0.0.1:$GW_PORT/health" 30 200 "$pid" || { tail -n 20 "$WORK/api-gateway.log" >&2; return 1; }
        sleep 1
        out=$(measure api-gateway "$pid" $GW_PORT) || out=""
        stop_pid "$pid" $GW_PORT
    fi
    ROUND_OUT=$out
    [[ -n $out ]]
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    wait_port_free "$2"
}

# col N LINE...: the median of field N over the lines.
col() {
    local n=$1
    shift
    # shellcheck disable=SC2046
    median $(printf '%s\n' "$@" | awk -v n="$n" '{ print $n }')
}

start_gateway() {
    bench_spawn api-gateway "$WORK/api-gateway.log" env \
        SERVER_HOST=127.0.0.1 SERVER_PORT=$GW_PORT LOG_LEVEL=warn ACCESS_LOG=0 RATE_LIMIT=0 \
        MAX_CONNECTIONS=$((CLIENTS * 8 + 1000)) INTERNAL_TOKEN=$TOKEN REDIS_URL="$REDIS_URL" \
        DATABASE_URL=postgres://nobody@127.0.0.1:1/none "$@" "$BINDIR/api-gateway"
}

main() {
    local g=() n=() r gk gp ga gl gp50 gu nk np na nl np50 nu
    bench_drivers sse_load
    command -v node >/dev/null || { bench_log "sse: node not found (apt-get install nodejs)"; exit 1; }
    ulimit -n "$(ulimit -Hn)"
    : >"$WORK/api-gateway.log"
    bench_servers REDIS_URL
    wait_port_free $GW_PORT
    wait_port_free $NODE_PORT
    for ((r = 1; r <= ROUNDS; r++)); do
        round api-gateway || { bench_log "sse: round $r: the gateway failed"; exit 1; }
        g+=("$ROUND_OUT")
        round node || { bench_log "sse: round $r: node failed"; exit 1; }
        n+=("$ROUND_OUT")
        bench_log "sse: round $r: api-gateway ${g[-1]} / node ${n[-1]} (KiB/stream p99 last_p99 lost p50 CPU_us)"
    done
    gk=$(col 1 "${g[@]}") gp=$(col 2 "${g[@]}") ga=$(col 3 "${g[@]}") gp50=$(col 5 "${g[@]}") gu=$(col 6 "${g[@]}")
    nk=$(col 1 "${n[@]}") np=$(col 2 "${n[@]}") na=$(col 3 "${n[@]}") np50=$(col 5 "${n[@]}") nu=$(col 6 "${n[@]}")
    gl=$(printf '%s\n' "${g[@]}" | awk '{ s += $4 } END { print s + 0 }')
    nl=$(printf '%s\n' "${n[@]}" | awk '{ s += $4 } END { print s + 0 }')
    local verdict=PASS
    awk -v k="$gk" 'BEGIN { exit !(k <= 8) }' || verdict=FAIL
    awk -v p="$gp" 'BEGIN { exit !(p >= 0 && p <= 100) }' || verdict=FAIL
    [[ $gl == 0 ]] || verdict=FAIL
    echo "sse: $CLIENTS streams, median of $ROUNDS rounds: api-gateway $gk KiB/stream, publish-to-all p50 $gp50 ms p99 $gp ms (last stream p99 $ga ms, lost $gl), $gu us CPU/delivery; node http $nk KiB/stream, p50 $np50 ms p99 $np ms (last $na ms, lost $nl), $nu us CPU/delivery; memory ratio $(ratio "$gk" "$nk"), CPU ratio $(ratio "$gu" "$nu") (bars <= 8 KiB, p99 <= 100 ms; $AUTOGROUP) $verdict"
    [[ $verdict == PASS ]]
}

main "$@"
