"""scripts/stack.sh (make up): a service that `up` starts again gets the
configuration the stack was started with, recorded under ./var (SPEC 7,
issue 9.5), and `up` says when the calling environment differs.

The stack here is action-workers alone (STACK_SERVICES), on a free port
(STACK_PORTS), with its files in a temporary STACK_VAR, against the servers
tests/run.sh started: it runs beside anyone's `make up`."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import AMQP_URL, DATABASE_URL, REDIS_URL, ROOT, wait_for  # noqa: E402
from pgtmp import free_port  # noqa: E402

STACK = os.path.join(ROOT, "scripts", "stack.sh")


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        items = f.read().split(b"\0")
    return dict(i.decode().split("=", 1) for i in items if b"=" in i)


class StackConfigTest(unittest.TestCase):
    def setUp(self):
        self.var = tempfile.mkdtemp(prefix="ae-stack-")
        port = free_port()
        # Ports for the services this stack does not start: never used.
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("ALLOWED_TARGETS", "TELEGRAM_API_BASE", "WORKER_THREADS")}
        self.env.update({
            "STACK_VAR": self.var, "STACK_SERVICES": "action-workers",
            "STACK_PORTS": "1 1 1 1 %d" % port, "STACK_TIMEOUT": "60",
            "DATABASE_URL": DATABASE_URL, "REDIS_URL": REDIS_URL, "AMQP_URL": AMQP_URL,
            "BINDIR": os.environ.get("BINDIR", "bin"),
        })

    def tearDown(self):
        pidf = os.path.join(self.var, "run", "action-workers.pid")
        try:
            with open(pidf) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.var, ignore_errors=True)

    def up(self, **extra):
        env = dict(self.env, **extra)
        env = {k: v for k, v in env.items() if v is not None}
        r = subprocess.run([STACK, "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r.stdout + r.stderr

    def pid(self):
        with open(os.path.join(self.var, "run", "action-workers.pid")) as f:
            return int(f.read().strip())

    def test_restarted_service_gets_the_recorded_configuration(self):
        out = self.up(ALLOWED_TARGETS="127.0.0.1", TELEGRAM_API_BASE="http://127.0.0.1:9/tg")
        self.assertNotIn("differs", out)
        first = self.pid()
        env = environ_of(first)
        self.assertEqual(env.get("ALLOWED_TARGETS"), "127.0.0.1")
        with open(os.path.join(self.var, "stack.env")) as f:
            recorded = f.read()
        self.assertIn("export ALLOWED_TARGETS=127.0.0.1", recorded)
        self.assertEqual(os.stat(os.path.join(self.var, "stack.env")).st_mode & 0o777, 0o600)

        # It crashes; `up` from a shell without ALLOWED_TARGETS, with another
        # TELEGRAM_API_BASE and a new WORKER_THREADS brings it back as it was.
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not os.path.exists("/proc/%d/status" % first) or
                 "zombie" in open("/proc/%d/status" % first).read(), 10, what="worker gone")
        out = self.up(TELEGRAM_API_BASE="http://127.0.0.1:9/other", WORKER_THREADS="1")
        self.assertIn("differs from the one the stack was started with in: ALLOWED_TARGETS TELEGRAM_API_BASE "
                      "WORKER_THREADS", out)
        self.assertNotIn("127.0.0.1:9/other", out, "values are not printed")
        second = self.pid()
        self.assertNotEqual(second, first)
        env = environ_of(second)
        self.assertEqual(env.get("ALLOWED_TARGETS"), "127.0.0.1")
        self.assertEqual(env.get("TELEGRAM_API_BASE"), "http://127.0.0.1:9/tg")
        self.assertNotIn("WORKER_THREADS", env)

        # The same environment as at the start: nothing to say, nothing restarted.
        out = self.up(ALLOWED_TARGETS="127.0.0.1", TELEGRAM_API_BASE="http://127.0.0.1:9/tg")
        self.assertNotIn("differs", out)
        self.assertIn("already running", out)
        self.assertEqual(self.pid(), second)


if __name__ == "__main__":
    unittest.main()
