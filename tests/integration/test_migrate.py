"""bin/migrate against the shared local PostgreSQL (scripts/servers.sh), each
test in a database of its own (mig_test_<random>, created with the erc8004
role, which needs CREATEDB, and dropped afterwards), so that the shared
schema is never touched: applies once, is a no-op the second time, refuses a
changed or missing applied file and bad names, applies a new file alone,
rolls a failing file back, two concurrent runs apply each migration once,
and the schema's NOTIFY and queue triggers fire.

    BINDIR=/tmp/build/bin /usr/bin/python3 -m unittest -v tests/integration/test_migrate.py
"""

import hashlib
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse

import psycopg2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import BINDIR, DATABASE_URL, ROOT  # noqa: E402

MIGRATIONS = os.path.join(ROOT, "database", "migrations")
LOCK_KEY = 0x61652d6d696772  # MIGRATE_LOCK_KEY in libshared/migrate.h

ERC8004_TABLES = ["users", "triggers", "trigger_conditions", "trigger_actions", "trigger_state", "events",
                  "checkpoints", "action_results", "agent_mcp_tokens", "event_queue", "job_outbox"]


def db_url(name):
    """DATABASE_URL with its database replaced by `name`."""
    u = urllib.parse.urlsplit(DATABASE_URL)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + name, u.query, u.fragment))


def admin():
    conn = psycopg2.connect(DATABASE_URL)
    conn.autocommit = True
    return conn


def log_records(stderr):
    """The JSON log lines of a run."""
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


