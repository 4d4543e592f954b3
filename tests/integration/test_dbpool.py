"""Integration tests for libshared's dbpool, rconn and amqpc against real
servers, through the driver tests/integration/drivers/shared_clients.c.

PostgreSQL and Redis tests use private servers (pgtmp.PgTmp and a
redis-server on a free port) because they stop and restart them; the AMQP
test uses the shared RabbitMQ (TEST_AMQP_URL, default amqp://guest:guest@127.0.0.1:55672/%2f);
broker-side disconnects and restarts run on a private RabbitMQ node.

The driver is looked up at $O/tests/drivers/shared_clients, then in
$DRIVER_DIR, then build/tests/drivers/.
"""

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgtmp import PgTmp, free_port  # noqa: E402
from tools import need  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DRIVER_NAME = "shared_clients"


def driver_path():
    cands = []
    if os.environ.get("O"):
        o = os.environ["O"]
        cands.append(os.path.join(o if os.path.isabs(o) else os.path.join(ROOT, o), "tests", "drivers", DRIVER_NAME))
    if os.environ.get("DRIVER_DIR"):
        cands.append(os.path.join(os.environ["DRIVER_DIR"], DRIVER_NAME))
    cands.append(os.path.join(ROOT, "build", "tests", "drivers", DRIVER_NAME))
    for c in cands:
        if os.access(c, os.X_OK):
            return c
    raise AssertionError("driver %s not built; looked in %s" % (DRIVER_NAME, ", ".join(cands)))


def now_ms():
    return int(time.time() * 1000)


class Driver:
    """The driver process: one command line in, one answer line out."""

    def __init__(self, mode, env):
        self.logpath = tempfile.mktemp(prefix="shared_clients-", suffix=".log")
        self.logf = open(self.logpath, "w+")
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("DB_", "REDIS_", "AMQP_")) and k != "DATABASE_URL"}
        base.update({"LOG_FORMAT": "json", "LOG_LEVEL": "info"})
        base.update(env)
        self.proc = subprocess.Popen([driver_path(), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.logf, env=base, cwd=tempfile.gettempdir(), text=True, bufsize=1)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        ready = self.readline(10)
        if ready != "ready":
            raise AssertionError("driver did not start: %r\n%s" % (ready, self.log_text()))

    def readline(self, timeout):
        # Own buffering on the raw fd: select() on a buffered file object
        # misses lines that Python has already read ahead.
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.fd], [], [], max(0, left))
            if not r:
                raise AssertionError("driver did not answer within %ss\n%s" % (timeout, self.log_text()))
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError("driver exited (rc=%s)\n%s" % (self.proc.poll(), self.log_text()))
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def cmd(self, line, timeout=15):
        self.send(line)
        return self.readline(timeout)

    def log_text(self):
        self.logf.flush()
        with open(self.logpath) as f:
            return f.read()

    def log_records(self, msg=None):
        out = []
        for line in self.log_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if msg is None or rec.get("msg") == msg:
                out.append(rec)
        return out

    def close(self):
        """Stops the driver; fails when it did not exit cleanly (a crash, or
        a sanitizer report in an instrumented build)."""
        killed = False
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
                killed = True
        log = self.log_text()
        self.proc.stdout.close()
        self.proc.stdin.close()
        self.logf.close()
        os.unlink(self.logpath)
        if killed or self.proc.returncode != 0 or "Sanitizer" in log or "runtime error" in log:
            raise AssertionError("driver exit %s%s\n%s" % (self.proc.returncode, " (killed)" if killed else "",
                                                              log[-4000:]))


def parse_kv(line):
    return {k: v for k, v in (w.split("=", 1) for w in line.split() if "=" in w)}


