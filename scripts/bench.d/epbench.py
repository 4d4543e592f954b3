"""epbench: what the event-processor benchmarks (40-event-processor.sh and
45-trigger-limits.sh) share, imported by their embedded Python: the events
table's columns, the private Redis and the processor under test, a job
drainer, the first-job watcher, inserts paced at a rate, the backlog
release and the latency figures.

The environment is the scripts' (DB_URL, REDIS_PORT, METRICS_PORT, BINDIR,
WORK, ROOT)."""
import atexit
import multiprocessing
import os
import subprocess
import threading
import time
import urllib.request

import redis

COLS = ["id", "chain_id", "registry", "event_type", "agent_id", "score", "timestamp", "client_address", "tag1",
        "tag2", "block_number", "transaction_hash", "log_index"]
_QCOLS = ",".join('"%s"' % x for x in COLS)
# One event per statement, and many per statement (psycopg2.extras.execute_values).
INSERT_ONE = "INSERT INTO events (%s) VALUES (%s)" % (_QCOLS, ",".join(["%s"] * len(COLS)))


def insert_many(table):
    return "INSERT INTO %s (%s) VALUES %%s" % (table, _QCOLS)


# The lock the processor takes before it drains (held here, it waits).
PROCESSOR_LOCK = 8004000002


def mono():
    """CLOCK_MONOTONIC: the watcher process and the inserting one compare it."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def redis_port():
    return int(os.environ["REDIS_PORT"])


def wait_redis():
    """The private Redis, once it answers PING (up to 5 s)."""
    r = redis.Redis(port=redis_port())
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return r


def metrics_get(path):
    """(status, body) of GET path on the processor's metrics port."""
    with urllib.request.urlopen("http://127.0.0.1:%s%s" % (os.environ["METRICS_PORT"], path), timeout=2) as h:
        return h.status, h.read().decode()


def start_processor(db, log_level="warn"):
    """bin/event-processor on database db and the private Redis, logging to
    WORK/event-processor.log; returns its Popen once /health answers 200
    (exits the benchmark after 20 s without). Killed at exit if still up."""
    env = dict(os.environ, DATABASE_URL=db, REDIS_URL="redis://127.0.0.1:%d/0" % redis_port(),
               METRICS_PORT=os.environ["METRICS_PORT"], LOG_LEVEL=log_level,
               MIGRATIONS_DIR=os.path.join(os.environ["ROOT"], "database/migrations"))
    log = open(os.path.join(os.environ["WORK"], "event-processor.log"), "wb")
    proc = subprocess.Popen([os.path.join(os.environ["BINDIR"], "event-processor")], env=env, stdout=log,
                            stderr=log)
    proc.log_path = log.name
    atexit.register(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
    t = time.time()
    while True:
        try:
            if metrics_get("/health")[0] == 200:
                return proc
        except OSError:
            pass
        if time.time() - t > 20:
            raise SystemExit("event-processor did not become healthy")
        time.sleep(0.05)


class Drainer:
    """Empties action_jobs every 20 ms while running (the jobs of a backlog
    would not fit in memory), and once more when stopped; count is the
    number of jobs taken."""

    def __init__(self):
        self.count = 0
        self._stop = threading.Event()
        self._th = None

    def _take(self, rr):
        p = rr.pipeline(transaction=True)
        p.llen("action_jobs")
        p.unlink("action_jobs")
        self.count += p.execute()[0]

    def _run(self):
        rr = redis.Redis(port=redis_port())
        while not self._stop.is_set():
            self._take(rr)
            time.sleep(0.02)
        self._take(rr)

    def start(self):
        self._stop.clear()
        self._th = threading.Thread(target=self._run)
        self._th.start()

    def stop(self):
        self._stop.set()
        self._th.join()


def release_and_drain(lock, cur, poll_s):
    """Releases the processor lock held on connection lock, then waits (on
    cursor cur) until the event queue and the job outbox are empty."""
    lock.cursor().execute("SELECT pg_advisory_unlock(%d)" % PROCESSOR_LOCK)
    while True:
        cur.execute("SELECT EXISTS (SELECT 1 FROM event_queue) OR EXISTS (SELECT 1 FROM job_outbox)")
        if not cur.fetchone()[0]:
            return
        time.sleep(poll_s)


def _watch(port, out, ready, stop_ev, only):
    # It blocks in BRPOP, then takes everything queued in one MULTI (LRANGE +
    # DEL), and stamps each event's first job with CLOCK_MONOTONIC.
    rr = redis.Redis(port=port)
    seen = {}
    ready.set()
    key = b'"event_id":"'
    while not stop_ev.is_set():
        first = rr.brpop("action_jobs", timeout=0.2)
        if first is None:
            continue
        now = mono()
        p = rr.pipeline(transaction=True)
        p.lrange("action_jobs", 0, -1)
        p.delete("action_jobs")
        jobs = [first[1]] + p.execute()[0]
        now2 = mono()
        for k, j in enumerate(jobs):
            if only is not None and only not in j:
                continue
            i = j.index(key) + len(key)
            seen.setdefault(j[i:j.index(b'"', i)].decode(), now if k == 0 else now2)
    out.put(seen)


class Watcher:
    """The time each event's first job reached action_jobs, taken by a
    separate process (a thread would share the GIL with the inserting loop
    and see the jobs late). only: a byte string a job must hold to count."""

    def __init__(self, only=None, daemon=False):
        self._out = multiprocessing.Queue()
        self._stop = multiprocessing.Event()
        ready = multiprocessing.Event()
        self._p = multiprocessing.Process(target=_watch, args=(redis_port(), self._out, ready, self._stop, only),
                                          daemon=daemon)
        self._p.start()
        ready.wait(10)

    def finish(self):
        """Stops it; returns {event id: monotonic time of its first job}."""
        self._stop.set()
        seen = self._out.get(timeout=30)
        self._p.join(10)
        return seen


def paced(cursor, rows, rate=1000.0):
    """Inserts rows one per statement at `rate` per second; returns
    {event id: monotonic time its commit returned}."""
    commits = {}
    start = mono()
    for i, row in enumerate(rows):
        d = start + i / rate - mono()
        if d > 0:
            time.sleep(d)
        cursor.execute(INSERT_ONE, row)
        commits[row[0]] = mono()
    return commits


def latencies(commits, seen):
    """(sorted commit-to-first-job ms of the events seen, missing, p50, p99);
    p50 and p99 are None when none was seen."""
    lat = sorted(max(0.0, seen[e] - commits[e]) * 1000 for e in commits if e in seen)
    if not lat:
        return lat, len(commits), None, None
    return lat, len(commits) - len(lat), lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
