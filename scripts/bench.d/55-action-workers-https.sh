#!/usr/bin/env bash
# Benchmark: action-workers REST deliveries over https per second to a local
# nginx TLS sink (`return 200`, keep-alive), at WORKER_CONCURRENCY=64,
# against wrk (-t2 -c64, keep-alive) on the same sink in the same run.
# Bar: median ratio >= 0.5 (issue 9), as over http (50-action-workers.sh).
#
# Every delivery is a full job: leased from Redis, rendered, signed, POSTed
# over TLS with the sink's certificate verified (a CA made here with
# openssl, given to the workers as CA_BUNDLE), its action_results row
# written to PostgreSQL and its outcome recorded in Redis.
#
# BENCH_ROUNDS (3) rounds, each wrk then the workers, so the two alternate
# on the same machine state; the summary is the median of the rounds. Each
# round also gives CPU time per request of our process (the workers) and of
# the anchor's (wrk), and of the sink (nginx) under each: utime + stime over
# the measured span, divided by the requests made in it. That figure does
# not depend on how fast the other processes on the 2 cores are.
#
# The jobs are loaded into a staging list before the workers start and moved
# into action_jobs with one RENAME once they answer /healthz, so the timed
# span is deliveries only.
#
# Environment: BENCH_JOBS (100000 per round), BENCH_SECONDS (wrk, 5),
# BENCH_ROUNDS (3), BINDIR (bin), WORKER_THREADS (the workers' default);
# BENCH_PERF=1 records a call-graph profile of the workers' timed spans
# (perf record, var/bench/action-workers-https/perf-N.data).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
cd "$ROOT"
# shellcheck source=scripts/bench.d/lib.sh
. "$ROOT/scripts/bench.d/lib.sh"
[[ -f var/env ]] && . var/env
BINDIR=${BINDIR:-bin}
[[ $BINDIR == /* ]] || BINDIR=$ROOT/$BINDIR
JOBS=${BENCH_JOBS:-100000}
SECS=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
CONC=64
NAME=action-workers-https
WORK=$BENCH_VAR/$NAME
PY=/usr/bin/python3
mkdir -p "$WORK"

for tool in nginx wrk redis-server redis-cli psql openssl; do
    command -v $tool >/dev/null || { echo "$NAME: $tool is missing (scripts/deps.sh installs it)" >&2; exit 1; }
done
[[ -x $BINDIR/action-workers && -x $BINDIR/migrate ]] || { echo "$NAME: build first (make)" >&2; exit 1; }

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PORT=$(free_port)
REDIS_PORT=$(free_port)
METRICS_PORT=$(free_port)
trap bench_cleanup EXIT

# utime + stime of process $1, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# A CA and the sink's certificate (127.0.0.1), made afresh: nothing kept.
PKI=$WORK/pki
rm -rf "$PKI" && mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.pem" \
    -days 2 -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/sink.key" -out "$PKI/sink.csr" \
    -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >"$PKI/sink.ext"
openssl x509 -req -in "$PKI/sink.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
    -extfile "$PKI/sink.ext" -out "$PKI/sink.pem" 2>/dev/null

# The sink: one nginx process (no master, so its pid is the one that works)
# answering 200 on keep-alive TLS connections.
mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<CONF
# Written by scripts/bench.d/55-action-workers-https.sh.
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$SINK_PORT ssl;
        ssl_certificate $PKI/sink.pem;
        ssl_certificate_key $PKI/sink.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:1m;
        location / { return 200 "ok"; }
    }
}
CONF
bench_spawn nginx "$WORK/nginx.out" nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf"
NGINX=$BENCH_LAST_PID
bench_spawn redis "$WORK/redis.out" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK"
for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 &&
        curl -s -o /dev/null --cacert "$PKI/ca.pem" "https://127.0.0.1:$SINK_PORT/" && break
    sleep 0.1
done
curl -sf -o /dev/null --cacert "$PKI/ca.pem" "https://127.0.0.1:$SINK_PORT/" ||
    { echo "$NAME: the nginx TLS sink does not answer; see $WORK/nginx/error.log" >&2; exit 1; }

# A database of its own, created afresh each run (see 50-action-workers.sh).
BASE=${BENCH_DATABASE_URL:-${DATABASE_URL:-postgresql://erc8004:erc8004@127.0.0.1:55432/erc8004_backend}}
DB=ae_bench_aw_tls
DBURL=${BASE%/*}/$DB
psql "$BASE" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB" >/dev/null
DATABASE_URL=$DBURL "$BINDIR/migrate" >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log" >&2; exit 1; }

# wrk on the sink: prints "requests seconds wrk_cpu_seconds nginx_ticks".
# wrk's CPU comes from its rusage (it is our child), nginx's from /proc.
wrk_round() {
    local n0 n1
    n0=$(cpu_ticks "$NGINX")
    $PY - "https://127.0.0.1:$SINK_PORT/" "$CONC" "$SECS" >"$WORK/wrk.out" <<'PYEOF'
import re, resource, subprocess, sys
url, conns, secs = sys.argv[1], sys.argv[2], sys.argv[3]
out = subprocess.run(["wrk", "-t2", "-c" + conns, "-d" + secs + "s", url], capture_output=True, text=True).stdout
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
if not m or "Non-2xx" in out:
    sys.exit("wrk: " + out)
t = float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)
print(m.group(1), t, ru.ru_utime + ru.ru_stime)
PYEOF
    n1=$(cpu_ticks "$NGINX")
    echo "$(cat "$WORK/wrk.out") $((n1 - n0))"
}

# One run of the workers over $JOBS jobs: prints "jobs seconds aw_ticks
# nginx_ticks success_rows".
aw_round() {
    local aw c0 c1 n0 n1 start end rows
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
        "config": {"method": "POST", "url": "https://127.0.0.1:%d/hook" % sink,
                   "body_template": "{\"agent\":{{agent_id}},\"score\":{{score}}}"},
        "event": {"id": "bench-ev-%d" % i, "agent_id": i, "score": 90, "event_type": "NewFeedback"}}))
    if i % 5000 == 4999:
        p.execute()
p.execute()
PYEOF
    psql "$DBURL" -qc "TRUNCATE action_results" >/dev/null
    DATABASE_URL=$DBURL REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0 WORKER_CONCURRENCY=$CONC \
        METRICS_PORT=$METRICS_PORT METRICS_HOST=127.0.0.1 ALLOWED_TARGETS=127.0.0.1 WEBHOOK_SECRET=bench \
        CA_BUNDLE=$PKI/ca.pem LOG_LEVEL=warn "$BINDIR/action-workers" 2>"$WORK/action-workers.log" &
    aw=$!
    wait_http "http://127.0.0.1:$METRICS_PORT/healthz" 30 200 "$aw" >&2 ||
        { echo "$NAME: action-workers did not start; see $WORK/action-workers.log" >&2; return 1; }
    local perfpid=""
    if [[ -n ${BENCH_PERF:-} ]]; then
        perf record -q -g -p "$aw" -o "$WORK/perf-$1.data" 2>/dev/null &
        perfpid=$!
        sleep 0.3
    fi
    c0=$(cpu_ticks "$aw")
    n0=$(cpu_ticks "$NGINX")
    read -r start end < <($PY - "$REDIS_PORT" "$aw" <<'PYEOF'
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
    ) || { echo "$NAME: action-workers died; see $WORK/action-workers.log" >&2; return 1; }
    c1=$(cpu_ticks "$aw")
    n1=$(cpu_ticks "$NGINX")
    if [[ -n $perfpid ]]; then
        kill -INT "$perfpid"
        wait "$perfpid" || true
    fi
    kill -TERM "$aw"
    wait "$aw" || true
    rows=$(psql "$DBURL" -tAc "SELECT count(*) FROM action_results WHERE status = 'success'")
    echo "$JOBS $($PY -c "print($end - $start)") $((c1 - c0)) $((n1 - n0)) $rows"
}

RESULTS=$WORK/rounds.txt
: >"$RESULTS"
for ((i = 1; i <= ROUNDS; i++)); do
    bench_log "$NAME: round $i/$ROUNDS: wrk"
    w=$(wrk_round)
    bench_log "$NAME: round $i/$ROUNDS: action-workers ($JOBS jobs)"
    a=$(aw_round "$i")
    echo "$w $a" >>"$RESULTS"
done

$PY - "$RESULTS" "$(getconf CLK_TCK)" "$JOBS" <<'PYEOF'
import statistics, sys
tck, jobs = float(sys.argv[2]), int(sys.argv[3])
rounds = []
for line in open(sys.argv[1]):
    wreq, wsecs, wcpu, wng, n, secs, aw, ang, rows = line.split()
    wrk_rps = int(wreq) / float(wsecs)
    rate = int(n) / float(secs)
    rounds.append(dict(rate=rate, wrk=wrk_rps, ratio=rate / wrk_rps, rows=int(rows),
                       aw_us=1e6 * int(aw) / tck / int(n), wrk_us=1e6 * float(wcpu) / int(wreq),
                       ng_aw_us=1e6 * int(ang) / tck / int(n), ng_wrk_us=1e6 * int(wng) / tck / int(wreq)))
med = lambda k: statistics.median(r[k] for r in rounds)
for i, r in enumerate(rounds, 1):
    print("action-workers https: round %d: %.0f deliveries/s, wrk %.0f requests/s, ratio %.2f; CPU per request: "
          "workers %.1f us, wrk %.1f us; nginx %.1f us under the workers, %.1f us under wrk"
          % (i, r["rate"], r["wrk"], r["ratio"], r["aw_us"], r["wrk_us"], r["ng_aw_us"], r["ng_wrk_us"]))
rows_ok = all(r["rows"] == jobs for r in rounds)
ratio = med("ratio")
ok = ratio >= 0.5 and rows_ok
print("action-workers https: median of %d rounds: %.0f REST deliveries/s over TLS (concurrency 64, %s) against wrk's"
      " %.0f requests/s on the same nginx TLS sink; ratio %.2f (bar >= 0.5) %s"
      % (len(rounds), med("rate"), "every job a success row" if rows_ok else "MISSING success rows", med("wrk"),
         ratio, "PASS" if ok else "FAIL"))
print("action-workers https: median CPU per request: workers %.1f us, wrk %.1f us (%.1fx); nginx %.1f us per delivery,"
      " %.1f us per wrk request" % (med("aw_us"), med("wrk_us"), med("aw_us") / med("wrk_us"), med("ng_aw_us"),
                                    med("ng_wrk_us")))
sys.exit(0 if ok else 1)
PYEOF
