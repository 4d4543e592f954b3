"""Security findings of issue 10 against a real api-gateway and PostgreSQL:
look-alike CORS origins, memory before authentication (headers-first
decisions, per-address connection cap, header deadline, chunked bodies cut
off), password guessing, secrets in production, URL masking in logs and
access tokens revoked at once.

Uses its own database `ae_test_gwsec_<pid>` (created, migrated with
bin/migrate, dropped at the end) and starts each bin/api-gateway it needs on
a free port.
"""

import json
import os
import re
import socket
import sys
import threading
import time
import unittest
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import (AMQP_URL, REDIS_URL, ROOT, Service, http, http_json, private_db_create,  # noqa: E402
                    private_db_drop, wait_for)
from pgtmp import free_port  # noqa: E402

import psycopg2  # noqa: E402

JWT_SECRET = "gwsec-test-secret-0123456789abcdef-xyz"
INGEST_TOKEN = "gwsec-test-ingest-token-0123456789abcdef"
DB_NAME = "ae_test_gwsec_%d" % os.getpid()
TEST_DB_URL = None


def setUpModule():
    global TEST_DB_URL
    TEST_DB_URL = private_db_create(DB_NAME)


def tearDownModule():
    private_db_drop(DB_NAME)


def db():
    c = psycopg2.connect(TEST_DB_URL)
    c.autocommit = True
    return c


