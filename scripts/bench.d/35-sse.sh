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
# client's read times and CPU are logged beside them). A second line gives the gateway's figures with
# HTTP_CONNECTION_MEMORY=8192 (libmicrohttpd's per-connection pool halved).
#
# Environment: BINDIR (bin), O (build), REDIS_URL (the local server's),
# BENCH_SSE_CLIENTS, BENCH_SSE_SOURCES, BENCH_SSE_EVENTS.
set -euo pipefail

# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init sse
LOAD=$ROOT/$O/tests/drivers/sse_load
GW_PORT=18900
NODE_PORT=18901
CLIENTS=${BENCH_SSE_CLIENTS:-10000}
SOURCES=${BENCH_SSE_SOURCES:-50}
EVENTS=${BENCH_SSE_EVENTS:-20}
TOKEN=bench-internal-token

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# measure NAME PID PORT: prints "kib_per_stream p99 all_p99 lost".
measure() {
    local name=$1 pid=$2 port=$3 before after line result cid
    cid=bench-$RANDOM$RANDOM
    before=$(rss_kib "$pid")
    coproc LOADP { "$LOAD" 127.0.0.1 "$port" "$cid" "$CLIENTS" "$SOURCES" "$EVENTS" "/internal/v1/sse/$cid" "$TOKEN" 2>&1; }
    local lpid=$LOADP_PID
    if ! read -r -t 180 line <&"${LOADP[0]}" || [[ $line != ready* ]]; then
        bench_log "sse: $name: the load client did not get its streams: $line"
        kill "$lpid" 2>/dev/null || true
        return 1
    fi
    sleep 2
    after=$(rss_kib "$pid")
    echo go >&"${LOADP[1]}"
    read -r -t 120 result <&"${LOADP[0]}" || result=""
    wait "$lpid" 2>/dev/null || true
    bench_log "sse: $name: RSS $before -> $after KiB for $CLIENTS streams; $result"
    # latency_ms p50 A p99 B max C all_p99 D lost E
    awk -v b="$before" -v a="$after" -v n="$CLIENTS" -v r="$result" 'BEGIN {
        split(r, f, " "); printf "%.2f %s %s %s %s\n", (a - b) / n, f[5], f[9], f[11], f[3] }'
}

start_gateway() {
    bench_spawn api-gateway "$WORK/api-gateway.log" env \
        SERVER_HOST=127.0.0.1 SERVER_PORT=$GW_PORT LOG_LEVEL=warn ACCESS_LOG=0 RATE_LIMIT=0 \
        MAX_CONNECTIONS=$((CLIENTS * 8 + 1000)) INTERNAL_TOKEN=$TOKEN REDIS_URL="$REDIS_URL" \
        DATABASE_URL=postgres://nobody@127.0.0.1:1/none "$@" "$BINDIR/api-gateway"
}

main() {
    local gw_pid node_pid g n s
    bench_drivers sse_load
    command -v node >/dev/null || { bench_log "sse: node not found (apt-get install nodejs)"; exit 1; }
    ulimit -n "$(ulimit -Hn)"
    : >"$WORK/api-gateway.log"
    bench_servers REDIS_URL
    wait_port_free $GW_PORT
    wait_port_free $NODE_PORT
    # libmicrohttpd shares the connection limit out among its 8 threads, and
    # whichever thread wakes first accepts a whole burst: each thread's share
    # must hold every stream (the descriptor limit bounds them anyway).
    start_gateway
    gw_pid=$BENCH_LAST_PID
    bench_spawn node "$WORK/node.log" node "$ROOT/scripts/bench.d/sse_anchor.js" $NODE_PORT
    node_pid=$BENCH_LAST_PID
    wait_http "http://127.0.0.1:$GW_PORT/health" 30 200 "$gw_pid" || { tail -n 20 "$WORK/api-gateway.log" >&2; exit 1; }
    sleep 1
    g=$(measure api-gateway "$gw_pid" $GW_PORT)
    n=$(measure node "$node_pid" $NODE_PORT)
    kill -TERM "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
    wait_port_free $GW_PORT
    start_gateway HTTP_CONNECTION_MEMORY=8192
    gw_pid=$BENCH_LAST_PID
    wait_http "http://127.0.0.1:$GW_PORT/health" 30 200 "$gw_pid" || { tail -n 20 "$WORK/api-gateway.log" >&2; exit 1; }
    s=$(measure "api-gateway (8 KiB pool)" "$gw_pid" $GW_PORT)
    read -r sk sp sa sl sp50 <<<"$s"
    read -r gk gp ga gl gp50 <<<"$g"
    read -r nk np na nl np50 <<<"$n"
    local verdict=PASS
    awk -v k="$gk" 'BEGIN { exit !(k <= 8) }' || verdict=FAIL
    awk -v p="$gp" 'BEGIN { exit !(p >= 0 && p <= 100) }' || verdict=FAIL
    [[ $gl == 0 ]] || verdict=FAIL
    echo "sse: $CLIENTS streams: api-gateway $gk KiB/stream, publish-to-all p50 $gp50 ms p99 $gp ms (last stream p99 $ga ms, lost $gl); node http $nk KiB/stream, p50 $np50 ms p99 $np ms (last $na ms, lost $nl); memory ratio $(ratio "$gk" "$nk") (bars <= 8 KiB, p99 <= 100 ms) $verdict"
    echo "sse: $CLIENTS streams: api-gateway with HTTP_CONNECTION_MEMORY=8192: $sk KiB/stream, p50 $sp50 ms p99 $sp ms (last $sa ms, lost $sl)"
    [[ $verdict == PASS ]]
}

main "$@"
