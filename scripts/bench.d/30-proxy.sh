#!/usr/bin/env bash
# Benchmark: the api-gateway's reverse proxy (SPEC 2b) against nginx
# proxy_pass with upstream keep-alive, both in front of the same upstream
# (an nginx answering a fixed 120-byte JSON body with keep-alive), same run.
# Bar: gateway req/s >= 1.0 x nginx, and the gateway's p99 latency no worse
# than nginx's. CPU per request (user + system of the proxy's processes,
# the upstream and wrk excluded) is printed for both.
#
# wrk -t2 -c64 GET /api/v1/bench/item?id=1; 2 s warm-up each, then
# BENCH_PROXY_ROUNDS (5) rounds of BENCH_DURATION (5s) each in the order
# gateway, nginx, nginx, gateway, ...; the median ratio of the rounds counts.
#
# The gateway runs with HTTP_LOOPS=BENCH_PROXY_LOOPS (2).
#
# Environment: BINDIR (bin), BENCH_DURATION (5s), BENCH_PROXY_ROUNDS (5),
# BENCH_PROXY_BAR (1.0), BENCH_PROXY_CONNS (64), BENCH_PROXY_LOOPS (2).
set -euo pipefail

# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init proxy
UP_PORT=18890
NGINX_PORT=18891
GW_PORT=18892
DURATION=${BENCH_DURATION:-5s}
ROUNDS=${BENCH_PROXY_ROUNDS:-5}
BAR=${BENCH_PROXY_BAR:-1.0}
CONNS=${BENCH_PROXY_CONNS:-64}
# The gateway's loop mode (one epoll loop per thread holding libmicrohttpd and
# libcurl): the configuration for proxying; 0 measures libmicrohttpd's pool.
LOOPS=${BENCH_PROXY_LOOPS:-2}
BODY='{"id":1,"name":"bench item","status":"ok","tags":["a","b","c"],"value":12345,"note":"fixed upstream body"}'

nginx_common() {
    cat <<EOF
daemon off;
error_log $1/error.log warn;
pid $1/nginx.pid;
events { worker_connections 4096; }
EOF
}

