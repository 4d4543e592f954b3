"""Hostile input against a real api-gateway (issue 16): JSON nested 10,000
deep, invalid UTF-8, oversized headers and bodies, request smuggling
(conflicting Content-Length and Transfer-Encoding, two Content-Lengths,
obs-fold) on the gateway itself and through its proxy, path traversal in
proxied paths. Each is refused with the right status and the JSON error
body, nothing reaches the upstream that the client did not send as one
request, and the gateway keeps answering other clients.

Slow-loris (1,000 trickling connections per server) and WebSocket messages
that never end are in test_hostile_conns.py; the per-address connection cap
and endless chunked bodies in test_gateway_security.py; SSRF through action URLs and Telegram/template
injection in test_action_workers.py and test_hostile_actions.py.

Uses its own database `ae_test_hostile_<pid>` and an upstream of its own
(Python's http.server, which parses whatever follows a request on the same
connection as the next request: a smuggled request would show up there).
"""

import http.server as httpserver
import json
import os
import posixpath
import socket
import socketserver
import sys
import threading
import time
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import Service, http, http_json, private_db_create, private_db_drop  # noqa: E402
from pgtmp import free_port  # noqa: E402

JWT_SECRET = "hostile-test-secret-0123456789abcdef-xyz"
INGEST_TOKEN = "hostile-test-ingest-token-0123456789abcdef"
DB_NAME = "ae_test_hostile_%d" % os.getpid()


