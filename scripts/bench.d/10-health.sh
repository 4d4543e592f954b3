#!/usr/bin/env bash
# Benchmark: GET /api/v1/health on the api-gateway against nginx answering
# the same JSON body with `return 200` (no I/O behind it either: the
# gateway's health route must not touch the database per request).
# Bar: gateway >= 0.85 x nginx.
#
# Both run on this machine with 2 workers/threads, access logs off and the
# gateway's rate limiter off; wrk -t2 -c64, 2 s warm-up, then 10 s runs in
# the order gateway, nginx, nginx, gateway; the best run of each counts.
#
# Environment: BINDIR (bin), DATABASE_URL (from scripts/bench.sh),
# BENCH_DURATION (10s), BENCH_HEALTH_BAR (0.85).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
# shellcheck source=scripts/bench.d/lib.sh
. "$ROOT/scripts/bench.d/lib.sh"

BINDIR=${BINDIR:-bin}
[[ $BINDIR == /* ]] || BINDIR=$ROOT/$BINDIR
NGINX_PORT=18880
GW_PORT=18881
DURATION=${BENCH_DURATION:-10s}
BAR=${BENCH_HEALTH_BAR:-0.85}
WORK=$BENCH_VAR/health
BODY='{"status":"healthy","database":"connected","version":"0.1.0"}'

write_nginx_conf() {
    mkdir -p "$WORK/nginx/tmp"
    cat >"$WORK/nginx/nginx.conf" <<EOF
# Written by scripts/bench.d/10-health.sh.
daemon off;
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            default_type application/json;
            return 200 '$BODY';
        }
    }
}
EOF
}

start_nginx() {
    write_nginx_conf
    # -e: nginx opens its default error log before reading the config;
    # point it at ours so that /var/log/nginx need not be writable.
    bench_spawn nginx "$WORK/nginx.out" nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" \
        -c "$WORK/nginx/nginx.conf"
}

start_gateway() {
    [[ -x $BINDIR/api-gateway ]] || { bench_log "health: $BINDIR/api-gateway is not built (make)"; exit 1; }
    bench_spawn api-gateway "$WORK/api-gateway.log" env \
        SERVER_HOST=127.0.0.1 SERVER_PORT=$GW_PORT LOG_LEVEL=warn ACCESS_LOG=0 RATE_LIMIT=0 \
        "$BINDIR/api-gateway"
}

main() {
    local gw_url=http://127.0.0.1:$GW_PORT/api/v1/health
    local ng_url=http://127.0.0.1:$NGINX_PORT/api/v1/health
    local gw=0 ng=0 r ng_pid gw_pid
    mkdir -p "$WORK"
    : >"$WORK/api-gateway.log"
    # Run alone (not from scripts/bench.sh): use the local servers' URLs.
    [[ -n ${DATABASE_URL:-} ]] || eval "$("$ROOT/scripts/servers.sh" env)"
    wait_port_free $NGINX_PORT
    wait_port_free $GW_PORT
    trap bench_cleanup EXIT
    start_nginx
    ng_pid=$BENCH_LAST_PID
    start_gateway
    gw_pid=$BENCH_LAST_PID
    wait_http "$ng_url" 20 200 "$ng_pid" || { tail -n 20 "$WORK/nginx/error.log" >&2 || true; exit 1; }
    wait_http "$gw_url" 60 200 "$gw_pid" || { tail -n 40 "$WORK/api-gateway.log" >&2; exit 1; }

    bench_log "health: warming up"
    wrk_rps "$gw_url" 2s >/dev/null
    wrk_rps "$ng_url" 2s >/dev/null
    # ABBA order so that neither side always runs on a warmer (or
    # throttled) machine; the best of two runs each.
    r=$(wrk_rps "$gw_url" "$DURATION"); gw=$(max "$gw" "$r"); bench_log "health: api-gateway $r req/s"
    r=$(wrk_rps "$ng_url" "$DURATION"); ng=$(max "$ng" "$r"); bench_log "health: nginx $r req/s"
    r=$(wrk_rps "$ng_url" "$DURATION"); ng=$(max "$ng" "$r"); bench_log "health: nginx $r req/s"
    r=$(wrk_rps "$gw_url" "$DURATION"); gw=$(max "$gw" "$r"); bench_log "health: api-gateway $r req/s"

    r=$(ratio "$gw" "$ng")
    if at_least "$r" "$BAR"; then
        echo "health: api-gateway $gw req/s, nginx $ng req/s, ratio $r (bar >= $BAR) PASS"
    else
        echo "health: api-gateway $gw req/s, nginx $ng req/s, ratio $r (bar >= $BAR) FAIL"
        return 1
    fi
}

main "$@"
