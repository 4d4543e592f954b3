"""bin/migrate against a real PostgreSQL: applies once, is a no-op the
second time, refuses a changed or missing applied file, applies a new file
alone, and two concurrent runs never both apply a migration."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import BINDIR, ROOT  # noqa: E402
from pgtmp import PgTmp  # noqa: E402

MIGRATIONS = os.path.join(ROOT, "database", "migrations")


class Migrate(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pg = PgTmp()

    @classmethod
    def tearDownClass(cls):
        cls.pg.cleanup()

    def setUp(self):
        self.db = "m_%s" % self.id().rsplit(".", 1)[-1].lower()
        conn = self.pg.connect()
        conn.cursor().execute('DROP DATABASE IF EXISTS "%s"' % self.db)
        conn.cursor().execute('CREATE DATABASE "%s"' % self.db)
        conn.close()
        self.dir = tempfile.mkdtemp(prefix="migrations-")
        for name in os.listdir(MIGRATIONS):
            shutil.copy(os.path.join(MIGRATIONS, name), self.dir)

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def migrate(self, *args):
        env = dict(os.environ, DATABASE_URL=self.pg.url(self.db), LOG_FORMAT="json")
        return subprocess.run([os.path.join(BINDIR, "migrate"), "--dir", self.dir] + list(args), env=env,
                              capture_output=True, text=True, timeout=60)

    def query(self, sql):
        import psycopg2
        conn = psycopg2.connect(self.pg.url(self.db))
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return cur.fetchall()
        finally:
            conn.close()

    def test_applies_once_then_noop(self):
        files = sorted(f for f in os.listdir(self.dir) if f.endswith(".sql"))
        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("applied %d migrations" % len(files), r.stdout)
        rows = self.query("SELECT name, length(checksum) FROM schema_migrations ORDER BY version")
        self.assertEqual([n for n, _ in rows], files)
        self.assertTrue(all(l == 64 for _, l in rows))
        self.assertEqual(self.query("SELECT to_regclass('public.events') IS NOT NULL")[0][0], True)
        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("up to date", r.stdout)
        self.assertEqual(self.query("SELECT count(*) FROM schema_migrations")[0][0], len(files))

    def test_refuses_changed_file(self):
        self.assertEqual(self.migrate().returncode, 0)
        first = sorted(os.listdir(self.dir))[0]
        with open(os.path.join(self.dir, first), "a") as f:
            f.write("\n-- edited after it was applied\n")
        with open(os.path.join(self.dir, "9001_new.sql"), "w") as f:
            f.write("CREATE TABLE should_not_exist (x int);\n")
        r = self.migrate()
        self.assertEqual(r.returncode, 1)
        self.assertIn("changed", r.stderr)
        self.assertIn(first, r.stderr)
        self.assertEqual(self.query("SELECT to_regclass('public.should_not_exist')")[0][0], None)

    def test_refuses_missing_file_and_bad_names(self):
        self.assertEqual(self.migrate().returncode, 0)
        with open(os.path.join(self.dir, "bad-name.sql"), "w") as f:
            f.write("SELECT 1;\n")
        r = self.migrate()
        self.assertEqual(r.returncode, 1)
        self.assertIn("bad-name.sql", r.stderr)
        os.unlink(os.path.join(self.dir, "bad-name.sql"))
        os.unlink(os.path.join(self.dir, sorted(os.listdir(self.dir))[-1]))
        r = self.migrate()
        self.assertEqual(r.returncode, 1)
        self.assertIn("missing", r.stderr)

    def test_new_file_applied_alone_and_failure_rolls_back(self):
        self.assertEqual(self.migrate().returncode, 0)
        with open(os.path.join(self.dir, "9001_add.sql"), "w") as f:
            f.write("CREATE TABLE added_later (x int);\n")
        r = self.migrate()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("applied 1 migrations", r.stdout)
        with open(os.path.join(self.dir, "9002_broken.sql"), "w") as f:
            f.write("CREATE TABLE half_done (x int);\nTHIS IS NOT SQL;\n")
        r = self.migrate()
        self.assertEqual(r.returncode, 1)
        self.assertIn("9002_broken.sql", r.stderr)
        self.assertEqual(self.query("SELECT to_regclass('public.half_done')")[0][0], None)
        self.assertEqual(self.query("SELECT count(*) FROM schema_migrations WHERE version = 9002")[0][0], 0)

    def test_concurrent_runs_apply_each_once(self):
        with open(os.path.join(self.dir, "9001_slow.sql"), "w") as f:
            f.write("SELECT pg_sleep(1);\nCREATE TABLE slow_counter (x int);\nINSERT INTO slow_counter VALUES (1);\n")
        results = []

        def run():
            results.append(self.migrate())
        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([r.returncode for r in results], [0, 0], [r.stderr for r in results])
        self.assertEqual(self.query("SELECT count(*) FROM slow_counter")[0][0], 1)
        self.assertEqual(self.query("SELECT count(*) FROM schema_migrations WHERE version = 9001")[0][0], 1)
        self.assertTrue(any("up to date" in r.stdout for r in results))

    def test_events_insert_notifies(self):
        import psycopg2
        import select
        self.assertEqual(self.migrate().returncode, 0)
        listener = psycopg2.connect(self.pg.url(self.db))
        listener.autocommit = True
        listener.cursor().execute("LISTEN new_event")
        writer = psycopg2.connect(self.pg.url(self.db))
        with writer:
            writer.cursor().execute("INSERT INTO events (id, chain_id, registry, event_type) "
                                    "VALUES ('ev-notify-1', 1, 'identity', 'AgentRegistered')")
        writer.close()
        self.assertNotEqual(select.select([listener], [], [], 5), ([], [], []))
        listener.poll()
        self.assertEqual([n.payload for n in listener.notifies], ["ev-notify-1"])
        listener.close()


if __name__ == "__main__":
    unittest.main()
