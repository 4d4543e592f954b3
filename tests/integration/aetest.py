"""Shared plumbing for the integration tests: where the binaries are, the
local servers' URLs, starting a service as a subprocess and plain HTTP.

    from aetest import Service, http, BINDIR

    with Service("api-gateway", {"SERVER_PORT": "18001", ...},
                 health="http://127.0.0.1:18001/health") as gw:
        status, headers, body = http("GET", "http://127.0.0.1:18001/api/v1/health")
"""

import http.client as httpclient
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINDIR = os.path.join(ROOT, os.environ.get("BINDIR", "bin"))
DATABASE_URL = os.environ.get("TEST_DATABASE_URL",
                              "postgres://erc8004:erc8004@127.0.0.1:55432/erc8004_backend")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:56379/0")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:55672/%2f")

_PG = urllib.parse.urlsplit(DATABASE_URL)
_REDIS = urllib.parse.urlsplit(REDIS_URL)
# The local servers' ports (each engineer's worktree and CI use their own):
# tests that make their own databases or pick a Redis db take them here.
PG_HOST, PG_PORT = _PG.hostname or "127.0.0.1", _PG.port or 5432
PG_USER, PG_PASSWORD = urllib.parse.unquote(_PG.username or ""), urllib.parse.unquote(_PG.password or "")
REDIS_HOST, REDIS_PORT = _REDIS.hostname or "127.0.0.1", _REDIS.port or 6379

__all__ = ["ROOT", "BINDIR", "DATABASE_URL", "REDIS_URL", "AMQP_URL", "PG_HOST", "PG_PORT", "PG_USER",
           "PG_PASSWORD", "Service", "http", "http_json", "wait_for", "db_url", "redis_url", "private_db_fresh",
           "private_db_create", "private_db_drop"]


def db_url(name):
    """DATABASE_URL with its database replaced by `name`."""
    u = urllib.parse.urlsplit(DATABASE_URL)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + name, u.query, u.fragment))


def redis_url(db):
    """The local Redis server's URL for logical database `db`."""
    return "redis://%s:%d/%d" % (REDIS_HOST, REDIS_PORT, db)


def private_db_fresh(name):
    """An empty database `name` on the shared server (dropped first if left
    over). Returns its URL."""
    import psycopg2
    admin = psycopg2.connect(DATABASE_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
        cur.execute("CREATE DATABASE %s" % name)
    admin.close()
    return db_url(name)


def private_db_create(name):
    """private_db_fresh, then migrated with bin/migrate. Returns its URL."""
    private_db_fresh(name)
    env = dict(os.environ, DATABASE_URL=db_url(name))
    r = subprocess.run([os.path.join(BINDIR, "migrate")], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError("bin/migrate failed: %s %s" % (r.stdout, r.stderr))
    return db_url(name)


def private_db_drop(name):
    import psycopg2
    admin = psycopg2.connect(DATABASE_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
    admin.close()


def http(method, url, body=None, headers=None, timeout=10):
    """One request on a fresh connection. Returns (status, headers dict with
    lower-case names, body bytes)."""
    u = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        path = u.path + ("?" + u.query if u.query else "")
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = dict(headers or {}, **{"Content-Type": "application/json"})
        conn.request(method, path or "/", body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def http_json(method, url, body=None, headers=None, timeout=10):
    """Like http() but decodes a JSON body (None when empty)."""
    status, hdrs, data = http(method, url, body, headers, timeout)
    return status, hdrs, json.loads(data) if data else None


def rss_kib(pid):
    """A process's resident set, KiB (0 when /proc does not say)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def recv_to_close(s):
    """Every byte a socket gets until the peer closes it (its timeout, as
    set, bounds each read)."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def wait_for(pred, timeout=10.0, interval=0.05, what="condition"):
    """Polls pred() until it returns a true value; raises AssertionError with
    `what` when it never does."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
            if last:
                return last
        except (OSError, httpclient.HTTPException) as e:
            last = e
        time.sleep(interval)
    raise AssertionError("timed out waiting for %s (last: %r)" % (what, last))


class Service:
    """A program from BINDIR run as a subprocess with its log in a temp file."""

    def __init__(self, name, env, health=None, health_status=None, cwd=None, args=()):
        self.name = name
        self.env = dict(os.environ)
        self.env.update({"LOG_FORMAT": "json", "LOG_LEVEL": "info",
                         "MIGRATIONS_DIR": os.path.join(ROOT, "database", "migrations")})
        self.env.update({k: str(v) for k, v in env.items()})
        self.health = health
        self.health_status = health_status
        self.cwd = cwd or tempfile.mkdtemp(prefix="ae-%s-" % name)
        self.args = list(args)
        self.proc = None
        self.logpath = os.path.join(self.cwd, name + ".log")

    def start(self, timeout=20):
        self._log = open(self.logpath, "ab")
        self.proc = subprocess.Popen([os.path.join(BINDIR, self.name)] + self.args, env=self.env,
                                     cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT)
        if self.health:
            def answered():
                if self.proc.poll() is not None:
                    raise AssertionError("%s exited with %s:\n%s" % (self.name, self.proc.returncode,
                                                                    self.log()))
                status, _, _ = http("GET", self.health, timeout=2)
                return self.health_status is None or status == self.health_status
            wait_for(answered, timeout, what="%s health" % self.name)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Stops the program; returns its exit code."""
        try:
            if not self.proc or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else None
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            if getattr(self, "_log", None) and not self._log.closed:
                self._log.close()

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def log(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_lines(self):
        """The JSON log records (lines that are not JSON are skipped)."""
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False