temp_paths() {
    cat <<EOF
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

write_confs() {
    mkdir -p "$WORK/up/tmp" "$WORK/front/tmp"
    {
        echo "# Written by scripts/bench.d/30-proxy.sh: the upstream."
        nginx_common "$WORK/up"
        echo "worker_processes 1;"
        echo "http {"
        echo "    access_log off;"
        echo "    keepalive_requests 10000000;"
        temp_paths "$WORK/up"
        echo "    server { listen 127.0.0.1:$UP_PORT; location / { default_type application/json; return 200 '$BODY'; } }"
        echo "}"
    } >"$WORK/up/nginx.conf"
    {
        echo "# Written by scripts/bench.d/30-proxy.sh: nginx as the proxy to compare with."
        nginx_common "$WORK/front"
        echo "worker_processes 2;"
        echo "http {"
        echo "    access_log off;"
        echo "    keepalive_requests 10000000;"
        temp_paths "$WORK/front"
        echo "    upstream bench { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 10000000; }"
        echo "    server {"
        echo "        listen 127.0.0.1:$NGINX_PORT;"
        echo "        location /api/v1/bench/ {"
        echo "            proxy_pass http://bench/;"
        echo "            proxy_http_version 1.1;"
        echo "            proxy_set_header Connection \"\";"
        echo "            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
        echo "            proxy_set_header X-Forwarded-Host \$host;"
        echo "            proxy_set_header X-Forwarded-Proto \$scheme;"
        echo "        }"
        echo "    }"
        echo "}"
    } >"$WORK/front/nginx.conf"
}

# run URL PID: prints "rps p99_ms cpu_us_per_request", the CPU being that of
# PID and its descendants (nginx's workers, the gateway's threads) over the
# requests wrk counted (lib.sh proc_ticks, ticks_us).
run() {
    local url=$1 pid=$2 out rps p99 reqs t0 t1
    t0=$(proc_ticks "$pid")
    out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency "$url" 2>&1) || { bench_log "$out"; return 1; }
    t1=$(proc_ticks "$pid")
    if grep -q "Non-2xx" <<<"$out"; then
        bench_log "proxy: $url gave non-2xx answers; run is void"
        bench_log "$out"
        return 1
    fi
    rps=$(awk '/^Requests\/sec:/ { printf "%d", $2 }' <<<"$out")
    reqs=$(awk '/requests in/ { print $1; exit }' <<<"$out")
    p99=$(awk '$1 == "99%" { v = $2; if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v) } else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 } printf "%.3f", v }' <<<"$out")
    echo "$rps $p99 $(ticks_us $((t1 - t0)) "${reqs:-0}")"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

main() {
    local gw_url=http://127.0.0.1:$GW_PORT/api/v1/bench/item?id=1
    local ng_url=http://127.0.0.1:$NGINX_PORT/api/v1/bench/item?id=1
    local up_pid ng_pid gw_pid g n ratios=() gp99=() np99=() gcpu=() ncpu=() grps=() nrps=()
    : >"$WORK/api-gateway.log"
    for p in $UP_PORT $NGINX_PORT $GW_PORT; do wait_port_free "$p"; done
    write_confs
    bench_spawn upstream "$WORK/up.out" nginx -p "$WORK/up" -e "$WORK/up/error.log" -c "$WORK/up/nginx.conf"
    up_pid=$BENCH_LAST_PID
    bench_spawn nginx "$WORK/front.out" nginx -p "$WORK/front" -e "$WORK/front/error.log" -c "$WORK/front/nginx.conf"
    ng_pid=$BENCH_LAST_PID
    bench_spawn api-gateway "$WORK/api-gateway.log" env \
        SERVER_HOST=127.0.0.1 SERVER_PORT=$GW_PORT LOG_LEVEL=warn ACCESS_LOG=0 RATE_LIMIT=0 \
        MAX_CONNECTIONS_PER_IP=0 DATABASE_URL=postgres://nobody@127.0.0.1:1/none HTTP_LOOPS="$LOOPS" \
        BENCH_URL=http://127.0.0.1:$UP_PORT "$BINDIR/api-gateway"
    gw_pid=$BENCH_LAST_PID
    wait_http "http://127.0.0.1:$UP_PORT/" 20 200 "$up_pid" || exit 1
    wait_http "$ng_url" 20 200 "$ng_pid" || { tail -n 20 "$WORK/front/error.log" >&2 || true; exit 1; }
    wait_http "$gw_url" 30 200 "$gw_pid" || { tail -n 40 "$WORK/api-gateway.log" >&2; exit 1; }

    bench_log "proxy: warming up"
    wrk_rps "$gw_url" 2s "$CONNS" >/dev/null
    wrk_rps "$ng_url" 2s "$CONNS" >/dev/null
    for ((i = 0; i < ROUNDS; i++)); do
        if ((i % 2 == 0)); then
            g=$(run "$gw_url" "$gw_pid"); n=$(run "$ng_url" "$ng_pid")
        else
            n=$(run "$ng_url" "$ng_pid"); g=$(run "$gw_url" "$gw_pid")
        fi
        read -r gr gp gc <<<"$g"
        read -r nr np nc <<<"$n"
        bench_log "proxy: round $((i + 1)): api-gateway $gr req/s p99 ${gp} ms ${gc} us CPU/req; nginx $nr req/s p99 ${np} ms ${nc} us CPU/req"
        ratios+=("$(ratio "$gr" "$nr")"); grps+=("$gr"); nrps+=("$nr")
        gp99+=("$gp"); np99+=("$np")
        gcpu+=("$gc"); ncpu+=("$nc")
    done
    local r gm nm gpm npm gcm ncm
    r=$(printf '%s\n' "${ratios[@]}" | median)
    gm=$(printf '%s\n' "${grps[@]}" | median); nm=$(printf '%s\n' "${nrps[@]}" | median)
    gpm=$(printf '%s\n' "${gp99[@]}" | median); npm=$(printf '%s\n' "${np99[@]}" | median)
    gcm=$(printf '%s\n' "${gcpu[@]}" | median); ncm=$(printf '%s\n' "${ncpu[@]}" | median)
    local verdict=PASS
    at_least "$r" "$BAR" || verdict=FAIL
    awk -v a="$gpm" -v b="$npm" 'BEGIN { exit !(a + 0 <= b + 0) }' || verdict=FAIL
    echo "proxy: api-gateway (HTTP_LOOPS=$LOOPS) $gm req/s p99 $gpm ms ${gcm} us CPU/req, nginx proxy_pass $nm req/s p99 $npm ms ${ncm} us CPU/req, median ratio $r (bar >= $BAR, p99 <= nginx's) $verdict"
    [[ $verdict == PASS ]]
}

main "$@"
