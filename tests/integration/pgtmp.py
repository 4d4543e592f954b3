"""A private, throwaway PostgreSQL cluster for tests that must stop, crash or
restart the server without disturbing the shared instance on port 55432.

    from pgtmp import PgTmp

    with PgTmp() as pg:                 # initdb + start on a free port
        url = pg.url()                  # postgresql://test:test@127.0.0.1:PORT/test
        conn = pg.connect()             # psycopg2 connection, autocommit
        pg.stop(); pg.start(); pg.restart(); pg.crash()
    # stopped and deleted here (also at interpreter exit if forgotten)

When run as root, the cluster belongs to the `postgres` system user (initdb
and the server refuse to run as root): the data directory is chowned to it
and every server command runs through `runuser -u postgres --`. Binaries come
from PG_BINDIR, else /usr/lib/postgresql/15/bin, else pg_config --bindir.
Fsync is off: the data is disposable and tests stay fast.
"""

import atexit
import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time

from tools import need

__all__ = ["PgTmp", "free_port"]


def _ephemeral_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host="127.0.0.1"):
    """Returns a TCP port that nothing listens on right now, chosen below the
    kernel's ephemeral range. A port the kernel picks for bind(0) comes from
    that range, which every outgoing connection also draws its source port
    from: under load (benchmarks opening tens of thousands of connections)
    such a port was taken before the server meant for it could bind, and a
    private RabbitMQ exited at start. Below the range only another caller of
    this function can take it, and a random pick makes that unlikely."""
    lo, _ = _ephemeral_range()
    top = max(lo - 1, 11000)
    for _ in range(200):
        port = random.randint(10000, top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bindir():
    for cand in (os.environ.get("PG_BINDIR"), "/usr/lib/postgresql/15/bin"):
        if cand and os.path.exists(os.path.join(cand, "pg_ctl")):
            return cand
    try:
        out = subprocess.run([need("pg_config"), "--bindir"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError, AssertionError):
        raise AssertionError("PostgreSQL server binaries (pg_ctl) not found: install the Debian package "
                             "postgresql (scripts/deps.sh does), or set PG_BINDIR") from None


class PgTmp:
    """One private cluster. Not thread-safe; one object per test class is the
    usual pattern (setUpClass/tearDownClass)."""

    def __init__(self, user="test", password="test", dbname="test", port=None,
                 start=True, extra_conf=None):
        self.user = user
        self.password = password
        self.dbname = dbname
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.bindir = _bindir()
        self.extra_conf = dict(extra_conf or {})
        self._as_postgres = os.geteuid() == 0
        self.tmpdir = tempfile.mkdtemp(prefix="pgtmp-")
        self.datadir = os.path.join(self.tmpdir, "data")
        self.logfile = os.path.join(self.tmpdir, "server.log")
        self._cleaned = False
        atexit.register(self.cleanup)
        try:
            if self._as_postgres:
                pw = pwd.getpwnam("postgres")
                os.chown(self.tmpdir, pw.pw_uid, pw.pw_gid)
            self._initdb()
            if start:
                self.start()
                self._createdb()
        except BaseException:
            self.cleanup()
            raise

    # ---- plumbing ----

    def _cmd(self, argv):
        argv = [os.path.join(self.bindir, argv[0])] + list(argv[1:])
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        return argv

    def _run(self, argv, check=True, timeout=60):
        env = dict(os.environ, LC_ALL="C", LANG="C")
        env.pop("PGPASSWORD", None)
        r = subprocess.run(self._cmd(argv), capture_output=True, text=True, env=env,
                           timeout=timeout, cwd=self.tmpdir)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s%s\n--- server log ---\n%s" % (
                argv[0], r.returncode, r.stdout, r.stderr, self.log_tail()))
        return r

    def _initdb(self):
        pwfile = os.path.join(self.tmpdir, "pwfile")
        with open(pwfile, "w") as f:
            f.write(self.password + "\n")
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        os.chmod(pwfile, 0o600)
        try:
            self._run(["initdb", "-D", self.datadir, "-U", self.user, "--pwfile", pwfile,
                       "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                       "--no-locale", "--no-sync"])
        finally:
            os.unlink(pwfile)
        conf = {
            "listen_addresses": "'%s'" % self.host,
            "port": str(self.port),
            "unix_socket_directories": "'%s'" % self.tmpdir,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "16MB",
        }
        conf.update({k: str(v) for k, v in self.extra_conf.items()})
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "a") as f:
            for k, v in conf.items():
                f.write("%s = %s\n" % (k, v))

    def _createdb(self):
        if self.dbname in ("postgres",):
            return
        r = self._run(["psql", "-h", self.tmpdir, "-p", str(self.port), "-U", self.user,
                       "-d", "postgres", "-tAc",
                       "SELECT 1 FROM pg_database WHERE datname = '%s'" % self.dbname.replace("'", "''")])
        if r.stdout.strip() != "1":
            self._run(["createdb", "-h", self.tmpdir, "-p", str(self.port), "-U", self.user,
                       self.dbname])

    # ---- lifecycle ----

    def start(self, timeout=30):
        """Starts the server and waits until it accepts connections."""
        self._run(["pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w", "-t", str(timeout),
                   "start"], timeout=timeout + 10)
        self.wait_ready(timeout)

    def stop(self, mode="fast", timeout=30):
        """Stops the server (mode: smart|fast|immediate) and waits for it."""
        self._run(["pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", str(timeout), "stop"],
                  timeout=timeout + 10)

    def crash(self):
        """An immediate shutdown: backends die without a clean goodbye, as in
        a crash; the next start() runs crash recovery."""
        self.stop(mode="immediate")

    def restart(self, mode="fast", timeout=30):
        self._run(["pg_ctl", "-D", self.datadir, "-l", self.logfile, "-m", mode, "-w", "-t",
                   str(timeout), "restart"], timeout=timeout + 10)
        self.wait_ready(timeout)

    def is_running(self):
        return self._run(["pg_ctl", "-D", self.datadir, "status"], check=False).returncode == 0

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self._run(["pg_isready", "-h", self.host, "-p", str(self.port), "-t", "1"],
                          check=False)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("PostgreSQL on port %d not ready after %ss\n%s" % (
            self.port, timeout, self.log_tail()))

    def cleanup(self):
        """Stops the server if it runs and deletes everything. Idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                self._run(["pg_ctl", "-D", self.datadir, "-m", "immediate", "-w", "stop"],
                          check=False)
        except Exception:  # cleanup must not mask the test's own failure
            pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False

    # ---- connecting ----

    def url(self, dbname=None, **params):
        """A libpq URI with password; extra query parameters from params."""
        q = "&".join("%s=%s" % (k, v) for k, v in params.items())
        return "postgresql://%s:%s@%s:%d/%s%s" % (self.user, self.password, self.host, self.port,
                                                  dbname or self.dbname, "?" + q if q else "")

    def env(self, **params):
        """Environment variables for a service under test (DATABASE_URL)."""
        return {"DATABASE_URL": self.url(**params)}

    def db_env(self):
        """The same as DB_* variables."""
        return {"DB_HOST": self.host, "DB_PORT": str(self.port), "DB_NAME": self.dbname,
                "DB_USER": self.user, "DB_PASSWORD": self.password}

    def connect(self, dbname=None, autocommit=True):
        """A psycopg2 connection over TCP (caller closes it)."""
        import psycopg2
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user,
                                password=self.password, dbname=dbname or self.dbname,
                                connect_timeout=5)
        conn.autocommit = autocommit
        return conn

    def query(self, sql, params=None):
        """Runs one statement on a fresh connection and returns all rows
        (None for statements without a result)."""
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def log_tail(self, n=40):
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no server log)"