class Gateway:
    """One bin/api-gateway on a free port; `env` overrides the defaults below
    (a value of None removes the variable)."""

    def __init__(self, **env):
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        e = {"SERVER_PORT": self.port, "SERVER_HOST": "127.0.0.1", "DATABASE_URL": TEST_DB_URL,
             "JWT_SECRET": JWT_SECRET, "INGEST_TOKEN": INGEST_TOKEN, "RATE_LIMIT": "100000000",
             "HEALTH_CHECK_INTERVAL": "200ms"}
        e.update({k: v for k, v in env.items() if v is not None})
        self.svc = Service("api-gateway", e, health=self.base + "/api/v1/health", health_status=200)
        for k, v in env.items():
            if v is None:
                self.svc.env.pop(k, None)

    def __enter__(self):
        self.svc.start()
        return self

    def __exit__(self, *exc):
        self.svc.stop()
        return False

    def call(self, method, path, body=None, token=None, headers=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        return http_json(method, self.base + path, body, h)

    def user(self, prefix="s", password="correct horse 1"):
        """Registers and logs in a fresh user; returns (user, tokens)."""
        name = "%s_%s" % (prefix, uuid.uuid4().hex[:10])
        st, _, user = self.call("POST", "/api/v1/auth/register",
                                {"username": name, "email": name + "@example.com", "password": password})
        assert st == 201, (st, user)
        st, _, tok = self.call("POST", "/api/v1/auth/login", {"username": name, "password": password})
        assert st == 200, (st, tok)
        return user, tok


def raw_connect(port, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_response(s, limit=65536):
    """Reads one response head (and whatever body came with it) until the
    blank line; returns the bytes, b'' when the server closed at once."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def closed_by_peer(s, wait):
    """True when the server closed the socket within `wait` seconds (what
    it wrote before, such as a 408, is read and dropped)."""
    s.settimeout(wait)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# --------------------------------------------------------------------------- 3. CORS

LOOKALIKES = ["http://localhost.evil.com", "http://localhostevil.com", "http://127.0.0.1.nip.io",
              "http://localhost:3000.evil.com", "http://127.0.0.1:80@evil.com"]


class Cors(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The default CORS_ORIGINS (http://localhost*, http://127.0.0.1*).
        cls.gw = Gateway(CORS_ORIGINS=None).__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.gw.__exit__()

    def test_lookalikes_refused_on_preflight(self):
        for origin in LOOKALIKES:
            with self.subTest(origin=origin):
                st, h, body = http("OPTIONS", self.gw.base + "/api/v1/triggers", headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST"})
                self.assertEqual(st, 403)
                self.assertNotIn("access-control-allow-origin", h)
                self.assertNotIn("access-control-allow-credentials", h)
                self.assertEqual(json.loads(body)["error"], "forbidden")

    def test_lookalikes_get_no_cors_headers_on_simple_requests(self):
        for origin in LOOKALIKES:
            with self.subTest(origin=origin):
                st, h, _ = http("GET", self.gw.base + "/api/v1/health", headers={"Origin": origin})
                self.assertEqual(st, 200)
                self.assertNotIn("access-control-allow-origin", h)
                self.assertNotIn("access-control-allow-credentials", h)

    def test_default_origins_with_and_without_port(self):
        for origin in ["http://localhost", "http://localhost:3000", "http://127.0.0.1", "http://127.0.0.1:5173"]:
            with self.subTest(origin=origin):
                st, h, _ = http("OPTIONS", self.gw.base + "/api/v1/triggers", headers={
                    "Origin": origin, "Access-Control-Request-Method": "POST"})
                self.assertEqual(st, 204)
                self.assertEqual(h["access-control-allow-origin"], origin)
                self.assertEqual(h["access-control-allow-credentials"], "true")
                st, h, _ = http("GET", self.gw.base + "/api/v1/health", headers={"Origin": origin})
                self.assertEqual(h["access-control-allow-origin"], origin)

    def test_star_never_with_credentials(self):
        with Gateway(CORS_ORIGINS="*") as gw:
            for origin in ["https://anywhere.example", "http://localhost.evil.com"]:
                st, h, _ = http("OPTIONS", gw.base + "/api/v1/triggers", headers={
                    "Origin": origin, "Access-Control-Request-Method": "GET"})
                self.assertEqual(st, 204)
                self.assertEqual(h["access-control-allow-origin"], "*")
                self.assertNotIn("access-control-allow-credentials", h)
                st, h, _ = http("GET", gw.base + "/api/v1/health", headers={"Origin": origin})
                self.assertEqual(h["access-control-allow-origin"], "*")
                self.assertNotIn("access-control-allow-credentials", h)


# --------------------------------------------------------------------------- 8. password guessing

class PasswordGuessing(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.gw = Gateway(LOGIN_MAX_FAILURES="3", LOGIN_BACKOFF_MAX="4s").__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.gw.__exit__()

    def login(self, password, username=None, email=None):
        body = {"password": password}
        if username:
            body["username"] = username
        if email:
            body["email"] = email
        st, h, resp = self.gw.call("POST", "/api/v1/auth/login", body)
        return st, h, resp

    def test_per_account_limit_with_back_off(self):
        user, _ = self.gw.user(password="right password 1")
        name, email = user["username"], user["email"]
        for _ in range(3):
            self.assertEqual(self.login("wrong password", name)[0], 401)
        # Locked for 1 s: even the right password, by name or by email, is refused without a hash.
        st, h, body = self.login("right password 1", name)
        self.assertEqual((st, body["error"]), (429, "rate_limited"))
        self.assertEqual(h["retry-after"], "1")
        self.assertEqual(self.login("right password 1", email=email.upper())[0], 429)
        # Other accounts are not affected.
        other, _ = self.gw.user(password="other password 1")
        self.assertEqual(self.login("other password 1", other["username"])[0], 200)
        time.sleep(1.1)
        # The next failure doubles the lock.
        self.assertEqual(self.login("wrong password", name)[0], 401)
        st, h, _ = self.login("right password 1", name)
        self.assertEqual((st, h["retry-after"]), (429, "2"))
        time.sleep(2.1)
        self.assertEqual(self.login("right password 1", name)[0], 200)
        # A success clears the count.
        self.assertEqual(self.login("wrong password", name)[0], 401)
        self.assertEqual(self.login("right password 1", name)[0], 200)

    def test_unknown_accounts_limited_alike(self):
        name = "nobody_" + uuid.uuid4().hex[:8]
        for _ in range(3):
            self.assertEqual(self.login("whatever", name)[0], 401)
        st, h, _ = self.login("whatever", name.upper())
        self.assertEqual((st, h["retry-after"]), (429, "1"))

    def test_concurrent_hashes_capped(self):
        with Gateway(LOGIN_MAX_CONCURRENT_HASHES="1", HTTP_THREADS="8") as gw:
            results = []
            barrier = threading.Barrier(16)

            def attempt(i):
                barrier.wait()
                st, h, _ = http_json("POST", gw.base + "/api/v1/auth/login",
                                     {"username": "cap_%d_%s" % (i, uuid.uuid4().hex[:6]), "password": "x" * 64})
                results.append((st, h.get("retry-after")))

            threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            statuses = sorted(st for st, _ in results)
            self.assertEqual(set(statuses) - {401, 429}, set(), statuses)
            self.assertIn(429, statuses)
            self.assertIn(401, statuses)
            self.assertTrue(all(ra == "1" for st, ra in results if st == 429), results)
            self.assertGreaterEqual(metric(gw.base, 'gateway_login_throttled_total{reason="hashes"}'), 1)


# --------------------------------------------------------------------------- 7. memory before authentication

class HeadersFirst(unittest.TestCase):
    """Rate limit and authentication are decided on the headers: a refused
    request is answered without its body being sent at all."""

    @classmethod
    def setUpClass(cls):
        cls.gw = Gateway().__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.gw.__exit__()

    def head_only(self, port, path, extra=""):
        """Sends only the headers of a POST declaring a 900 kB body; returns
        the answer that comes without the body."""
        s = raw_connect(port, timeout=3)
        try:
            s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       "Content-Length: 900000\r\n%s\r\n" % (path, extra)).encode())
            return read_response(s)
        finally:
            s.close()

    def test_unauthenticated_answered_before_body(self):
        for path in ["/api/v1/triggers", "/api/v1/chain-events", "/internal/v1/sse/some-client",
                     "/api/v1/auth/logout-all"]:
            with self.subTest(path=path):
                t0 = time.monotonic()
                data = self.head_only(self.gw.port, path)
                self.assertTrue(data.startswith(b"HTTP/1.1 401"), data[:200])
                self.assertLess(time.monotonic() - t0, 2.5)
        data = self.head_only(self.gw.port, "/api/v1/triggers", "Authorization: Bearer forged.token.here\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 401"), data[:200])

    def test_rate_limited_answered_before_body(self):
        with Gateway(RATE_LIMIT="2") as gw:
            self.assertEqual(http("GET", gw.base + "/api/v1/chain-events")[0], 401)
            self.assertEqual(http("GET", gw.base + "/api/v1/chain-events")[0], 401)
            data = self.head_only(gw.port, "/api/v1/auth/register")
            self.assertTrue(data.startswith(b"HTTP/1.1 429"), data[:200])
            self.assertIn(b"Retry-After:", data)

    def test_small_refused_body_still_gets_its_answer_and_keep_alive(self):
        s = raw_connect(self.gw.port)
        try:
            body = b'{"name":"x"}'
            req = (b"POST /api/v1/triggers HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            s.sendall(req)
            self.assertTrue(read_response(s).startswith(b"HTTP/1.1 401"))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(read_response(s).startswith(b"HTTP/1.1 200"))
        finally:
            s.close()

    def test_authenticated_body_is_read(self):
        _, tok = self.gw.user()
        st, _, t = self.gw.call("POST", "/api/v1/triggers", {
            "name": "n", "chain_id": 1, "registry": "identity",
            "conditions": [{"condition_type": "event_type_equals", "value": "AgentRegistered"}],
            "actions": [{"action_type": "rest", "config": {"method": "POST", "url": "https://hooks.example.com/x"}}]},
            token=tok["access_token"])
        self.assertEqual(st, 201, t)

    def test_account_routes_take_small_bodies(self):
        big = {"username": "u" * 10, "password": "p" * 10, "pad": "x" * 20000}
        st, _, body = self.gw.call("POST", "/api/v1/auth/login", big)
        self.assertEqual((st, body["error"]), (413, "payload_too_large"))

    def test_chunked_body_over_limit_413(self):
        s = raw_connect(self.gw.port)
        try:
            s.sendall(b"POST /api/v1/chain-events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + INGEST_TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 65536
            for _ in range(24):  # 1.5 MiB against the 1 MiB limit
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
            data = read_response(s)
            self.assertTrue(data.startswith(b"HTTP/1.1 413"), data[:200])
        finally:
            s.close()

    def test_endless_chunked_body_cut_off(self):
        s = raw_connect(self.gw.port, timeout=10)
        sent = 0
        try:
            s.sendall(b"POST /api/v1/chain-events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + INGEST_TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 65536
            frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
            try:
                while sent < 200 * 1024 * 1024:
                    s.sendall(frame)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        finally:
            s.close()
        # The server stops reading at its bound (8 x the 1 MiB limit), well before 200 MiB.
        self.assertLess(sent, 40 * 1024 * 1024)
        self.assertEqual(http("GET", self.gw.base + "/health")[0], 200)


class ConnectionLimits(unittest.TestCase):
    def test_per_ip_connection_cap(self):
        with Gateway(MAX_CONNECTIONS_PER_IP="10") as gw:
            held = []

            def take_ten():
                # Connections this test closed (the start-up health polls,
                # a failed round) count until the gateway has seen them
                # close, which under load can lag: the cap is asserted on
                # ten the gateway holds for certain, not on its timing.
                for s in held:
                    s.close()
                held.clear()
                for _ in range(10):
                    s = raw_connect(gw.port)
                    held.append(s)
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    if not read_response(s).startswith(b"HTTP/1.1 200"):
                        return False
                return True
            try:
                wait_for(take_ten, 20, interval=0.3, what="ten connections served")
                extra = raw_connect(gw.port)
                try:
                    extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.assertEqual(read_response(extra), b"", "the 11th connection must be refused")
                extra.close()
                held.pop().close()
                time.sleep(0.3)
                st = wait_for(lambda: http("GET", gw.base + "/health")[0] == 200, 20, what="a slot again")
                self.assertTrue(st)
            finally:
                for s in held:
                    s.close()

    def test_slow_loris_connections_closed(self):
        n = 200
        with Gateway(HTTP_HEADER_TIMEOUT="2s", MAX_CONNECTIONS_PER_IP="0") as gw:
            socks = []
            try:
                for _ in range(n):
                    s = raw_connect(gw.port)
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                    socks.append(s)
                open_ = set(range(n))
                t0 = time.monotonic()
                # A header line per connection every 0.5 s keeps MHD's idle timeout at bay.
                while open_ and time.monotonic() - t0 < 8:
                    for i in list(open_):
                        try:
                            socks[i].sendall(b"X-Trickle: 1\r\n")
                        except (BrokenPipeError, ConnectionResetError):
                            open_.discard(i)
                            continue
                        if closed_by_peer(socks[i], 0.001):
                            open_.discard(i)
                    # A normal client is served meanwhile.
                    self.assertEqual(http("GET", gw.base + "/health")[0], 200)
                    time.sleep(0.5)
                elapsed = time.monotonic() - t0
                self.assertEqual(len(open_), 0, "%d of %d trickling connections still open" % (len(open_), n))
                self.assertGreater(elapsed, 1.5, "closed before the deadline")
                metrics = http("GET", gw.base + "/metrics")[2].decode()
                line = [m for m in metrics.splitlines() if m.startswith("http_header_timeouts_total")]
                self.assertTrue(line and int(float(line[0].split()[-1])) >= n, line)
            finally:
                for s in socks:
                    s.close()



# --------------------------------------------------------------------------- 10. URLs masked in logs

def with_query_password(url, password):
    """`url` with its userinfo password moved to ?password= (libpq takes both)."""
    u = urllib.parse.urlsplit(url)
    netloc = "%s@%s:%d" % (u.username, u.hostname, u.port)
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "password=%s&application_name=gwsec" % password, ""))


class UrlMasking(unittest.TestCase):
    def test_database_url_query_password_masked_at_start(self):
        pw = urllib.parse.urlsplit(TEST_DB_URL).password
        url = with_query_password(TEST_DB_URL, pw)
        with Gateway(DATABASE_URL=url) as gw:
            self.assertEqual(http("GET", gw.base + "/api/v1/health")[0], 200)
            log = gw.svc.log()
        self.assertNotIn("password=" + pw, log)
        shown = [r for r in gw.svc.log_lines() if r.get("msg") == "database"]
        self.assertTrue(shown, log[-2000:])
        self.assertIn("?password=***&application_name=gwsec", shown[0]["url"])

    def test_bad_database_url_error_masks_every_secret(self):
        port = free_port()
        svc = Service("api-gateway", {
            "SERVER_PORT": port, "SERVER_HOST": "127.0.0.1", "JWT_SECRET": JWT_SECRET, "INGEST_TOKEN": INGEST_TOKEN,
            "DATABASE_URL": "postgres://app:hunter2-userinfo@127.0.0.1:notaport/db?password=hunter2-query&sslmode=disable"})
        svc.start()
        self.assertEqual(svc.proc.wait(20), 2)
        svc.stop()
        log = svc.log()
        self.assertIn("DATABASE_URL", log)
        self.assertNotIn("hunter2", log)
        self.assertIn("password=***", log)

    def test_every_service_masks_its_urls_at_start(self):
        u = urllib.parse.urlsplit(REDIS_URL)
        redis_url = "redis://:hunter2-redis@%s:%d/0" % (u.hostname, u.port)
        db = with_query_password(TEST_DB_URL, urllib.parse.urlsplit(TEST_DB_URL).password)
        a = urllib.parse.urlsplit(AMQP_URL)
        amqp_url = "amqp://%s:hunter2-amqp@%s:%d/%%2f" % (a.username, a.hostname, a.port)
        for name in ["event-processor", "action-workers", "realtime"]:
            with self.subTest(service=name):
                svc = Service(name, {"DATABASE_URL": db, "REDIS_URL": redis_url, "METRICS_PORT": free_port(),
                                     "PORT": free_port(), "AMQP_URL": amqp_url})
                svc.start()
                try:
                    wait_for(lambda: re.search(r'"msg":"redis".*"url":"redis://:\*\*\*@', svc.log()), 15,
                             what="%s logs its Redis URL" % name)
                    wait_for(lambda: '"msg":"database"' in svc.log(), 15, what="%s logs its database" % name)
                    if name == "realtime":
                        wait_for(lambda: '"url":"amqp://%s:***@' % a.username in svc.log(), 15,
                                 what="realtime logs its AMQP URL")
                finally:
                    svc.stop()
                log = svc.log()
                self.assertNotIn("hunter2", log)
                self.assertNotIn("password=" + urllib.parse.urlsplit(TEST_DB_URL).password, log)



# --------------------------------------------------------------------------- 6. secrets in production

class ProductionSecrets(unittest.TestCase):
    def run_gw(self, **env):
        port = free_port()
        e = {"SERVER_PORT": port, "SERVER_HOST": "127.0.0.1", "DATABASE_URL": TEST_DB_URL, "APP_ENV": "production",
             "JWT_SECRET": JWT_SECRET, "INGEST_TOKEN": INGEST_TOKEN, "INTERNAL_TOKEN": "i" * 40}
        e.update(env)
        svc = Service("api-gateway", e, health="http://127.0.0.1:%d/health" % port)
        return svc

    def test_placeholders_and_short_secrets_stop_start_up(self):
        # What docker-compose used to fall back to, and a short one.
        for var, value in [("JWT_SECRET", "change-me-in-production"), ("INGEST_TOKEN", "change-me-ingest"),
                           ("INTERNAL_TOKEN", "change-me-internal-0123456789abcdef0123"),
                           ("JWT_SECRET", "short-but-not-default")]:
            with self.subTest(var=var, value=value):
                svc = self.run_gw(**{var: value})
                svc.health = None
                svc.start()
                try:
                    self.assertEqual(svc.proc.wait(20), 2)
                finally:
                    svc.stop()
                log = svc.log()
                self.assertIn(var, log)
                self.assertNotIn(value, log)

    def test_long_own_secrets_start(self):
        svc = self.run_gw()
        svc.start()
        try:
            self.assertEqual(http("GET", svc.health)[0], 200)
        finally:
            svc.stop()

    def test_compose_requires_every_secret(self):
        with open(os.path.join(ROOT, "docker", "docker-compose.yml")) as f:
            text = "\n".join(line for line in f.read().splitlines() if not line.lstrip().startswith("#"))
        self.assertNotIn("change-me", text.lower())
        for var in ["JWT_SECRET", "INGEST_TOKEN", "INTERNAL_TOKEN", "RUNTIME_SYNC_TOKEN_SIGNING_KEY"]:
            with self.subTest(var=var):
                refs = re.findall(r"\$\{%s([^}]*)\}" % var, text)
                self.assertTrue(refs, "%s is not passed to the services" % var)
                for r in refs:
                    self.assertTrue(r.startswith(":?"), "${%s%s} has a fallback" % (var, r))
        self.assertIn("APP_ENV: ${APP_ENV:-production}", text)



# --------------------------------------------------------------------------- 11. access tokens revoked at once

def metric(base, name):
    for line in http("GET", base + "/metrics")[2].decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


class Revocation(unittest.TestCase):
    """Two gateway instances on one database: a logout-everywhere or a
    deactivation through either (or in SQL) stops every access token on
    both, without a database round trip per request otherwise."""

    @classmethod
    def setUpClass(cls):
        cls.a = Gateway().__enter__()
        cls.b = Gateway().__enter__()
        for gw in (cls.a, cls.b):
            wait_for(lambda: "api-gateway-tokens" in gw.svc.log() and '"msg":"listening"' in gw.svc.log(), 10,
                     what="the token listener")

    @classmethod
    def tearDownClass(cls):
        cls.a.__exit__()
        cls.b.__exit__()

    def status(self, gw, token):
        st, _, body = gw.call("GET", "/api/v1/triggers", token=token)
        return st, (body or {}).get("details", {}).get("reason")

    def test_short_access_tokens_by_default(self):
        _, tok = self.a.user()
        self.assertEqual(tok["expires_in"], 900)
        claims = json.loads(__import__("base64").urlsafe_b64decode(tok["access_token"].split(".")[1] + "=="))
        self.assertEqual(claims["exp"] - claims["iat"], 900)

    def test_logout_all_stops_tokens_on_every_instance_at_once(self):
        user, tok = self.a.user()
        _, tok2 = self.a.call("POST", "/api/v1/auth/login", {"username": user["username"], "password": "correct horse 1"})[1:]
        for gw in (self.a, self.b):
            self.assertEqual(self.status(gw, tok["access_token"]), (200, None))
        st, _, _ = self.a.call("POST", "/api/v1/auth/logout-all", token=tok["access_token"])
        self.assertEqual(st, 204)
        # The instance that took the request: at once.
        self.assertEqual(self.status(self.a, tok["access_token"]), (401, "token_revoked"))
        self.assertEqual(self.status(self.a, tok2["access_token"]), (401, "token_revoked"))
        # The other one: as soon as PostgreSQL's notification arrives (milliseconds).
        wait_for(lambda: self.status(self.b, tok2["access_token"]) == (401, "token_revoked"), 2,
                 what="instance B refusing the revoked token")
        self.assertEqual(self.status(self.b, tok["access_token"]), (401, "token_revoked"))
        # Refresh tokens are revoked too.
        st, _, _ = self.b.call("POST", "/api/v1/auth/refresh", {"refresh_token": tok2["refresh_token"]})
        self.assertEqual(st, 401)
        # A login right after (often in the same second) gives a token that works everywhere.
        st, _, fresh = self.b.call("POST", "/api/v1/auth/login", {"username": user["username"], "password": "correct horse 1"})
        self.assertEqual(st, 200)
        for gw in (self.a, self.b):
            self.assertEqual(self.status(gw, fresh["access_token"]), (200, None))
        # Logout-everywhere needs a valid token itself.
        st, _, _ = self.a.call("POST", "/api/v1/auth/logout-all", token=tok["access_token"])
        self.assertEqual(st, 401)
        self.assertEqual(self.a.call("POST", "/api/v1/auth/logout-all")[0], 401)

    def test_deactivation_in_sql_takes_effect_at_once(self):
        user, tok = self.a.user()
        for gw in (self.a, self.b):
            self.assertEqual(self.status(gw, tok["access_token"]), (200, None))
        with db() as c, c.cursor() as cur:
            cur.execute("UPDATE users SET is_active = false WHERE id = %s", (user["id"],))
        for gw in (self.a, self.b):
            wait_for(lambda: self.status(gw, tok["access_token"]) == (401, "account_inactive"), 2,
                     what="deactivated account refused")
        with db() as c, c.cursor() as cur:
            cur.execute("UPDATE users SET is_active = true WHERE id = %s", (user["id"],))
        for gw in (self.a, self.b):
            wait_for(lambda: self.status(gw, tok["access_token"]) == (200, None), 2, what="reactivated")
        with db() as c, c.cursor() as cur:
            cur.execute("DELETE FROM users WHERE id = %s", (user["id"],))
        for gw in (self.a, self.b):
            wait_for(lambda: self.status(gw, tok["access_token"]) == (401, "account_unknown"), 2,
                     what="deleted account refused")

    def test_listener_loss_drops_the_cache(self):
        """Notifications sent while the LISTEN connection is down are lost:
        after it reconnects nothing cached before is trusted."""
        gw = Gateway().__enter__()
        try:
            wait_for(lambda: '"msg":"listening"' in gw.svc.log(), 10, what="the token listener")
            user, tok = gw.user()
            self.assertEqual(self.status(gw, tok["access_token"]), (200, None))
            with db() as c, c.cursor() as cur:
                # (Every instance's listener on this database: the others reconnect too.)
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'api-gateway-tokens' AND datname = current_database()")
                # The change happens while nobody listens for it on that instance.
                cur.execute("UPDATE users SET is_active = false WHERE id = %s", (user["id"],))
            wait_for(lambda: "LISTEN connection lost" in gw.svc.log(), 5, what="the listener noticing")
            wait_for(lambda: self.status(gw, tok["access_token"]) == (401, "account_inactive"), 5,
                     what="the deactivated account refused after the listener came back")
            wait_for(lambda: gw.svc.log().count('"msg":"listening","listener"') >= 2, 10, what="reconnected")
            self.assertEqual(self.status(gw, tok["access_token"]), (401, "account_inactive"))
        finally:
            gw.__exit__()

    def test_no_database_round_trip_per_request(self):
        _, tok = self.a.user()
        self.assertEqual(self.status(self.a, tok["access_token"]), (200, None))
        reads = metric(self.a.base, "gateway_token_state_reads_total")
        hits = metric(self.a.base, "gateway_token_state_hits_total")
        for _ in range(30):
            self.assertEqual(self.status(self.a, tok["access_token"]), (200, None))
        self.assertEqual(metric(self.a.base, "gateway_token_state_reads_total"), reads)
        self.assertGreaterEqual(metric(self.a.base, "gateway_token_state_hits_total") - hits, 30)


if __name__ == "__main__":
    unittest.main()