def wait_for(fn, timeout, interval=0.05):
    """Calls fn until it returns a true value or the time is up; returns the
    last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


class DbPoolTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pg = PgTmp()

    @classmethod
    def tearDownClass(cls):
        cls.pg.cleanup()

    def setUp(self):
        if not self.pg.is_running():
            self.pg.start()
        self.drivers = []

    def tearDown(self):
        for d in self.drivers:
            d.close()

    def driver(self, env):
        d = Driver("db", env)
        self.drivers.append(d)
        return d

    def test_pool_answers(self):
        d = self.driver(self.pg.env())
        self.assertRegex(d.cmd("acquire 2000"), r"^ok \d+ pid=\d+$")
        self.assertRegex(d.cmd("ping 2000"), r"^ok \d+$")
        st = parse_kv(d.cmd("stats"))
        self.assertEqual((st["total"], st["idle"], st["waiting"], st["degraded"]), ("1", "1", "0", "0"))
        # application_name defaults to the program's name.
        names = self.pg.query("SELECT application_name FROM pg_stat_activity WHERE application_name = %s",
                              (DRIVER_NAME,))
        self.assertEqual(len(names), 1)

    def test_release_rolls_back_and_reuses(self):
        appname = "h4tx%d" % os.getpid()
        d = self.driver(self.pg.env(application_name=appname))
        pid = parse_kv(d.cmd("acquire 2000"))["pid"]
        # Released inside a transaction (PQTRANS_INTRANS = 2): rolled back
        # and kept, not closed.
        self.assertEqual(d.cmd("tx 2000"), "ok pid=%s tx=2" % pid)
        self.assertEqual(parse_kv(d.cmd("acquire 2000"))["pid"], pid)
        # Released in a failed transaction (PQTRANS_INERROR = 3): the same.
        ans = d.cmd("txfail 2000")
        self.assertTrue(ans.startswith("failed tx=3 22012: division by zero"), ans)
        self.assertEqual(parse_kv(d.cmd("acquire 2000"))["pid"], pid)
        st = parse_kv(d.cmd("stats"))
        self.assertEqual((st["total"], st["idle"]), ("1", "1"))
        # The server agrees: the connection is idle, not "idle in transaction".
        self.assertEqual(self.pg.query("SELECT state FROM pg_stat_activity WHERE application_name = %s",
                                       (appname,)), [("idle",)])
        # The rollback really happened: a later statement is not inside the
        # earlier transaction (which would fail with 25P02 after txfail).
        self.assertEqual(d.cmd("tx 2000"), "ok pid=%s tx=2" % pid)
        self.assertEqual(self.pg.query("SELECT state FROM pg_stat_activity WHERE application_name = %s",
                                       (appname,)), [("idle",)])

    def test_exec_within_gives_up_and_drops_the_connection(self):
        appname = "h4within%d" % os.getpid()
        d = self.driver(self.pg.env(application_name=appname))
        pid = parse_kv(d.cmd("acquire 2000"))["pid"]
        ans = d.cmd("within 2000 SELECT pg_backend_pid()")
        self.assertEqual(ans.split()[0::2], ["ok", pid], ans)
        # A statement slower than the bound: NULL with 57014 after about
        # the bound, not after the statement.
        ans = d.cmd("within 300 SELECT pg_sleep(5)")
        self.assertTrue(ans.startswith("err "), ans)
        self.assertLess(int(ans.split()[1]), 2000, ans)
        self.assertIn("57014: no answer within 300 ms", ans)
        # The connection with the query still in flight was closed on
        # release; the next one is a new backend that answers.
        st = parse_kv(d.cmd("stats"))
        self.assertEqual((st["total"], st["idle"]), ("0", "0"))
        self.assertNotEqual(parse_kv(d.cmd("acquire 2000"))["pid"], pid)
        ans = d.cmd("within 2000 SELECT 1/0")
        self.assertTrue(ans.startswith("err ") and "22012: division by zero" in ans, ans)

    def test_db_vars_with_quotes_in_password(self):
        pw = "it's a \\ pass"
        self.pg.query("DROP ROLE IF EXISTS odd")
        self.pg.query("CREATE ROLE odd LOGIN PASSWORD %s", (pw,))
        env = self.pg.db_env()
        env.update(DB_USER="odd", DB_PASSWORD=pw)
        d = self.driver(env)
        self.assertRegex(d.cmd("acquire 2000"), r"^ok ")
        env["DB_PASSWORD"] = "wrong"
        d2 = self.driver(env)
        ans = d2.cmd("acquire 2000")
        self.assertTrue(ans.startswith("null "), ans)
        self.assertIn("password authentication failed", ans)
        self.assertNotIn(pw, d.log_text() + d2.log_text())

    def test_bad_config_stops_driver(self):
        env = self.pg.db_env()
        env["DB_PORT"] = "5x"
        p = subprocess.run([driver_path(), "db"], env=dict(os.environ, **env), input="", capture_output=True,
                           text=True, timeout=10)
        self.assertEqual(p.returncode, 2)
        self.assertIn('DB_PORT=\\"5x\\"', p.stderr)

    def test_down_fails_fast_logs_per_step_and_recovers(self):
        d = self.driver(self.pg.env())
        self.assertRegex(d.cmd("acquire 2000"), r"^ok ")
        self.pg.stop()
        t0 = time.monotonic()
        ans = d.cmd("acquire 3000")
        self.assertTrue(ans.startswith("null "), ans)
        self.assertLess(time.monotonic() - t0, 1.0, "acquire did not fail fast")
        self.assertIn("database unavailable", ans)

        # Many callers in a tight loop: every call fails fast, and the log has
        # one line per back-off step, not one per call.
        h = parse_kv(d.cmd("hammer 3000 3000", timeout=20))
        calls, ok, worst = int(h["calls"]), int(h["ok"]), int(h["worst_ms"])
        self.assertEqual(ok, 0)
        self.assertGreater(calls, 300)
        self.assertLess(worst, 500)
        recs = d.log_records("database unavailable")
        # 100 ms doubling (equal jitter) over ~3 s: 4 to 8 steps.
        self.assertGreaterEqual(len(recs), 4, recs)
        self.assertLessEqual(len(recs), 9, recs)
        self.assertEqual([r["attempt"] for r in recs], list(range(1, len(recs) + 1)))
        delays = [r["retry_in_ms"] for r in recs]
        for i, dl in enumerate(delays):
            cap = min(5000, 100 * 2 ** i)
            self.assertTrue(cap // 2 <= dl <= cap, (i, dl))
        self.assertNotIn("test:test", d.log_text())
        self.assertEqual(parse_kv(d.cmd("stats"))["degraded"], "1")

        self.pg.start()
        t1 = time.monotonic()
        got = wait_for(lambda: d.cmd("acquire 1000").startswith("ok "), 8)
        self.assertTrue(got, "pool did not recover after the server came back")
        self.assertLess(time.monotonic() - t1, 6.5)  # at most one max back-off window
        self.assertEqual(len(d.log_records("database connection restored")), 1)
        st = parse_kv(d.cmd("stats"))
        self.assertEqual(st["degraded"], "0")
        self.assertRegex(d.cmd("ping 1000"), r"^ok ")

    def test_restart_replaces_idle_connections(self):
        d = self.driver(self.pg.env())
        # Two idle connections in the pool.
        d.cmd("workers 2 300 50 2000")
        d.readline(5)
        d.readline(5)
        self.assertEqual(parse_kv(d.cmd("stats"))["idle"], "2")
        self.pg.restart()
        # The stale connections are noticed before they are handed out: the
        # very first acquire works.
        self.assertRegex(d.cmd("acquire 2000"), r"^ok ")
        self.assertRegex(d.cmd("ping 2000"), r"^ok ")
        # A crash (no goodbye from the backends): at most one failed try.
        self.pg.crash()
        self.pg.start()
        answers = [d.cmd("acquire 2000") for _ in range(2)]
        self.assertTrue(answers[-1].startswith("ok "), answers)

    def _restart_under_load(self, how):
        d = self.driver(dict(self.pg.env(), DB_MAX_CONNECTIONS="4"))
        d.send("workers 4 7000 20 2000")
        time.sleep(1.5)
        if how == "restart":
            self.pg.restart()
        else:
            self.pg.crash()
            self.pg.start()
        restarted = now_ms()
        lines = [d.readline(20) for _ in range(5)]
        self.assertTrue(lines[-1].startswith("done "), lines)
        fails = 0
        for line in lines[:4]:
            w = parse_kv(line)
            self.assertGreater(int(w["ok"]), 0, line)
            # Every thread worked again after the server came back ...
            self.assertGreater(int(w["last_ok"]), restarted, line)
            # ... and has not failed for the last seconds of the run.
            if int(w["last_fail"]):
                self.assertLess(int(w["last_fail"]), int(w["last_ok"]), line)
            fails += int(w["null"]) + int(w["err"])
        self.assertGreater(fails, 0, "the restart went unnoticed: the test proves nothing")
        self.assertLessEqual(int(parse_kv(lines[-1])["max_total"]), 4)
        self.assertEqual(parse_kv(d.cmd("stats"))["degraded"], "0")

    def test_restart_under_concurrent_use(self):
        self._restart_under_load("restart")

    def test_crash_under_concurrent_use(self):
        self._restart_under_load("crash")

    def test_max_connections_respected(self):
        appname = "h4max%d" % os.getpid()
        d = self.driver(dict(self.pg.env(application_name=appname), DB_MAX_CONNECTIONS="3"))
        seen = []
        stop = threading.Event()

        def poll():
            conn = self.pg.connect()
            try:
                with conn.cursor() as cur:
                    while not stop.is_set():
                        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                                    (appname,))
                        seen.append(cur.fetchone()[0])
                        time.sleep(0.01)
            finally:
                conn.close()

        t = threading.Thread(target=poll)
        t.start()
        try:
            d.send("workers 8 2500 30 5000")
            lines = [d.readline(20) for _ in range(9)]
        finally:
            stop.set()
            t.join()
        self.assertTrue(seen)
        self.assertLessEqual(max(seen), 3, seen)
        self.assertEqual(max(seen), 3, "the pool never filled up: the test proves nothing")
        for line in lines[:8]:
            w = parse_kv(line)
            self.assertGreater(int(w["ok"]), 0, line)
            self.assertEqual(int(w["null"]) + int(w["err"]), 0, line)
        self.assertEqual(int(parse_kv(lines[-1])["max_total"]), 3)

    def test_acquire_times_out_when_pool_busy(self):
        d = self.driver(dict(self.pg.env(), DB_MAX_CONNECTIONS="1"))
        d.send("workers 3 1500 300 100")
        lines = [d.readline(20) for _ in range(4)]
        nulls = sum(int(parse_kv(x)["null"]) for x in lines[:3])
        oks = sum(int(parse_kv(x)["ok"]) for x in lines[:3])
        self.assertGreater(nulls, 0)
        self.assertGreater(oks, 0)
        self.assertEqual(int(parse_kv(lines[-1])["max_total"]), 1)
        # A busy pool is not a database outage.
        self.assertEqual(d.log_records("database unavailable"), [])
        self.assertEqual(parse_kv(d.cmd("stats"))["degraded"], "0")


class RedisServer:
    def __init__(self, port, password=None):
        self.port, self.password = port, password
        self.proc = None

    def start(self):
        argv = [need("redis-server"), "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return True
            except OSError:
                return False
        if not wait_for(up, 10):
            raise AssertionError("redis-server did not start on %d" % self.port)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        self.start()


class RconnTest(unittest.TestCase):
    def setUp(self):
        import redis
        self.port = free_port()
        self.srv = RedisServer(self.port, "s3cr:et")
        self.srv.start()
        self.py = redis.Redis(host="127.0.0.1", port=self.port, password="s3cr:et", db=2)
        self.d = Driver("redis", {"REDIS_URL": "redis://:s3cr%%3Aet@127.0.0.1:%d/2" % self.port})

    def tearDown(self):
        self.d.close()
        self.srv.stop()

    def test_auth_select_and_reconnect(self):
        d = self.d
        self.assertRegex(d.cmd("set k1 v1"), r"^ok \d+ OK$")
        self.assertEqual(self.py.get("k1"), b"v1")  # AUTH worked and SELECT 2 took effect
        self.assertRegex(d.cmd("ping"), r"^ok ")

        # Server restarted between two commands: an idempotent command
        # reconnects and retries by itself ...
        self.srv.restart()
        self.assertRegex(d.cmd("get k1"), r"^ok \d+ nil$")
        # ... a non-idempotent one reports the error once, then works.
        self.srv.restart()
        ans = d.cmd("incr n")
        self.assertTrue(ans.startswith("fail "), ans)
        self.assertEqual(self.py.get("n"), None)  # not executed behind our back
        self.assertRegex(d.cmd("incr n"), r"^ok \d+ 1$")

        # Server down: calls fail fast, one log line per back-off step.
        self.srv.stop()
        t0 = time.monotonic()
        answers = [d.cmd("ping") for _ in range(200)]
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertTrue(all(a.startswith("fail ") for a in answers), answers[:3])
        recs = d.log_records("redis unavailable")
        self.assertGreaterEqual(len(recs), 1)
        self.assertLessEqual(len(recs), 4, recs)
        self.assertNotIn("s3cr", d.log_text())

        self.srv.start()
        self.assertTrue(wait_for(lambda: d.cmd("ping").startswith("ok "), 8), "rconn did not reconnect")
        self.assertEqual(len(d.log_records("redis connection restored")), 1)
        self.assertRegex(d.cmd("set k2 v2"), r"^ok ")
        self.assertEqual(self.py.get("k2"), b"v2")

    def test_eval(self):
        d = self.d
        # KEYS, then ARGV, in order; the vector on the stack and on the heap.
        self.assertRegex(d.cmd("eval 2 k1 k2 a1 a2 a3"), r"^ok \d+ k1,k2\|a1,a2,a3$")
        self.assertRegex(d.cmd("eval 0"), r"^ok \d+ \|$")
        many = ["a%d" % i for i in range(40)]
        self.assertRegex(d.cmd("eval 3 " + " ".join(many)),
                         r"^ok \d+ %s\|%s$" % (",".join(many[:3]), ",".join(many[3:])))
        # Given lengths are the ones sent (each one byte short here).
        self.assertRegex(d.cmd("evallen 1 kx ab cd"), r"^ok \d+ k\|a,c$")
        self.assertRegex(d.cmd("evallen 1 " + " ".join(many)),
                         r"^ok \d+ a\|%s$" % ",".join(m[:-1] for m in many[1:]))

    def test_wrong_password(self):
        d = Driver("redis", {"REDIS_URL": "redis://:nope@127.0.0.1:%d/0" % self.port})
        try:
            ans = d.cmd("ping")
            self.assertTrue(ans.startswith("fail "), ans)
            self.assertIn("AUTH", ans)
        finally:
            d.close()


class AmqpcTest(unittest.TestCase):
    # The shared broker, named as aetest.py names it.
    URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:55672/%2f")

    def test_unreachable_fails_fast(self):
        d = Driver("amqp", {"AMQP_URL": "amqp://guest:guest@127.0.0.1:%d/" % free_port()})
        try:
            t0 = time.monotonic()
            answers = [d.cmd("connect") for _ in range(100)]
            self.assertLess(time.monotonic() - t0, 2.0)
            self.assertTrue(all(a.startswith("fail ") for a in answers))
            self.assertLessEqual(len(d.log_records("amqp unavailable")), 4)
            self.assertGreaterEqual(len(d.log_records("amqp unavailable")), 1)
            self.assertTrue(d.cmd("ping").startswith("fail "))
        finally:
            d.close()

    def test_publish_consume_shared_rabbitmq(self):
        u = urllib.parse.urlsplit(self.URL)
        host, port = u.hostname or "127.0.0.1", u.port or 5672
        try:
            socket.create_connection((host, port), 2).close()
        except OSError:
            self.fail("RabbitMQ is not running at %s:%d (scripts/servers.sh start)" % (host, port))
        tag = uuid.uuid4().hex[:10]
        ex, q = "h4test.ex.%s" % tag, "h4test.q.%s" % tag
        d = Driver("amqp", {"AMQP_URL": self.URL})
        try:
            self.assertEqual(d.cmd("connect"), "ok")
            self.assertEqual(d.cmd("ping"), "ok")
            self.assertEqual(d.cmd("declare %s %s run.*" % (ex, q)), "ok")
            self.assertEqual(d.cmd("publish %s run.start {\"n\":1}" % ex), "ok")
            self.assertEqual(d.cmd("publish %s other.key {\"n\":2}" % ex), "ok")  # not bound
            self.assertEqual(d.cmd("publish %s run.end {\"n\":3}" % ex), "ok")
            self.assertEqual(d.cmd("consume %s 3000" % q), 'msg {"n":1}')
            self.assertEqual(d.cmd("consume %s 3000" % q), 'msg {"n":3}')
            self.assertEqual(d.cmd("consume %s 300" % q), "timeout")
            # A channel error (bind to a missing exchange) reopens the channel
            # and leaves the connection serving later calls.
            ans = d.cmd("bind %s h4test.missing.%s x" % (q, tag))
            self.assertTrue(ans.startswith("fail "), ans)
            self.assertIn("404", ans)
            self.assertEqual(d.cmd("ping"), "ok")
            self.assertEqual(d.cmd("publish %s run.again {\"n\":4}" % ex), "ok")
            self.assertEqual(d.cmd("consume %s 3000" % q), 'msg {"n":4}')
            # Closed and reconnected: publishing reconnects by itself.
            self.assertEqual(d.cmd("close"), "ok")
            self.assertTrue(d.cmd("ping").startswith("fail "))
            self.assertEqual(d.cmd("publish %s run.x {\"n\":5}" % ex), "ok")
            self.assertEqual(d.cmd("consume %s 3000" % q), 'msg {"n":5}')
            self.assertEqual(d.cmd("delete %s %s" % (q, ex)), "ok")
        finally:
            d.close()


class RabbitTmp:
    """A private RabbitMQ node on free ports, for tests that close its
    connections or restart it (never the shared broker). Its Erlang cookie
    lives in its own HOME, and rabbitmqctl is given it explicitly."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="rabbittmp-")
        self.port = free_port()
        self.node = "h4rabbit%d@localhost" % os.getpid()
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write("listeners.tcp.default = 127.0.0.1:%d\nloopback_users = none\n" % self.port)
        self.env = dict(os.environ, HOME=self.dir, RABBITMQ_NODENAME=self.node,
                        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_DIST_PORT=str(free_port()),
                        RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
                        RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"),
                        RABBITMQ_CONFIG_FILE=os.path.join(self.dir, "rabbitmq"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.dir, "plugins"),
                        RABBITMQ_PID_FILE=os.path.join(self.dir, "pid"),
                        # A private epmd, so that cleanup can stop it without
                        # touching the one the shared broker uses.
                        ERL_EPMD_PORT=str(free_port()))
        self.proc = None

    def url(self):
        return "amqp://guest:guest@127.0.0.1:%d/" % self.port

    def ctl(self, *args, check=True):
        with open(os.path.join(self.dir, ".erlang.cookie")) as f:
            cookie = f.read().strip()
        r = subprocess.run([need("rabbitmqctl"), "-n", self.node, "--erlang-cookie", cookie] + list(args),
                           env=self.env, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError("rabbitmqctl %s: %s%s" % (args, r.stdout, r.stderr))
        return r

    def start(self):
        """Starts the node; a node that exits at boot (one of its three
        ports taken meanwhile by another server on this shared machine) is
        started again on fresh ports, twice at most, and the last failure
        quotes the node's own output."""
        for attempt in range(3):
            if self._boot():
                return
            if attempt < 2:
                subprocess.run([need("epmd"), "-port", self.env["ERL_EPMD_PORT"], "-kill"],
                               capture_output=True, timeout=10)
                self.port = free_port()
                self.env.update(RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(free_port()),
                                ERL_EPMD_PORT=str(free_port()))
                with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
                    f.write("listeners.tcp.default = 127.0.0.1:%d\nloopback_users = none\n" % self.port)
        with open(os.path.join(self.dir, "out.log"), errors="replace") as f:
            tail = f.read()[-2000:]
        raise AssertionError("rabbitmq-server exited early three times; its output ends:\n" + tail)

    def _boot(self):
        """True once the node listens; False if it exited first."""
        server = need("rabbitmq-server")
        self.out = open(os.path.join(self.dir, "out.log"), "a")
        self.proc = subprocess.Popen([server], env=self.env, stdout=self.out, stderr=subprocess.STDOUT,
                                     cwd=self.dir, start_new_session=True)
        exited = []

        def up():
            if self.proc.poll() is not None:
                exited.append(True)
                return True
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return True
            except OSError:
                return False
        if not wait_for(up, 60, 0.2):
            raise AssertionError("private RabbitMQ did not start on %d" % self.port)
        if exited:
            self.out.close()
            self.proc = None
        return not exited

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.ctl("stop", check=False)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        if self.proc:
            self.out.close()
        self.proc = None

    def cleanup(self):
        self.stop()
        epmd = need("epmd")
        subprocess.run([epmd, "-port", self.env["ERL_EPMD_PORT"], "-kill"], capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


class AmqpcReconnectTest(unittest.TestCase):
    """Broker-side disconnects and restarts, on a private RabbitMQ node."""

    @classmethod
    def setUpClass(cls):
        cls.rmq = RabbitTmp()
        try:
            cls.rmq.start()
        except BaseException:
            cls.rmq.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.rmq.cleanup()

    def test_publish_after_broker_closed_connection(self):
        d = Driver("amqp", {"AMQP_URL": self.rmq.url()})
        try:
            self.assertEqual(d.cmd("declare h4x h4q k"), "ok")
            self.assertEqual(d.cmd("publish h4x k one"), "ok")
            self.assertEqual(d.cmd("consume h4q 3000"), "msg one")
            self.rmq.ctl("close_all_connections", "test")
            time.sleep(0.3)
            # The closed connection is noticed before publishing, so the
            # message goes out on a new connection instead of into a dead
            # socket.
            self.assertEqual(d.cmd("publish h4x k two"), "ok")
            self.assertEqual(d.cmd("consume h4q 3000"), "msg two")
            self.assertEqual(d.cmd("delete h4q h4x"), "ok")
        finally:
            d.close()

    def test_broker_restart(self):
        d = Driver("amqp", {"AMQP_URL": self.rmq.url()})
        try:
            self.assertEqual(d.cmd("connect"), "ok")
            self.rmq.stop()
            t0 = time.monotonic()
            answers = [d.cmd("publish amq.topic k x") for _ in range(100)]
            self.assertLess(time.monotonic() - t0, 3.0)
            self.assertTrue(all(a.startswith("fail ") for a in answers), answers[:3])
            self.assertTrue(d.cmd("ping").startswith("fail "))
            self.assertLessEqual(len(d.log_records("amqp unavailable")), 5)
            self.rmq.start()
            self.assertTrue(wait_for(lambda: d.cmd("connect") == "ok", 10), "amqpc did not reconnect")
            self.assertEqual(len(d.log_records("amqp connection restored")), 1)
            self.assertEqual(d.cmd("ping"), "ok")
            self.assertEqual(d.cmd("declare h4x2 h4q2 k"), "ok")
            self.assertEqual(d.cmd("publish h4x2 k three"), "ok")
            self.assertEqual(d.cmd("consume h4q2 3000"), "msg three")
            self.assertEqual(d.cmd("delete h4q2 h4x2"), "ok")
        finally:
            d.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