class Migrate(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            conn = admin()
        except psycopg2.OperationalError as e:
            raise AssertionError("shared PostgreSQL at %s is not reachable (scripts/servers.sh start pg): %s"
                                 % (DATABASE_URL, e))
        with conn, conn.cursor() as cur:
            cur.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
            ok = cur.fetchone()[0]
        conn.close()
        if not ok:
            raise AssertionError("the role of %s lacks CREATEDB, which these tests need "
                                 "(ALTER ROLE ... CREATEDB in scripts/servers.sh)" % DATABASE_URL)

    def setUp(self):
        self.db = "mig_test_%s" % secrets.token_hex(6)
        conn = admin()
        conn.cursor().execute('CREATE DATABASE "%s"' % self.db)
        conn.close()
        self.addCleanup(self.drop_db)
        self.dir = tempfile.mkdtemp(prefix="migrations-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for name in os.listdir(MIGRATIONS):
            shutil.copy(os.path.join(MIGRATIONS, name), self.dir)
        self.files = sorted(f for f in os.listdir(self.dir) if f.endswith(".sql"))

    def drop_db(self):
        conn = admin()
        conn.cursor().execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.db)
        conn.close()

    def write(self, name, text):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(text)

    def env(self):
        env = dict(os.environ, DATABASE_URL=db_url(self.db), LOG_FORMAT="json", LOG_LEVEL="info")
        env.pop("MIGRATIONS_DIR", None)
        return env

    def migrate(self, *args):
        return subprocess.run([os.path.join(BINDIR, "migrate"), "--dir", self.dir] + list(args), env=self.env(),
                              capture_output=True, text=True, timeout=60)

    def spawn(self):
        return subprocess.Popen([os.path.join(BINDIR, "migrate"), "--dir", self.dir], env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def connect(self):
        return psycopg2.connect(db_url(self.db))

    def query(self, sql, args=None):
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    def applied(self):
        return self.query("SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")

    def assert_refused(self, r, *words):
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        last = r.stderr.strip().splitlines()[-1]
        self.assertTrue(last.startswith("migrate: "), last)
        for w in words:
            self.assertIn(w, last)
        return last

    # ------------------------------------------------------------ tests

    def test_applies_once_then_noop(self):
        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "applied %d migrations" % len(self.files))
        rows = self.applied()
        self.assertEqual([n for _, n, _, _ in rows], self.files)
        for version, name, checksum, _ in rows:
            with open(os.path.join(self.dir, name), "rb") as f:
                self.assertEqual(checksum, hashlib.sha256(f.read()).hexdigest(), name)
            self.assertEqual(version, int(name.split("_", 1)[0]))
        recs = log_records(r.stderr)
        self.assertEqual(sorted(x.get("migration") for x in recs if x.get("msg") == "migration applied"),
                         self.files)
        # SPEC 1: TimescaleDB is used when installed, skipped with a log line when not.
        self.assertTrue(any(x.get("msg") == "migration notice" and "timescaledb" in x.get("notice", "")
                            and x.get("migration") == "0001_erc8004.sql" for x in recs), r.stderr)
        present = self.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        for t in ERC8004_TABLES:
            self.assertIn((t,), present)

        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "up to date")
        self.assertEqual(self.applied(), rows)

    def test_status_lists_applied_and_pending(self):
        r = self.migrate("--status")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split(), [w for f in self.files for w in ("pending", f)])
        self.assertEqual(self.query("SELECT to_regclass('public.events')")[0][0], None)
        self.assertEqual(self.migrate().returncode, 0)
        self.write("9001_more.sql", "CREATE TABLE more (x int);\n")
        r = self.migrate("--status")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.split(), [w for f in self.files for w in ("applied", f)] + ["pending",
                                                                                              "9001_more.sql"])

    def test_refuses_changed_file_and_applies_nothing(self):
        self.assertEqual(self.migrate().returncode, 0)
        before = self.applied()
        first = self.files[0]
        with open(os.path.join(self.dir, first), "a") as f:
            f.write("\n-- edited after it was applied\n")
        self.write("9001_new.sql", "CREATE TABLE should_not_exist (x int);\n")
        self.assert_refused(self.migrate(), "changed", first)
        self.assertEqual(self.query("SELECT to_regclass('public.should_not_exist')")[0][0], None)
        self.assertEqual(self.applied(), before)
        self.assert_refused(self.migrate("--status"), "changed", first)

    def test_refuses_missing_file_bad_names_and_duplicates(self):
        self.assertEqual(self.migrate().returncode, 0)
        before = self.applied()
        self.write("9001_new.sql", "CREATE TABLE should_not_exist (x int);\n")
        for bad in ("bad-name.sql", "12_short.sql", "0003 space.sql"):
            self.write(bad, "SELECT 1;\n")
            self.assert_refused(self.migrate(), bad, "not a migration name")
            os.unlink(os.path.join(self.dir, bad))
        self.write("9001_again.sql", "SELECT 1;\n")
        self.assert_refused(self.migrate(), "9001_again.sql", "9001_new.sql", "version 9001")
        os.unlink(os.path.join(self.dir, "9001_again.sql"))
        os.mkdir(os.path.join(self.dir, "9002_dir.sql"))
        self.assert_refused(self.migrate(), "9002_dir.sql", "not a regular file")
        os.rmdir(os.path.join(self.dir, "9002_dir.sql"))
        os.unlink(os.path.join(self.dir, self.files[-1]))
        self.assert_refused(self.migrate(), "missing", self.files[-1])
        self.assertEqual(self.query("SELECT to_regclass('public.should_not_exist')")[0][0], None)
        self.assertEqual(self.applied(), before)

    def test_new_file_applied_alone_and_failure_rolls_back(self):
        self.assertEqual(self.migrate().returncode, 0)
        before = self.applied()
        self.write("9001_add.sql", "-- a later migration\nCREATE TABLE added_later (x int);\n"
                                   "INSERT INTO added_later VALUES (1), (2);\n")
        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "applied 1 migrations")
        self.assertEqual(self.applied()[:-1], before)
        self.assertEqual(self.applied()[-1][1], "9001_add.sql")
        self.assertEqual(self.query("SELECT count(*) FROM added_later")[0][0], 2)

        self.write("9002_broken.sql", "CREATE TABLE half_done (x int);\nTHIS IS NOT SQL;\n")
        self.write("9003_after.sql", "CREATE TABLE after_broken (x int);\n")
        r = self.migrate()
        last = self.assert_refused(r, "9002_broken.sql", "line 2", "syntax error", "rolled back")
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)  # one line, no libpq LINE/caret
        self.assertNotIn("\n", last)
        self.assertEqual(self.query("SELECT to_regclass('public.half_done')")[0][0], None)
        self.assertEqual(self.query("SELECT to_regclass('public.after_broken')")[0][0], None)
        self.assertEqual(self.query("SELECT count(*) FROM schema_migrations WHERE version >= 9002")[0][0], 0)

    def test_file_that_commits_itself_is_not_recorded(self):
        self.assertEqual(self.migrate().returncode, 0)
        self.write("9001_own_tx.sql", "COMMIT;\nCREATE TABLE own_tx (x int);\n")
        self.assert_refused(self.migrate(), "9001_own_tx.sql", "BEGIN/COMMIT")
        self.assertEqual(self.query("SELECT count(*) FROM schema_migrations WHERE version = 9001")[0][0], 0)

    def test_concurrent_runs_started_together_apply_each_once(self):
        self.write("9001_slow.sql", "SELECT pg_sleep(1);\nCREATE TABLE slow_counter (x int);\n"
                                    "INSERT INTO slow_counter VALUES (1);\n")
        results = []

        def run():
            results.append(self.migrate())
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([r.returncode for r in results], [0, 0], [r.stderr for r in results])
        self.assertEqual(sorted(r.stdout.strip() for r in results),
                         ["applied %d migrations" % (len(self.files) + 1), "up to date"])
        self.assertEqual(self.query("SELECT count(*) FROM slow_counter")[0][0], 1)
        self.assertEqual(self.query("SELECT count(*) FROM schema_migrations")[0][0], len(self.files) + 1)

    def test_runs_wait_for_the_lock_then_apply_once(self):
        """Deterministic contention: the test holds the lock until both runs
        are seen waiting for it in pg_locks."""
        self.write("9001_slow.sql", "SELECT pg_sleep(0.5);\nCREATE TABLE slow_counter (x int);\n"
                                    "INSERT INTO slow_counter VALUES (1);\n")
        holder = self.connect()
        holder.autocommit = True
        holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        procs = [self.spawn(), self.spawn()]
        try:
            deadline = time.monotonic() + 20
            waiting = 0
            while time.monotonic() < deadline:
                waiting = self.query(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                    "AND classid = %s AND objid = %s AND objsubid = 1",
                    (LOCK_KEY >> 32, LOCK_KEY & 0xffffffff))[0][0]
                if waiting == 2:
                    break
                time.sleep(0.05)
            self.assertEqual(waiting, 2, "both runs should wait for the migration lock")
            self.assertEqual(self.query("SELECT to_regclass('public.schema_migrations')")[0][0], None)
        finally:
            holder.cursor().execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
            holder.close()
        outs = [p.communicate(timeout=60) for p in procs]
        self.assertEqual([p.returncode for p in procs], [0, 0], [e for _, e in outs])
        self.assertEqual(sorted(o.strip() for o, _ in outs),
                         ["applied %d migrations" % (len(self.files) + 1), "up to date"])
        for _, err in outs:
            self.assertTrue(any(x.get("msg", "").startswith("waiting for the migration lock")
                                for x in log_records(err)), err)
        self.assertEqual(self.query("SELECT count(*) FROM slow_counter")[0][0], 1)
        # The lock is free again.
        self.assertEqual(self.query("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))[0][0], True)

    def test_events_insert_notifies_and_queues_at_commit(self):
        self.assertEqual(self.migrate().returncode, 0)
        listener = self.connect()
        listener.autocommit = True
        listener.cursor().execute("LISTEN new_event")
        writer = self.connect()
        try:
            cur = writer.cursor()
            cur.execute("INSERT INTO events (id, chain_id, registry, event_type, agent_id) "
                        "VALUES ('ev-notify-1', 1, 'identity', 'AgentRegistered', 7), "
                        "('ev-notify-2', 1, 'reputation', 'NewFeedback', 7)")
            # Not committed: neither the notification nor the queue rows are visible.
            self.assertEqual(select.select([listener], [], [], 0.3), ([], [], []))
            self.assertEqual(self.query("SELECT count(*) FROM event_queue")[0][0], 0)
            writer.commit()
            payloads = []
            deadline = time.monotonic() + 5
            while len(payloads) < 2 and time.monotonic() < deadline:
                select.select([listener], [], [], 0.5)
                listener.poll()
                while listener.notifies:
                    n = listener.notifies.pop(0)
                    self.assertEqual(n.channel, "new_event")
                    payloads.append(n.payload)
            self.assertEqual(sorted(payloads), ["ev-notify-1", "ev-notify-2"])
            self.assertEqual(self.query("SELECT event_id FROM event_queue ORDER BY seq"),
                             [("ev-notify-1",), ("ev-notify-2",)])
            cur.execute("INSERT INTO events (id, chain_id, registry, event_type) "
                        "VALUES ('ev-rolled-back', 1, 'identity', 'AgentRegistered')")
            writer.rollback()
            self.assertEqual(self.query("SELECT count(*) FROM event_queue")[0][0], 2)
            # A replayed ingest (the gateway's ON CONFLICT (id) DO NOTHING) neither
            # queues nor notifies the event again; the new one in the batch does both.
            cur.execute("INSERT INTO events (id, chain_id, registry, event_type) "
                        "VALUES ('ev-notify-1', 1, 'identity', 'AgentRegistered'), "
                        "('ev-notify-3', 1, 'identity', 'MetadataSet') ON CONFLICT (id) DO NOTHING")
            writer.commit()
            self.assertEqual(self.query("SELECT event_id FROM event_queue ORDER BY seq"),
                             [("ev-notify-1",), ("ev-notify-2",), ("ev-notify-3",)])
            select.select([listener], [], [], 2)
            time.sleep(0.2)
            listener.poll()
            self.assertEqual([n.payload for n in listener.notifies], ["ev-notify-3"])
        finally:
            writer.close()
            listener.close()

    def test_schema_constraints(self):
        self.assertEqual(self.migrate().returncode, 0)
        conn = self.connect()
        conn.autocommit = True
        cur = conn.cursor()
        try:
            cur.execute("INSERT INTO users (username, email, password_hash) VALUES ('Alice', 'Alice@x.io', 'h') "
                        "RETURNING id")
            uid = cur.fetchone()[0]
            self.assertEqual(len(uid), 36)  # gen_random_uuid() as text
            for sql in ("INSERT INTO users (username, email, password_hash) VALUES ('alice', 'b@x.io', 'h')",
                        "INSERT INTO users (username, email, password_hash) VALUES ('bob', 'alice@X.IO', 'h')"):
                with self.assertRaises(psycopg2.errors.UniqueViolation):
                    cur.execute(sql)
            bad = [
                ("INSERT INTO triggers (user_id, name, chain_id, registry) VALUES (%s, 't', 1, 'nope')", (uid,)),
                ("INSERT INTO events (id, chain_id, registry, event_type) VALUES ('e', 1, 'identity', 'Nope')",
                 None),
                ("INSERT INTO action_results (job_id, action_type, status) VALUES ('j', 'rest', 'weird')", None),
            ]
            for sql, args in bad:
                with self.assertRaises(psycopg2.errors.CheckViolation):
                    cur.execute(sql, args)
            cur.execute("INSERT INTO triggers (user_id, name, chain_id, registry) VALUES (%s, 't', 84532, "
                        "'reputation') RETURNING id", (uid,))
            tid = cur.fetchone()[0]
            with self.assertRaises(psycopg2.errors.CheckViolation):
                cur.execute("INSERT INTO trigger_actions (trigger_id, action_type, config) VALUES (%s, 'sms', '{}')",
                            (tid,))
            cur.execute("INSERT INTO trigger_actions (trigger_id, action_type, config) VALUES (%s, 'telegram', "
                        "'{}') RETURNING priority", (tid,))
            self.assertEqual(cur.fetchone()[0], 1)
            cur.execute("INSERT INTO trigger_conditions (trigger_id, condition_type, field, operator, value) "
                        "VALUES (%s, 'score_threshold', 'score', '>', '50')", (tid,))
            cur.execute("INSERT INTO trigger_state (trigger_id, state_data) VALUES (%s, '{\"ema\": 1}')", (tid,))
            cur.execute("DELETE FROM triggers WHERE id = %s", (tid,))
            for t in ("trigger_actions", "trigger_conditions", "trigger_state"):
                cur.execute("SELECT count(*) FROM %s" % t)
                self.assertEqual(cur.fetchone()[0], 0, t)
        finally:
            conn.close()


if __name__ == "__main__":
    unittest.main()
