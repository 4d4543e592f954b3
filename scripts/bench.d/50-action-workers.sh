#!/usr/bin/env bash
# Benchmark: action-workers REST deliveries per second to a local keep-alive
# sink (nginx `return 200`), at WORKER_CONCURRENCY=64, against wrk's
# requests per second on the same sink in the same run. Bar: ratio >= 0.5.
#
# Every delivery is a full job: leased from Redis, rendered, signed, POSTed,
# its action_results row written to PostgreSQL and its outcome recorded in
# Redis. Uses a private redis-server and nginx under var/bench; PostgreSQL:
# the server of BENCH_DATABASE_URL, else DATABASE_URL (var/env), else the
# local dev server, in database ae_bench_aw (recreated and migrated here).
#
# Fairness: wrk and the workers hit the same nginx sink (one worker
# process, keep-alive) at concurrency 64 on the same machine. The jobs are
# loaded into a staging list before the workers start, and moved into
# action_jobs with one RENAME only once the workers answer /healthz, so the
# timed span is deliveries only: no job loading, no process start-up.
#
# Environment: BENCH_JOBS (200000), BENCH_SECONDS (wrk duration, 5),
# BINDIR (bin), WORKER_THREADS (the workers' default when unset).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
[ -f scripts/bench.d/lib.sh ] && . scripts/bench.d/lib.sh || true
[ -f var/env ] && . var/env || true
BINDIR=${BINDIR:-bin}
JOBS=${BENCH_JOBS:-200000}
SECS=${BENCH_SECONDS:-5}
CONC=64
WORK=$ROOT/var/bench/action-workers
mkdir -p "$WORK"
PY=/usr/bin/python3

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for tool in nginx wrk redis-server redis-cli psql; do
    command -v $tool >/dev/null || { echo "50-action-workers: $tool is missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
[ -x "$BINDIR/action-workers" ] && [ -x "$BINDIR/migrate" ] || { echo "50-action-workers: build first (make)" >&2; exit 1; }

SINK_PORT=$(free_port)
REDIS_PORT=$(free_port)
METRICS_PORT=$(free_port)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# The sink: nginx answering 200 on keep-alive connections.
mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    server {
        listen 127.0.0.1:$SINK_PORT;
        location / { return 200 "ok"; }
    }
}
CONF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
PIDS+=($!)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >/dev/null &
PIDS+=($!)
for i in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && $PY -c "import socket; socket.create_connection(('127.0.0.1',$SINK_PORT),0.2)" 2>/dev/null && break
    sleep 0.1
done

