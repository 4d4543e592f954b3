#!/usr/bin/env bash
# Benchmark: the api-gateway (issue 3).
#
# 1. Ingest: chain events per second through POST /api/v1/chain-events in
#    batches of 100 (wrk with a Lua script that gives every event a unique id),
#    against pgbench inserting the same rows in the same batches of 100 (one
#    multi-row INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id per
#    transaction, the statement the gateway runs), same clients, same run.
#    Bar: ratio >= 0.7. Beside it, CPU time per event (lib.sh): the gateway's
#    and PostgreSQL's under wrk, pgbench's and PostgreSQL's under pgbench.
# 2. GET /api/v1/triggers (authenticated, 20 rows with their conditions and
#    actions) requests per second, and its ratio to GET /api/v1/health.
#
# PostgreSQL from BENCH_DATABASE_URL, else DATABASE_URL (var/env), else the
# local dev server (database ae_bench_gw, created and migrated here).
# Environment: BENCH_SECONDS (duration of each run, 5), BENCH_CLIENTS (ingest
# connections, 8), BINDIR (bin).
set -euo pipefail
# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init gateway
SECS=${BENCH_SECONDS:-5}
CLIENTS=${BENCH_CLIENTS:-8}
PORT=${BENCH_GATEWAY_PORT:-18820}
PY=/usr/bin/python3
TOKEN=bench-ingest-token
SECRET=bench-jwt-secret-0123456789

bench_need wrk pgbench psql curl ss
bench_built api-gateway migrate

# A database of its own (ae_bench_gw) on the server DATABASE_URL names (the
# local dev server by default), so the shared database and any running
# event-processor never see the benchmark's rows.
if [ -n "${BENCH_DATABASE_URL:-}" ]; then
    DBURL=$BENCH_DATABASE_URL
