#!/usr/bin/env bash
# Benchmark: event-processor (SPEC 3, issue 4).
#
# Throughput: EP_BENCH_EVENTS (200000) events inserted in batches of 100
# (one transaction each) with 1,000 enabled triggers, about 10 of which match
# each event (agent_id_equals over 100 agents). The processor is held off by
# its advisory lock while the events are inserted, then released; its
# processed events/s (first batch to empty queue and outbox, all jobs in
# Redis) is compared with the raw insert rate of the same batches into a
# plain copy of the events table (no triggers) measured in the same run.
# Bar: ratio >= 1.0. Beside it, CPU time per event (utime + stime from /proc,
# children included, as lib.sh counts it): the processor's and PostgreSQL's
# while it drains, the inserting client's and PostgreSQL's for the anchor.
# This is the processor's rate on a backlog, measured
# alone (not concurrently with the inserts); the drainer stands in for the
# workers and UNLINKs the list (freed off Redis's main thread).
#
# Latency: EP_BENCH_LAT_SECONDS (5) s of 1,000 events/s, one per
# transaction; commit (client side) to first job of the event seen in Redis,
# p50 and p99, by a watcher in its own process (BRPOP, then LRANGE+DEL in
# one MULTI) on the same CLOCK_MONOTONIC. Bar: p99 <= 10 ms.
# EP_BENCH_LAT_SECONDS=0 skips it; EP_BENCH_LOG_LEVEL=info keeps the
# processor's "phase totals" line in var/bench/event-processor/.
#
# PostgreSQL: BENCH_DATABASE_URL's server, else DATABASE_URL's (bench.sh
# exports the local servers'), else the local dev server
# (database ae_bench_ep, created and migrated here). Redis: a private
# redis-server on a free port (the jobs would not fit the shared one).
set -euo pipefail
# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init event-processor
PY=/usr/bin/python3
bench_need redis-server psql ss
bench_built event-processor migrate
REDIS_PORT=$(free_port)
METRICS_PORT=$(free_port)
bench_spawn redis "$WORK/redis.out" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
    --appendonly no --dir "$WORK" --logfile "$WORK/redis.log"