# A database of its own, created afresh each run: rows deleted by earlier
# runs would leave the table and its indexes bloated, and the timing would
# drift from run to run (a production table grows; it is not emptied).
BASE=${BENCH_DATABASE_URL:-${DATABASE_URL:-postgresql://erc8004:erc8004@127.0.0.1:55432/erc8004_backend}}
DBURL=${BASE%/*}/ae_bench_aw
psql "$BASE" -qc "DROP DATABASE IF EXISTS ae_bench_aw WITH (FORCE)" -c "CREATE DATABASE ae_bench_aw" >/dev/null
DATABASE_URL=$DBURL "$BINDIR/migrate" >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log" >&2; exit 1; }

# 1. wrk on the sink.
WRK_RPS=$(wrk -t2 -c$CONC -d${SECS}s "http://127.0.0.1:$SINK_PORT/" | awk '/Requests\/sec/ {print $2}')

# 2. The same sink through the action-workers.
$PY - "$REDIS_PORT" "$SINK_PORT" "$JOBS" <<'PYEOF'
import json, sys, redis
port, sink, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
r = redis.Redis(port=port)
r.delete("action_jobs_bench_stage")
p = r.pipeline(transaction=False)
for i in range(n):
    p.lpush("action_jobs_bench_stage", json.dumps({
        "id": "bench-%d" % i, "trigger_id": "bench-trigger", "event_id": "bench-ev-%d" % i, "action_type": "rest",
        "priority": 1, "attempt": 0, "created_at": "2024-01-01T00:00:00Z",
        "config": {"method": "POST", "url": "http://127.0.0.1:%d/hook" % sink,
                   "body_template": "{\"agent\":{{agent_id}},\"score\":{{score}}}"},
        "event": {"id": "bench-ev-%d" % i, "agent_id": i, "score": 90, "event_type": "NewFeedback"}}))
    if i % 5000 == 4999:
        p.execute()
p.execute()
PYEOF
psql "$DBURL" -qc "DELETE FROM action_results WHERE trigger_id = 'bench-trigger'" >/dev/null 2>&1 || true

DATABASE_URL=$DBURL REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0 WORKER_CONCURRENCY=$CONC \
    METRICS_PORT=$METRICS_PORT METRICS_HOST=127.0.0.1 ALLOWED_TARGETS=127.0.0.1 WEBHOOK_SECRET=bench \
    LOG_LEVEL=warn "$BINDIR/action-workers" 2>"$WORK/action-workers.log" &
AW=$!
PIDS+=($AW)
for i in $(seq 100); do
    $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/healthz', timeout=1)" 2>/dev/null && break
    kill -0 $AW 2>/dev/null || { echo "action-workers died; see $WORK/action-workers.log" >&2; exit 1; }
    sleep 0.1
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CPU0=$(cpu_ticks $AW)
# One Python process starts the clock, releases the jobs and polls until
# none is left (no redis-cli forked every few milliseconds next to the
# workload). It prints the start and end times.
read -r START END < <($PY - "$REDIS_PORT" "$AW" <<'PYEOF'
import os, sys, time, redis
r = redis.Redis(port=int(sys.argv[1]))
pid = int(sys.argv[2])
left = r.register_script("return redis.call('LLEN','action_jobs') + redis.call('ZCARD','action_jobs_inflight')"
                         " + redis.call('ZCARD','action_jobs_delayed')")
start = time.time()
r.rename("action_jobs_bench_stage", "action_jobs")
while left() != 0:
    os.kill(pid, 0)
    time.sleep(0.01)
print("%.6f %.6f" % (start, time.time()))
PYEOF
) || { echo "action-workers died; see $WORK/action-workers.log" >&2; exit 1; }
CPU1=$(cpu_ticks $AW)
kill -TERM $AW; wait $AW || true
ROWS=$(psql "$DBURL" -tAc "SELECT count(*) FROM action_results WHERE trigger_id = 'bench-trigger' AND status = 'success'")
psql "$DBURL" -qc "DELETE FROM action_results WHERE trigger_id = 'bench-trigger'" >/dev/null

$PY - "$JOBS" "$START" "$END" "$WRK_RPS" "$ROWS" "$((CPU1 - CPU0))" "$(getconf CLK_TCK)" <<'PYEOF'
import sys
n, start, end, wrk, rows = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
cpu = int(sys.argv[6]) / float(sys.argv[7])
secs = end - start
rate = n / secs
ratio = rate / wrk if wrk else 0.0
ok = ratio >= 0.5 and rows == n
print("action-workers: %d REST deliveries in %.2fs = %.0f deliveries/s (concurrency 64, %d success rows; %.0f us of"
      " worker CPU per delivery)" % (n, secs, rate, rows, 1e6 * cpu / n))
print("action-workers: wrk on the same nginx sink: %.0f requests/s; ratio %.2f (bar >= 0.5) %s" % (wrk, ratio, "PASS" if ok else "FAIL"))
print("action-workers: for comparison, Sidekiq publishes ~23,500 no-op jobs/s on a larger machine; we do %.0f%% of that,"
      " where each delivery is a real signed HTTP POST plus a committed PostgreSQL row and a Redis lease and ack, with"
      " nginx, Redis and PostgreSQL sharing the same %s cores." % (100.0 * rate / 23500, __import__("os").cpu_count()))
sys.exit(0 if ok else 1)
PYEOF
