#!/usr/bin/env bash
# Benchmark: GET /api/v1/health on the api-gateway against nginx answering
# the same JSON body with `return 200` (no I/O behind it either: the
# gateway's health route must not touch the database per request).
# Bars: gateway >= 0.85 x nginx's requests/s, and the gateway's CPU time per
# request <= 1.5 x nginx's (utime+stime of each server's processes over the
# run, from /proc: a figure that does not move with the speed of wrk, which
# shares the cores).
#
# Both run on this machine with 2 workers/threads, access logs off and the
# gateway's rate limiter off; wrk -t2 -c64, 2 s warm-up, then BENCH_ROUNDS
# rounds of one run each, interleaved (gateway first in odd rounds, nginx
# first in even ones); the medians over the rounds count.
#
# Environment: BINDIR (bin), DATABASE_URL (from scripts/bench.sh),
# BENCH_DURATION (5s), BENCH_ROUNDS (5), BENCH_HEALTH_BAR (0.85),
# BENCH_HEALTH_CPU_BAR (1.5).
set -euo pipefail

# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init health
NGINX_PORT=18880
GW_PORT=18881
DURATION=${BENCH_DURATION:-5s}
ROUNDS=${BENCH_ROUNDS:-5}
BAR=${BENCH_HEALTH_BAR:-0.85}
CPU_BAR=${BENCH_HEALTH_CPU_BAR:-1.5}
BODY='{"status":"healthy","database":"connected","version":"0.1.0"}'

start_nginx() {
    nginx_start nginx "$WORK/nginx" 2 "        listen 127.0.0.1:$NGINX_PORT;
        location / {
            default_type application/json;
            return 200 '$BODY';
        }"
}

start_gateway() {
    bench_built api-gateway
    bench_spawn api-gateway "$WORK/api-gateway.log" env \
        SERVER_HOST=127.0.0.1 SERVER_PORT=$GW_PORT LOG_LEVEL=warn ACCESS_LOG=0 RATE_LIMIT=0 \
        "$BINDIR/api-gateway"
}

main() {
    local gw_url=http://127.0.0.1:$GW_PORT/api/v1/health
    local ng_url=http://127.0.0.1:$NGINX_PORT/api/v1/health
    local ng_pid gw_pid i side line ok=1
    local -a gw_rps=() ng_rps=() gw_us=() ng_us=() ratios=() cpu_ratios=()
    : >"$WORK/api-gateway.log"
    bench_need nginx wrk curl ss
    bench_servers DATABASE_URL
    wait_port_free $NGINX_PORT
    wait_port_free $GW_PORT
    start_nginx
    ng_pid=$BENCH_LAST_PID
    start_gateway
    gw_pid=$BENCH_LAST_PID
    wait_http "$ng_url" 20 200 "$ng_pid" || { tail -n 20 "$WORK/nginx/error.log" >&2 || true; exit 1; }
    wait_http "$gw_url" 60 200 "$gw_pid" || { tail -n 40 "$WORK/api-gateway.log" >&2; exit 1; }

    bench_log "health: warming up"
    wrk_rps "$gw_url" 2s >/dev/null
    wrk_rps "$ng_url" 2s >/dev/null
    for ((i = 1; i <= ROUNDS; i++)); do
        for side in $( ((i % 2)) && echo "gw ng" || echo "ng gw"); do
            if [[ $side == gw ]]; then
                wrk_measure "$gw_url" "$DURATION" 64 2 "$gw_pid"
                gw_rps+=("$M_RPS") gw_us+=("$M_US")
                bench_log "health: round $i api-gateway $M_RPS req/s, $M_US us CPU/req (wrk $M_WRK_US)"
            else
                wrk_measure "$ng_url" "$DURATION" 64 2 "$ng_pid"
                ng_rps+=("$M_RPS") ng_us+=("$M_US")
                bench_log "health: round $i nginx $M_RPS req/s, $M_US us CPU/req (wrk $M_WRK_US)"
            fi
        done
        ratios+=("$(ratio "${gw_rps[-1]}" "${ng_rps[-1]}")")
        cpu_ratios+=("$(ratio "${gw_us[-1]}" "${ng_us[-1]}")")
    done

    local r cr gw ng gu nu
    r=$(median "${ratios[@]}")
    cr=$(median "${cpu_ratios[@]}")
    gw=$(median "${gw_rps[@]}") ng=$(median "${ng_rps[@]}")
    gu=$(median "${gw_us[@]}") nu=$(median "${ng_us[@]}")
    at_least "$r" "$BAR" || ok=0
    awk -v r="$cr" -v b="$CPU_BAR" 'BEGIN { exit !(r + 0 <= b + 0) }' || ok=0
    line=$(printf 'health: api-gateway %s req/s, nginx %s req/s, ratio %s (bar >= %s); api-gateway %s us CPU/req, nginx %s us CPU/req, CPU ratio %s (bar <= %s); medians of %d interleaved rounds' \
        "$gw" "$ng" "$r" "$BAR" "$gu" "$nu" "$cr" "$CPU_BAR" "$ROUNDS")
    if ((ok)); then
        echo "$line PASS"
    else
        echo "$line FAIL"
        return 1
    fi
}

main "$@"
