"""Shared set-up for the action-workers integration and end-to-end tests:
own database (ae_test_aw) and Redis db (2), migrations, starting binaries,
pushing jobs, reading results."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid

import psycopg2
import redis

from pgtmp import free_port  # noqa: F401  (its users call awharness.free_port)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "peers"))

BINDIR = os.path.abspath(os.path.join(ROOT, os.environ.get("BINDIR", "bin")))
# action-workers built with fault injection (make tests; -DAE_FAULTS).
FAULT_BIN = os.path.abspath(os.path.join(ROOT, os.environ.get("O", "build"), "tests", "action-workers-faults"))
# The local servers tests/run.sh started (TEST_DATABASE_URL, TEST_REDIS_URL:
# their ports follow AE_PG_PORT and AE_REDIS_PORT), unless AW_TEST_* say
# otherwise.
_pg = urllib.parse.urlsplit(os.environ.get("TEST_DATABASE_URL",
                                           "postgres://erc8004:erc8004@127.0.0.1:%s/x" % os.environ.get("AE_PG_PORT", "55432")))
_rd = urllib.parse.urlsplit(os.environ.get("TEST_REDIS_URL",
                                           "redis://127.0.0.1:%s/0" % os.environ.get("AE_REDIS_PORT", "56379")))
PG_HOST = os.environ.get("AW_TEST_PG_HOST", _pg.hostname or "127.0.0.1")
PG_PORT = os.environ.get("AW_TEST_PG_PORT", str(_pg.port or 5432))
PG_USER = os.environ.get("AW_TEST_PG_USER", _pg.username or "erc8004")
PG_PASS = os.environ.get("AW_TEST_PG_PASSWORD", _pg.password or "erc8004")
DB_NAME = os.environ.get("AW_TEST_DB", "ae_test_aw")
REDIS_URL = os.environ.get("AW_TEST_REDIS", "redis://%s:%d/2" % (_rd.hostname or "127.0.0.1", _rd.port or 6379))
DATABASE_URL = "postgresql://%s:%s@%s:%s/%s" % (PG_USER, PG_PASS, PG_HOST, PG_PORT, DB_NAME)
TOKEN = "123456:TEST-token"


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


_prepared = False


def prepare_db():
    """Creates ae_test_aw when missing and applies the migrations with
    bin/migrate. Raises (the test fails) when anything is missing."""
    global _prepared
    if _prepared:
        return
    admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASS, dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as c:
        c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
        if not c.fetchone():
            c.execute('CREATE DATABASE "%s"' % DB_NAME)
    admin.close()
    if os.environ.get("AW_TEST_NO_MIGRATE") != "1":
        migrate(DATABASE_URL)
    _prepared = True


def migrate(url):
    """Applies the migrations to the database at `url` with bin/migrate;
    raises (the test fails) when that fails."""
    env = dict(os.environ, DATABASE_URL=url, MIGRATIONS_DIR=os.path.join(ROOT, "database", "migrations"))
    r = subprocess.run([os.path.join(BINDIR, "migrate")], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("bin/migrate failed: %s %s" % (r.stdout, r.stderr))


def db():
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    return conn


def table_exists(conn, name):
    with conn.cursor() as c:
        c.execute("SELECT to_regclass(%s)", (name,))
        return c.fetchone()[0] is not None


def ensure_refs(conn, trigger_id, event_ids, name="aw test trigger", chat_id=None):
    """Creates the user, trigger and event rows that action_results may
    reference (when the tables exist), so foreign keys hold."""
    with conn.cursor() as c:
        if table_exists(conn, "users") and table_exists(conn, "triggers"):
            uid = "aw-user-" + trigger_id
            c.execute("INSERT INTO users (id, username, email, password_hash, telegram_chat_id) VALUES (%s,%s,%s,'x',%s) "
                      "ON CONFLICT DO NOTHING", (uid, uid, uid + "@example.test", chat_id))
            c.execute("INSERT INTO triggers (id, user_id, name, chain_id, registry, enabled) VALUES (%s,%s,%s,1,'reputation',true) "
                      "ON CONFLICT DO NOTHING", (trigger_id, uid, name))
        if table_exists(conn, "events"):
            for eid in event_ids:
                c.execute("INSERT INTO events (id, chain_id, block_number, block_hash, transaction_hash, log_index, registry, "
                          "event_type, agent_id, timestamp) VALUES (%s,1,1,'0xb','0xt',0,'reputation','NewFeedback',42,0) "
                          "ON CONFLICT DO NOTHING", (eid,))


def results(conn, job_id):
    with conn.cursor() as c:
        c.execute("SELECT status, retry_count, error_message, response_data, duration_ms, action_type, trigger_id, event_id "
                  "FROM action_results WHERE job_id = %s ORDER BY retry_count", (job_id,))
        cols = ["status", "retry_count", "error_message", "response_data", "duration_ms", "action_type", "trigger_id", "event_id"]
        return [dict(zip(cols, r)) for r in c.fetchall()]


def wait_results(conn, job_id, pred, timeout=20.0):
    end = time.time() + timeout
    rows = []
    while time.time() < end:
        rows = results(conn, job_id)
        if pred(rows):
            return rows
        time.sleep(0.05)
    return rows


def rds(url=REDIS_URL):
    return redis.Redis.from_url(url, decode_responses=True)


def make_event(**kw):
    ev = {"id": "ev-" + uuid.uuid4().hex[:12], "chain_id": 1, "block_number": 100, "block_hash": "0xblock",
          "transaction_hash": "0xabc123", "log_index": 0, "registry": "reputation", "event_type": "NewFeedback",
          "agent_id": 42, "timestamp": 1700000000, "client_address": "0xclient", "score": 87,
          "tag1": "quality", "tag2": "speed"}
    ev.update(kw)
    return ev


def make_job(action_type, config, event=None, trigger_id=None, **kw):
    event = event or make_event()
    job = {"id": "job-" + uuid.uuid4().hex, "trigger_id": trigger_id or "trg-" + uuid.uuid4().hex[:10],
           "event_id": event["id"], "action_type": action_type, "priority": 1, "config": config, "event": event,
           "created_at": "2024-01-01T00:00:00Z", "attempt": 0}
    job.update(kw)
    return job


class Worker:
    """bin/action-workers as a child process."""

    def __init__(self, queue, redis_url=REDIS_URL, binary=None, **env):
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "DATABASE_URL": DATABASE_URL, "REDIS_URL": redis_url, "ACTION_QUEUE": queue,
            "METRICS_PORT": str(self.port), "METRICS_HOST": "127.0.0.1", "TELEGRAM_BOT_TOKEN": TOKEN,
            "ALLOWED_TARGETS": "127.0.0.1", "LOG_LEVEL": "info", "RETRY_BASE_MS": "200",
            "JOB_VISIBILITY_TIMEOUT": "30s", "WORKER_POLL_MS": "10",
        })
        self.env.update({k: str(v) for k, v in env.items()})
        self.log = open("/tmp/aw-test-%s-%d.log" % (queue.replace(":", "_"), self.port), "w")
        self.proc = subprocess.Popen([binary or os.path.join(BINDIR, "action-workers")], env=self.env, cwd="/tmp",
                                     stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_port(self.port):
            raise RuntimeError("action-workers did not start; see " + self.log.name)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise
        return self.proc.returncode


def push(r, queue, job):
    r.lpush(queue, json.dumps(job))