else
    BASEURL=${DATABASE_URL:-postgres://erc8004:erc8004@127.0.0.1:55432/erc8004_backend}
    DBURL=$($PY -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit((p.scheme, p.netloc, "/ae_bench_gw", p.query, "")))' "$BASEURL")
    ADMIN=$($PY -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit((p.scheme, p.netloc, "/postgres", p.query, "")))' "$BASEURL")
    psql "$ADMIN" -tAc "SELECT 1 FROM pg_database WHERE datname='ae_bench_gw'" | grep -q 1 ||
        psql "$ADMIN" -qc "CREATE DATABASE ae_bench_gw"
fi
DATABASE_URL=$DBURL MIGRATIONS_DIR=$ROOT/database/migrations "$BINDIR/migrate" >/dev/null
# Both sides start from the same table.
psql "$DBURL" -qc "DELETE FROM events WHERE id LIKE 'wrk-%' OR id LIKE 'pgb-%'" >/dev/null

wait_port_free "$PORT" 30
PG_PID=$(listener_pid "$($PY -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).port or 5432)' "$DBURL")")
bench_spawn api-gateway "$WORK/api-gateway.log" env SERVER_PORT=$PORT SERVER_HOST=127.0.0.1 DATABASE_URL="$DBURL" \
    MIGRATIONS_DIR="$ROOT/database/migrations" JWT_SECRET=$SECRET INGEST_TOKEN=$TOKEN RATE_LIMIT=0 ACCESS_LOG=0 \
    LOG_LEVEL=warn "$BINDIR/api-gateway"
BASE=http://127.0.0.1:$PORT
GW_PID=$BENCH_LAST_PID
wait_http "$BASE/api/v1/health" 30 200 "$GW_PID"

# The event row both sides insert (only the id differs).
ROW_FIELDS='"chain_id":11155111,"block_number":%d,"block_hash":"0xbb","transaction_hash":"0xaa","log_index":%d,"registry":"reputation","event_type":"NewFeedback","agent_id":%d,"timestamp":1700000000,"client_address":"0xc1","feedback_index":1,"score":90,"tag1":"quality","tag2":"speed"'

cat > "$WORK/ingest.lua" <<LUA
-- Each request posts 100 events whose ids are unique across threads and runs.
local threads = {}
function setup(thread)
    table.insert(threads, thread)
    thread:set("tid", #threads)
end
local counter = 0
local prefix
function init(args)
    prefix = "wrk-" .. args[1] .. "-" .. tostring(tid) .. "-"
end
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $TOKEN"}
function request()
    local parts = {}
    for i = 1, 100 do
        counter = counter + 1
        parts[i] = string.format('{"id":"%s%d",$ROW_FIELDS}', prefix, counter, counter, i, counter % 1000)
    end
    return wrk.format("POST", "/api/v1/chain-events", headers, "[" .. table.concat(parts, ",") .. "]")
end
LUA

RUN=$(date +%s%N)
G0=$(proc_ticks "$GW_PID") P0=$(proc_ticks ${PG_PID:-})
wrk -t2 -c"$CLIENTS" -d"${SECS}s" -s "$WORK/ingest.lua" "$BASE" -- "$RUN" > "$WORK/wrk-ingest.txt"
G1=$(proc_ticks "$GW_PID") P1=$(proc_ticks ${PG_PID:-})
WRK_RPS=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-ingest.txt")
WRK_BAD=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk-ingest.txt")
WRK_BAD=${WRK_BAD:-0}

# pgbench: the same 100 rows per transaction, one statement.
$PY - "$WORK/ingest.sql" <<'PYEOF'
import sys
rows = []
for i in range(1, 101):
    rows.append("('pgb-' || :r || '-%d', 11155111, :b + %d, '0xbb', '0xaa', %d, 'reputation', 'NewFeedback', %d, "
                "1700000000, '0xc1', 1, 90, 'quality', 'speed')" % (i, i, i, i % 1000))
sql = ("\\set r random(1, 9000000000000000000)\n\\set b random(1, 1000000)\n"
       "INSERT INTO events (id, chain_id, block_number, block_hash, transaction_hash, log_index, registry, event_type, "
       "agent_id, \"timestamp\", client_address, feedback_index, score, tag1, tag2) VALUES "
       + ", ".join(rows) + " ON CONFLICT (id) DO NOTHING RETURNING id;\n")
open(sys.argv[1], "w").write(sql)
PYEOF
Q0=$(proc_ticks ${PG_PID:-})
cpu_run PGB_CPU pgbench -n -c "$CLIENTS" -j 2 -T "$SECS" -f "$WORK/ingest.sql" "$DBURL" > "$WORK/pgbench.txt" 2>&1
Q1=$(proc_ticks ${PG_PID:-})
PGB_TX=$(awk '/number of transactions actually processed/ { split($NF, a, "/"); print a[1]; exit }' "$WORK/pgbench.txt")
PGB_TPS=$(awk '/^tps = / {print $3; exit}' "$WORK/pgbench.txt")
PGB_FAILED=$(awk '/number of failed transactions/ {print $5}' "$WORK/pgbench.txt")
PGB_FAILED=${PGB_FAILED:-0}
STORED=$(psql "$DBURL" -tAc "SELECT count(*) FROM events WHERE id LIKE 'wrk-$RUN-%'")

# 2. GET /api/v1/triggers with 20 triggers, and the health route.
AUTH=$($PY - "$BASE" <<'PYEOF'
import json, sys, urllib.request, uuid
base = sys.argv[1]
def post(path, body, token=None):
    h = {"Content-Type": "application/json"}
    if token:
        h["Authorization"] = "Bearer " + token
    req = urllib.request.Request(base + path, json.dumps(body).encode(), h, method="POST")
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
name = "bench_" + uuid.uuid4().hex[:10]
post("/api/v1/auth/register", {"username": name, "email": name + "@example.com", "password": "bench-password"})
tok = post("/api/v1/auth/login", {"username": name, "password": "bench-password"})["access_token"]
for i in range(20):
    post("/api/v1/triggers", {
        "name": "bench %d" % i, "chain_id": 11155111, "registry": "reputation",
        "conditions": [{"condition_type": "score_threshold", "field": "score", "operator": ">=", "value": "80"}],
        "actions": [{"action_type": "telegram", "config": {"chat_id": "1", "message_template": "{{agent_id}}"}}]},
        tok)
print(tok)
PYEOF
)
LIST_RPS=$(wrk -t2 -c32 -d"${SECS}s" -H "Authorization: Bearer $AUTH" "$BASE/api/v1/triggers" | tee "$WORK/wrk-list.txt" |
    awk '/Requests\/sec/ {print $2}')
LIST_BAD=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk-list.txt")
HEALTH_RPS=$(wrk_rps "$BASE/api/v1/health" "${SECS}s" 32)
psql "$DBURL" -qc "DELETE FROM events WHERE id LIKE 'wrk-%' OR id LIKE 'pgb-%'" >/dev/null

WRK_REQS=$(awk '/requests in/ { print $1; exit }' "$WORK/wrk-ingest.txt")
$PY - "$WRK_RPS" "$WRK_BAD" "$PGB_TPS" "$PGB_FAILED" "$STORED" "$LIST_RPS" "${LIST_BAD:-0}" "$HEALTH_RPS" "$CLIENTS" \
    "$((G1 - G0))" "$((P1 - P0))" "${WRK_REQS:-0}" "$PGB_CPU" "$((Q1 - Q0))" "${PGB_TX:-0}" "$CLK_TCK" <<'PYEOF'
import sys
wrk_rps, wrk_bad, pgb_tps, pgb_failed, stored = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
list_rps, list_bad, health_rps, clients = float(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9])
gw_t, pg_t, wrk_reqs, pgb_cpu, pgq_t, pgb_tx, hz = (int(sys.argv[10]), int(sys.argv[11]), int(sys.argv[12]),
                                                   float(sys.argv[13]), int(sys.argv[14]), int(sys.argv[15]),
                                                   float(sys.argv[16]))
us = lambda secs, n: 1e6 * secs / n if n else 0.0
ours, anchor = wrk_rps * 100, pgb_tps * 100
ratio = ours / anchor if anchor else 0.0
ok = ratio >= 0.7 and wrk_bad == 0 and pgb_failed == 0 and stored > 0
print("gateway ingest: %.0f events/s through POST /api/v1/chain-events (batches of 100, %d connections; %d events stored, %d non-2xx)"
      % (ours, clients, stored, wrk_bad))
print("gateway ingest: pgbench, same rows, same batches, %d clients: %.0f events/s; ratio %.2f (bar >= 0.7) %s"
      % (clients, anchor, ratio, "PASS" if ok else "FAIL"))
print("gateway ingest CPU per event: api-gateway %.1f us + PostgreSQL %.1f us; anchor pgbench %.1f us + PostgreSQL %.1f us"
      % (us(gw_t / hz, wrk_reqs * 100), us(pg_t / hz, wrk_reqs * 100), us(pgb_cpu, pgb_tx * 100),
         us(pgq_t / hz, pgb_tx * 100)))
print("gateway list: GET /api/v1/triggers (authenticated, 20 rows) %.0f req/s; GET /api/v1/health %.0f req/s; ratio %.3f%s"
      % (list_rps, health_rps, list_rps / health_rps if health_rps else 0.0,
         "" if list_bad == 0 else " (%d non-2xx!)" % list_bad))
sys.exit(0 if ok and list_bad == 0 else 1)
PYEOF