BASE=${BENCH_DATABASE_URL:-${DATABASE_URL:-postgresql://erc8004:erc8004@127.0.0.1:55432/erc8004_backend}}
DB_URL=${BASE%/*}/ae_bench_ep
psql "$BASE" -qc "DROP DATABASE IF EXISTS ae_bench_ep WITH (FORCE)" -c "CREATE DATABASE ae_bench_ep" >/dev/null
DATABASE_URL=$DB_URL MIGRATIONS_DIR=$ROOT/database/migrations "$BINDIR/migrate" >/dev/null 2>&1
PG_PID=$(listener_pid "$($PY -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).port or 5432)' "$DB_URL")")
export DB_URL REDIS_PORT METRICS_PORT BINDIR WORK ROOT PG_PID CLK_TCK
exec 3>&1
$PY - <<'PYEOF'
import os, sys, time
import psycopg2, psycopg2.extras
sys.path.insert(0, os.path.join(os.environ["ROOT"], "scripts", "bench.d"))
import epbench as eb

N = int(os.environ.get("EP_BENCH_EVENTS", "200000"))
LAT_S = float(os.environ.get("EP_BENCH_LAT_SECONDS", "5"))
DB = os.environ["DB_URL"]
eb.wait_redis()
db = psycopg2.connect(DB); db.autocommit = True
cur = db.cursor()
cur.execute("INSERT INTO users (id, username, email, password_hash) VALUES ('ub','bench','b@x','x')")
cur.execute("INSERT INTO triggers (id, user_id, name, chain_id, registry) "
            "SELECT 'bt' || i, 'ub', 'bench ' || i, 1, 'reputation' FROM generate_series(0, 999) i")
cur.execute("INSERT INTO trigger_conditions (trigger_id, condition_type, value) "
            "SELECT 'bt' || i, 'agent_id_equals', (i % 100)::text FROM generate_series(0, 999) i")
cur.execute("INSERT INTO trigger_conditions (trigger_id, condition_type, operator, value) "
            "SELECT 'bt' || i, 'score_threshold', '>=', '0' FROM generate_series(0, 999) i")
cur.execute("INSERT INTO trigger_actions (trigger_id, action_type, config) "
            "SELECT 'bt' || i, 'rest', '{\"url\":\"http://127.0.0.1:9/hook\",\"method\":\"POST\"}' "
            "FROM generate_series(0, 999) i")
cur.execute("CREATE TABLE events_copy (LIKE events INCLUDING ALL)")

proc = eb.start_processor(DB, os.environ.get("EP_BENCH_LOG_LEVEL", "warn"))

def tree_ticks(root):
    """CPU ticks of root and everything below it (utime, stime, cutime,
    cstime of each: lib.sh's proc_ticks)."""
    kids, ticks = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            s = open("/proc/%s/stat" % d).read()
        except OSError:
            continue
        f = s[s.rindex(")") + 2:].split()
        kids.setdefault(int(f[1]), []).append(int(d))
        ticks[int(d)] = sum(int(x) for x in f[11:15])
    total, todo = 0, [root] if root else []
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo += kids.get(p, [])
    return total
PG_PID, HZ = int(os.environ.get("PG_PID") or 0), float(os.environ.get("CLK_TCK") or 100)

def batches(prefix):
    for b in range(0, N, 100):
        yield [("%s-%d" % (prefix, i), 1, "reputation", "NewFeedback", i % 100, i % 100, 1700000000 + i,
                "0xclient%040d" % i, "quality", "speed", 1000000 + i // 10, "0x%064x" % i, i % 10)
               for i in range(b, min(b + 100, N))]
def insert(table, prefix):
    c = psycopg2.connect(DB); c.autocommit = True
    k = c.cursor()
    q = eb.insert_many(table)
    t0 = time.perf_counter()
    for rows in batches(prefix):
        psycopg2.extras.execute_values(k, q, rows, page_size=100)
    dt = time.perf_counter() - t0
    c.close()
    return dt

# Anchor: the same batches into a plain copy table.
pg0, me0 = tree_ticks(PG_PID), time.process_time()
raw_dt = insert("events_copy", "c")
raw_pg, raw_me = tree_ticks(PG_PID) - pg0, time.process_time() - me0
raw_rate = N / raw_dt

drainer = eb.Drainer(); drainer.start()
lock = psycopg2.connect(DB); lock.autocommit = True
lock.cursor().execute("SELECT pg_advisory_lock(%d)" % eb.PROCESSOR_LOCK)
ins_dt = insert("events", "e")
t0 = time.perf_counter()
ep0, pg0 = tree_ticks(proc.pid), tree_ticks(PG_PID)
eb.release_and_drain(lock, cur, 0.01)
ep_dt = time.perf_counter() - t0
ep_cpu, ep_pg = tree_ticks(proc.pid) - ep0, tree_ticks(PG_PID) - pg0
drainer.stop()
ep_rate = N / ep_dt
ratio = ep_rate / raw_rate
print("event-processor throughput: %d events, %d jobs (expected %d)" % (N, drainer.count, N * 10))
print("  ours   (processed events/s): %.0f" % ep_rate)
print("  anchor (raw insert events/s into a plain copy table, batches of 100): %.0f" % raw_rate)
print("  (insert into events with the queue trigger: %.0f events/s)" % (N / ins_dt))
print("  ratio: %.2f (bar >= 1.0) %s" % (ratio, "PASS" if ratio >= 1.0 else "FAIL"))
print("  CPU per event: event-processor %.1f us + PostgreSQL %.1f us while draining; anchor: inserting client %.1f us"
      " + PostgreSQL %.1f us" % (1e6 * ep_cpu / HZ / N, 1e6 * ep_pg / HZ / N, 1e6 * raw_me / N, 1e6 * raw_pg / HZ / N))
ok = ratio >= 1.0 and drainer.count == N * 10

# Latency at 1,000 events/s: commit returned -> the event's first job in
# Redis, as epbench's watcher process sees it.
LAT_N = int(LAT_S * 1000)
if LAT_N:
    watcher = eb.Watcher()
    c = psycopg2.connect(DB); c.autocommit = True
    rows = [("l-%d" % i, 1, "reputation", "NewFeedback", i % 100, 50, 1700000000 + i, "0x", "a", "b", i, "0x", 0)
            for i in range(LAT_N)]
    commits = eb.paced(c.cursor(), rows)
    time.sleep(1); seen = watcher.finish()
    lat, missing, p50, p99 = eb.latencies(commits, seen)
    if not lat:
        raise SystemExit("no job seen in Redis; see %s" % proc.log_path)
    print("event-processor latency at 1000 events/s (%d events, %d missing), commit returned to the client -> "
          "first job of the event in Redis: p50 %.2f ms, p99 %.2f ms, max %.2f ms (bar p99 <= 10 ms) %s"
          % (len(commits), missing, p50, p99, lat[-1], "PASS" if p99 <= 10 and not missing else "FAIL"))
    ok = ok and p99 <= 10 and not missing
proc.terminate(); proc.wait(15)
raise SystemExit(0 if ok else 1)
PYEOF