class Upstream(httpserver.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen = []  # (method, raw path, body bytes)
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def _answer(self):
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with Upstream.lock:
            Upstream.seen.append((self.command, self.path, body))
        out = json.dumps({"path": self.path, "len": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = _answer


class ThreadedServer(socketserver.ThreadingMixIn, httpserver.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def setUpModule():
    global DB_URL, UP, GW, PORT, BASE
    DB_URL = private_db_create(DB_NAME)
    UP = ThreadedServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=UP.serve_forever, daemon=True).start()
    PORT = free_port()
    BASE = "http://127.0.0.1:%d" % PORT
    GW = Service("api-gateway", {
        "SERVER_PORT": PORT, "SERVER_HOST": "127.0.0.1", "DATABASE_URL": DB_URL, "JWT_SECRET": JWT_SECRET,
        "INGEST_TOKEN": INGEST_TOKEN, "RATE_LIMIT": "100000000", "HEALTH_CHECK_INTERVAL": "200ms",
        "LOG_LEVEL": "warn", "ECHO_URL": "http://127.0.0.1:%d/base" % UP.server_address[1]},
        health=BASE + "/api/v1/health", health_status=200).start()


def tearDownModule():
    GW.stop()
    UP.shutdown()
    private_db_drop(DB_NAME)


def raw(data, timeout=5, read_all=True):
    """Sends raw bytes on a fresh connection; returns everything the gateway
    answered until it closed or went quiet for a second."""
    s = socket.create_connection(("127.0.0.1", PORT), timeout=timeout)
    try:
        s.sendall(data)
        s.settimeout(1.0 if read_all else timeout)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def statuses(resp):
    """The status codes of the responses in `resp`, in order."""
    return [int(line.split(b" ")[1]) for line in resp.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def json_body(resp):
    """The JSON body of the first response in `resp`."""
    head, _, rest = resp.partition(b"\r\n\r\n")
    length = None
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    return json.loads(rest[:length] if length is not None else rest)


class HostileBase(unittest.TestCase):
    def setUp(self):
        with Upstream.lock:
            Upstream.seen.clear()

    def tearDown(self):
        # Whatever the test sent, the gateway is up and answers others.
        self.assertIsNone(GW.proc.poll(), "the gateway died")
        st, _, body = http_json("GET", BASE + "/api/v1/health")
        self.assertEqual(st, 200, body)
        st, _, body = http_json("GET", BASE + "/api/v1/echo/after")
        self.assertEqual((st, body["path"]), (200, "/base/after"))

    def assertError(self, status, hdrs_body, want_status, code="invalid_request"):
        self.assertEqual(status, want_status, hdrs_body)
        self.assertEqual(hdrs_body["error"], code, hdrs_body)
        self.assertIn("request_id", hdrs_body)

    def ingest(self, data):
        return http("POST", BASE + "/api/v1/chain-events", data,
                    {"Authorization": "Bearer " + INGEST_TOKEN, "Content-Type": "application/json"})


class DeepAndBrokenJson(HostileBase):
    def test_nested_10000_deep(self):
        for doc in (b"[" * 10000 + b"]" * 10000, b'{"a":' * 10000 + b"1" + b"}" * 10000):
            st, _, data = self.ingest(doc)
            self.assertError(st, json.loads(data), 400)
            # The same through the trigger routes (authenticated first).
            st, _, data = http("POST", BASE + "/api/v1/triggers", doc,
                               {"Authorization": "Bearer x", "Content-Type": "application/json"})
            self.assertEqual(st, 401)

    def test_invalid_utf8_refused_not_stored(self):
        def ev(n, tag):
            return {"id": "ev-hostile-%d-%d" % (os.getpid(), n), "chain_id": 11155111, "block_number": 1000 + n,
                    "block_hash": "0xbb", "transaction_hash": "0x%02x" % n, "log_index": 0, "registry": "reputation",
                    "event_type": "NewFeedback", "agent_id": 42, "timestamp": 1700000000 + n,
                    "client_address": "0xc1", "feedback_index": 1, "score": 90, "tag1": tag, "tag2": "speed"}
        st, _, data = self.ingest(json.dumps([ev(0, "fine")]).encode())
        self.assertEqual((st, json.loads(data)["inserted"]), (200, 1), data)
        for i, bad in enumerate((b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"ab\xe2\x82", b"\xf4\x90\x80\x80")):
            text = json.dumps([ev(i + 1, "PLACEHOLDER")]).encode()
            st, _, data = self.ingest(text.replace(b"PLACEHOLDER", bad))
            body = json.loads(data)
            self.assertError(st, body, 400)
            self.assertIn("invalid UTF-8", body["message"])
            self.assertEqual(body["details"]["position"], text.index(b"PLACEHOLDER") + (2 if bad[:2] == b"ab" else 0))
        # An escaped lone surrogate is not text either.
        st, _, data = self.ingest(json.dumps([ev(9, "PLACEHOLDER")]).encode().replace(b"PLACEHOLDER", b"\\ud800"))
        self.assertError(st, json.loads(data), 400)
        # Nothing of them was stored: only the first event.
        import psycopg2
        c = psycopg2.connect(DB_URL)
        try:
            with c.cursor() as cur:
                cur.execute("SELECT id FROM events WHERE id LIKE %s ORDER BY id", ("ev-hostile-%d-%%" % os.getpid(),))
                self.assertEqual([r[0] for r in cur.fetchall()], ["ev-hostile-%d-0" % os.getpid()])
        finally:
            c.close()


class Oversized(HostileBase):
    def test_huge_header_refused(self):
        resp = raw(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (256 * 1024) + b"\r\n\r\n")
        self.assertTrue(resp == b"" or statuses(resp)[0] in (400, 413, 431), resp[:200])

    def test_many_headers_refused(self):
        hdrs = b"".join(b"X-H%d: v\r\n" % i for i in range(20000))
        resp = raw(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n" + hdrs + b"\r\n")
        self.assertTrue(resp == b"" or statuses(resp)[0] in (400, 413, 431), resp[:200])

    def test_declared_huge_body_413_before_reading(self):
        resp = raw(b"POST /api/v1/chain-events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                   INGEST_TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 1073741824\r\n\r\n[", read_all=True)
        self.assertEqual(statuses(resp)[:1], [413], resp[:300])
        self.assertEqual(json_body(resp)["error"], "payload_too_large")

    def test_proxied_body_over_limit(self):
        resp = raw(b"POST /api/v1/echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n")
        self.assertTrue(resp == b"" or statuses(resp)[0] in (400, 413), resp[:300])
        self.assertEqual(Upstream.seen, [])


SMUGGLED = b"GET /api/v1/echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


class Smuggling(HostileBase):
    def assertNotSmuggled(self, resp):
        time.sleep(0.3)
        with Upstream.lock:
            paths = [p for _, p, _ in Upstream.seen]
        self.assertFalse([p for p in paths if "smuggled" in p], (paths, resp[:400]))

    def test_cl_and_te_on_gateway_route(self):
        # Content-Length covers the smuggled request, chunked ends before it:
        # refused, or read as chunked (RFC 9112 6.1) and the connection closed.
        body = b"0\r\n\r\n" + SMUGGLED
        resp = raw(b"POST /api/v1/chain-events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Authorization: Bearer " + INGEST_TOKEN.encode() + b"\r\n"
                   b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body) + body)
        self.assertEqual(statuses(resp)[0], 400, resp[:400])
        self.assertLessEqual(len(statuses(resp)), 1, resp[:600])
        self.assertNotSmuggled(resp)

    def test_cl_and_te_through_proxy(self):
        for te in (b"chunked", b" chunked", b"chunked, identity", b"identity, chunked"):
            body = b"0\r\n\r\n" + SMUGGLED
            resp = raw(b"POST /api/v1/echo/a HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: %d\r\nTransfer-Encoding: %s\r\n\r\n" % (len(body), te) + body)
            self.assertIn(statuses(resp)[:1], ([400], [501]), (te, resp[:400]))
            self.assertNotSmuggled(resp)

    def test_te_then_cl_through_proxy(self):
        # Chunked body that holds the smuggled request; a too short CL.
        chunk = b"x" * 5
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
        resp = raw(b"POST /api/v1/echo/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                   b"Content-Length: 3\r\n\r\n" + body + SMUGGLED)
        self.assertIn(statuses(resp)[:1], ([400], [501]), resp[:400])
        self.assertNotSmuggled(resp)

    def test_two_content_lengths(self):
        resp = raw(b"POST /api/v1/echo/c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                   b"Content-Length: %d\r\n\r\nhello" % (5 + len(SMUGGLED)) + SMUGGLED)
        self.assertEqual(statuses(resp)[:1], [400], resp[:400])
        self.assertNotSmuggled(resp)
        resp = raw(b"POST /api/v1/echo/c HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!")
        self.assertEqual(statuses(resp)[:1], [400], resp[:400])

    def test_obs_fold(self):
        # A folded Transfer-Encoding (or any folded header) is refused
        # (RFC 9112 5.2: a server rejects obs-fold or replaces it by spaces;
        # a proxy must not forward it).
        resp = raw(b"POST /api/v1/echo/d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A: a\r\n"
                   b" Transfer-Encoding: chunked\r\n\r\nhello")
        st = statuses(resp)[:1]
        self.assertIn(st, ([400], [200]), resp[:400])
        if st == [200]:
            # Folded into X-A's value: one request with the 5 bytes.
            with Upstream.lock:
                self.assertEqual([(m, p, b) for m, p, b in Upstream.seen], [("POST", "/base/d", b"hello")])
        resp = raw(b"GET /api/v1/echo/e HTTP/1.1\r\nHost: x\r\n Transfer-Encoding: chunked\r\n\r\n")
        self.assertIn(statuses(resp)[:1], ([400], [200]), resp[:400])
        self.assertNotSmuggled(resp)

    def test_bad_chunk_sizes(self):
        for bad in (b"-1", b"0x5", b"fffffffffffffffffffff", b"5 ;", b"g"):
            resp = raw(b"POST /api/v1/echo/f HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
                       bad + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED)
            self.assertTrue(resp == b"" or statuses(resp)[0] in (400, 413), (bad, resp[:300]))
            self.assertNotSmuggled(resp)


class Traversal(HostileBase):
    def test_proxied_paths_stay_under_the_base(self):
        tries = ["/api/v1/echo/../../etc/passwd", "/api/v1/echo/%2e%2e/x", "/api/v1/echo/..%2f..%2fadmin",
                 "/api/v1/echo/..%2F..%2Fadmin", "/api/v1/echo/%2e%2e%2f%2e%2e%2fadmin", "/api/v1/echo/a/..",
                 "/api/v1/echo/.%2e/x", "/api/v1/echo/..\\..\\admin", "/api/v1/echo/..%5c..%5cadmin",
                 "/api/v1/echo/%252e%252e/x", "/api/v1/echo//../x", "/api/v1/echo/x/./../../y",
                 "/api/v1/echo/%00/../x", "/api/v1/echo/..;/x"]
        for path in tries:
            resp = raw(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            st = statuses(resp)[:1]
            self.assertTrue(st in ([400], [404], [200]), (path, resp[:300]))
            if st == [400]:
                self.assertEqual(json_body(resp)["error"], "invalid_request", path)
        with Upstream.lock:
            seen = [p for _, p, _ in Upstream.seen]
        for p in seen:
            # What reached the upstream, decoded as an upstream would (with
            # backslashes as separators too), normalised, stays in /base/.
            d = urllib.parse.unquote(p.split("?")[0]).replace("\\", "/")
            self.assertTrue(posixpath.normpath(d).startswith("/base/") or posixpath.normpath(d) == "/base",
                            (p, seen))


class RuntimeBodies(unittest.TestCase):
    """The runtime's append bodies (its own HTTP server, libshared/wsapp)."""

    def test_append_bodies_refused_and_run_intact(self):
        from test_runtime import Runtime
        rt = Runtime().start()
        try:
            run = rt.new_run()
            path = rt.base + "/internal/v1/runs/%s/events" % run["id"]
            for bad in (b'{"event_type":"x","payload":{"t":"\xff"}}', b'{"event_type":"\xed\xa0\x80"}',
                        b'{"event_type":"x","payload":' + b"[" * 10000 + b"]" * 10000 + b"}"):
                st, _, data = http("POST", path, bad, {"Content-Type": "application/json"})
                body = json.loads(data)
                self.assertEqual((st, body["error"]), (400, "invalid_request"), (bad[:60], body))
            st, _, b = rt.append(run["id"], "step", {"ok": "caf\u00e9"})
            self.assertEqual(st, 200, b)
            st, _, b = rt.call("GET", "/internal/v1/runs/" + run["id"])
            self.assertEqual([e["seq"] for e in b["run"]["events"]], [1, 2], b)
            self.assertIsNone(rt.proc.poll())
        finally:
            rt.stop()


if __name__ == "__main__":
    unittest.main()
