"""The foundation's promises, against real servers: the gateway's health
route follows PostgreSQL down and back up without a database round trip per
request, configuration errors stop start-up with a clear line, SIGTERM exits
0, the skeleton services answer their health routes, and logs are JSON."""

import os
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import AMQP_URL, BINDIR, DATABASE_URL, REDIS_URL, Service, http, http_json, wait_for  # noqa: E402
from pgtmp import PgTmp, free_port  # noqa: E402
from tools import need  # noqa: E402


class GatewayHealthFollowsPostgres(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pg = PgTmp()
        cls.port = free_port()
        cls.base = "http://127.0.0.1:%d" % cls.port
        cls.gw = Service("api-gateway", {
            "SERVER_PORT": cls.port, "SERVER_HOST": "127.0.0.1", "DATABASE_URL": cls.pg.url(),
            "HEALTH_CHECK_INTERVAL": "200ms", "JWT_SECRET": "test-secret"},
            health=cls.base + "/api/v1/health", health_status=200).start()

    @classmethod
    def tearDownClass(cls):
        cls.gw.stop()
        cls.pg.cleanup()

    def test_healthy_body_and_headers(self):
        status, headers, body = http_json("GET", self.base + "/api/v1/health")
        self.assertEqual(status, 200)
        self.assertEqual(body, {"status": "healthy", "database": "connected", "version": "0.1.0"})
        self.assertIn("x-request-id", headers)
        self.assertEqual(headers["content-type"], "application/json")

    def test_liveness_and_metrics(self):
        status, _, body = http_json("GET", self.base + "/health")
        self.assertEqual((status, body["status"], body["service"]), (200, "ok", "api-gateway"))
        status, headers, text = http("GET", self.base + "/metrics")
        self.assertEqual(status, 200)
        self.assertIn("text/plain", headers["content-type"])
        self.assertIn(b"http_requests_total{", text)

    def test_metrics_pass_promtool(self):
        """SPEC: GET /metrics is validated by `promtool check metrics`."""
        for _ in range(3):
            http("GET", self.base + "/api/v1/health")
            http("GET", self.base + "/nope")
        _, _, text = http("GET", self.base + "/metrics")
        r = subprocess.run([need("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_migrations_applied_at_start(self):
        conn = self.pg.connect()
        try:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM schema_migrations")
            self.assertGreaterEqual(cur.fetchone()[0], 1)
            cur.execute("SELECT to_regclass('public.events') IS NOT NULL")
            self.assertTrue(cur.fetchone()[0])
        finally:
            conn.close()

    def test_no_round_trip_per_request(self):
        """1000 health requests must not run 1000 queries: count the
        statements PostgreSQL saw from the gateway's connections."""
        conn = self.pg.connect()
        try:
            cur = conn.cursor()
            cur.execute("SELECT coalesce(sum(xact_commit + xact_rollback), 0) FROM pg_stat_database")
            before = cur.fetchone()[0]
            for _ in range(1000):
                http("GET", self.base + "/api/v1/health")
            time.sleep(0.6)  # let the stats collector catch up
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT coalesce(sum(xact_commit + xact_rollback), 0) FROM pg_stat_database")
            after = cur.fetchone()[0]
        finally:
            conn.close()
        self.assertLess(after - before, 200)

    def test_zz_503_while_down_then_200(self):
        self.pg.stop()
        try:
            wait_for(lambda: http("GET", self.base + "/api/v1/health")[0] == 503, timeout=15,
                     what="503 while PostgreSQL is down")
            status, _, body = http_json("GET", self.base + "/api/v1/health")
            self.assertEqual(body["status"], "unhealthy")
            self.assertEqual(body["database"], "disconnected")
            # The service itself keeps answering other routes.
            self.assertEqual(http("GET", self.base + "/health")[0], 200)
        finally:
            self.pg.start()
        wait_for(lambda: http("GET", self.base + "/api/v1/health")[0] == 200, timeout=15,
                 what="200 after PostgreSQL is back")
        logs = [r for r in self.gw.log_lines() if r.get("msg") == "dependency is unavailable"]
        self.assertGreaterEqual(len(logs), 1)


class GatewayStartsWithNothingRunning(unittest.TestCase):
    def test_unhealthy_and_says_why(self):
        port = free_port()
        dead = "postgres://nobody:x@127.0.0.1:%d/none?connect_timeout=1" % free_port()
        with Service("api-gateway", {"SERVER_PORT": port, "DATABASE_URL": dead},
                     health="http://127.0.0.1:%d/health" % port) as gw:
            wait_for(lambda: http("GET", "http://127.0.0.1:%d/api/v1/health" % port)[0] == 503,
                     what="503 with no database")
            time.sleep(0.5)
            self.assertIsNone(gw.proc.poll())
            records = gw.log_lines()
            self.assertTrue(any(r.get("msg") == "dependency is unavailable" and
                                r.get("dependency") == "postgresql" for r in records), gw.log())
            self.assertNotIn("nobody:x", gw.log())  # the password never reaches the log
            self.assertEqual(gw.stop(), 0)


class Configuration(unittest.TestCase):
    def run_bad(self, program, env):
        full = dict(os.environ, LOG_FORMAT="json", **env)
        r = subprocess.run([os.path.join(BINDIR, program)], env=full, capture_output=True, text=True,
                           timeout=20, cwd="/tmp")
        return r.returncode, r.stdout + r.stderr

    def test_bad_values_stop_start_up(self):
        cases = [
            ("api-gateway", {"SERVER_PORT": "eighty"}, "SERVER_PORT", "eighty"),
            ("api-gateway", {"LOG_LEVEL": "loud"}, "LOG_LEVEL", "loud"),
            ("api-gateway", {"DB_MAX_CONNECTIONS": "0"}, "DB_MAX_CONNECTIONS", "0"),
            ("realtime", {"PORT": "-5"}, "PORT", "-5"),
            ("runtime", {"RUNTIME_BIND_ADDR": "nowhere"}, "RUNTIME_BIND_ADDR", "nowhere"),
            ("runtime", {"RUNTIME_AUTHORITY_WRITE_MODE": "sometimes"}, "RUNTIME_AUTHORITY_WRITE_MODE",
             "sometimes"),
        ]
        for program, env, name, value in cases:
            with self.subTest(program=program, env=env):
                code, out = self.run_bad(program, env)
                self.assertEqual(code, 2, out)
                line = [l for l in out.splitlines() if name in l]
                self.assertTrue(line, out)
                self.assertIn(value, line[0])
                self.assertIn("expected", line[0])

    def test_production_refuses_default_secret(self):
        code, out = self.run_bad("api-gateway", {"APP_ENV": "production", "JWT_SECRET": "",
                                                 "INGEST_TOKEN": "x" * 40, "INTERNAL_TOKEN": "y" * 40})
        self.assertEqual(code, 2, out)
        self.assertIn("JWT_SECRET", out)

    def test_dotenv_is_read_and_environment_wins(self):
        import tempfile
        d = tempfile.mkdtemp()
        with open(os.path.join(d, ".env"), "w") as f:
            f.write("SERVER_PORT=notaport\nLOG_LEVEL=loud\n")
        env = dict(os.environ, LOG_LEVEL="info")
        env.pop("SERVER_PORT", None)
        r = subprocess.run([os.path.join(BINDIR, "api-gateway")], env=env, capture_output=True,
                           text=True, timeout=20, cwd=d)
        self.assertEqual(r.returncode, 2)
        self.assertIn("notaport", r.stderr)
        self.assertNotIn("loud", r.stderr)


class SkeletonServices(unittest.TestCase):
    def test_health_routes_and_sigterm(self):
        rt_port, run_port, gw_port = free_port(), free_port(), free_port()
        common = {"DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL, "AMQP_URL": AMQP_URL}
        services = [
            Service("realtime", dict(common, PORT=rt_port), health="http://127.0.0.1:%d/health" % rt_port,
                    health_status=200),
            Service("runtime", dict(common, RUNTIME_BIND_ADDR="127.0.0.1:%d" % run_port),
                    health="http://127.0.0.1:%d/readyz" % run_port, health_status=200),
            Service("api-gateway", dict(common, SERVER_PORT=gw_port),
                    health="http://127.0.0.1:%d/api/v1/health" % gw_port, health_status=200),
        ]
        try:
            for s in services:
                s.start(timeout=30)
            status, _, body = http_json("GET", "http://127.0.0.1:%d/health" % rt_port)
            self.assertEqual(body["checks"], {"postgresql": "up", "redis": "up", "rabbitmq": "up"})
            self.assertEqual(body["max_connections"], 10000)
            status, _, body = http_json("GET", "http://127.0.0.1:%d/healthz" % run_port)
            self.assertEqual((status, body["status"], body["authority_write_mode"]), (200, "ok", "rust_active"))
        finally:
            codes = [s.stop() for s in services]
        self.assertEqual(codes, [0, 0, 0])
        for s in services:
            records = s.log_lines()
            self.assertTrue(records, s.name)
            self.assertTrue(all("ts" in r and "level" in r and "msg" in r for r in records), s.name)


if __name__ == "__main__":
    unittest.main()
