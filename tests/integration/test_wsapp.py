"""libshared/wsapp (HTTP and WebSocket on one port over libwebsockets),
driven through tests/integration/drivers/wsapp_demo.c: HTTP routing, bodies
and 413, the error body and X-Request-Id, WebSocket accept/refuse before
the upgrade, subprotocols longer than lws 4.1 accepts by itself, echo of
text/binary, oversize frames, pings and pongs, timers, close codes, a slow
reader dropped while others go on, streamed (chunked) answers written by
another thread with the producer held back by a client that stops reading,
SO_REUSEPORT and SIGTERM.

The WebSocket client is the stock npm `ws` package (node), beside raw
sockets for what a polite client cannot do (stop reading)."""

import hashlib
import http.client as httpclient
import json
import os
import signal
import socket
import subprocess
import time
import unittest

from aetest import ROOT, http, recv_to_close, wait_for
from pgtmp import free_port
from tools import need
import wsraw

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(ROOT, os.environ.get("O", "build"), "tests", "drivers", "wsapp_demo")


def setUpModule():
    subprocess.run([os.path.join(HERE, "setup-node.sh")], check=True)


class Demo:
    def __init__(self, port=0, reuse=False, env=None):
        self.proc = subprocess.Popen([DEMO, str(port), "1" if reuse else "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            raise AssertionError("wsapp_demo did not start: %r %s" % (line, self.proc.stderr.read()))
        self.port = int(line.split()[1])
        self.base = "http://127.0.0.1:%d" % self.port

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


def node(script, timeout=30):
    """Runs a node script (with `ws` resolvable) and returns its JSON output."""
    r = subprocess.run([need("node"), "-e", script], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError("node failed: %s %s" % (r.stdout, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


CLIENT = r"""
const WebSocket = require('ws');
function run(url, protos, sends, waitMs) {
  return new Promise((res) => {
    const msgs = []; let proto = null;
    const ws = new WebSocket(url, protos || []);
    ws.on('unexpected-response', (req, r) => { let b = ''; r.on('data', d => b += d);
      r.on('end', () => res({status: r.statusCode, body: b, headers: r.headers})); });
    ws.on('open', () => { proto = ws.protocol; for (const s of sends) ws.send(s);
      setTimeout(() => ws.close(1000), waitMs); });
    ws.on('message', (d, bin) => msgs.push((bin ? 'bin:' + [...d].join(',') : d.toString()).slice(0, 60)));
    ws.on('close', (c, r) => res({msgs, code: c, reason: r.toString(), proto}));
    ws.on('error', e => msgs.push('error ' + e.message));
  });
}
"""


def ws_run(port, query, protos=None, sends=(), wait_ms=300, path="/echo"):
    script = CLIENT + "run(%s, %s, %s, %d).then(r => console.log(JSON.stringify(r)));" % (
        json.dumps("ws://127.0.0.1:%d%s%s" % (port, path, query)), json.dumps(protos or []),
        json.dumps(list(sends)), wait_ms)
    return node(script)


class DemoCase(unittest.TestCase):
    """One demo server for the whole class."""

    @classmethod
    def setUpClass(cls):
        cls.demo = Demo()

    @classmethod
    def tearDownClass(cls):
        cls.demo.stop()


class HttpTest(DemoCase):
    def test_routes_headers_and_request_id(self):
        status, hdrs, body = http("GET", self.demo.base + "/hello")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"hello": "world"})
        self.assertEqual(hdrs["x-demo"], "1")
        self.assertRegex(hdrs["x-request-id"], "^[0-9a-f]{32}$")
        status, hdrs, _ = http("GET", self.demo.base + "/hello", headers={"X-Request-Id": "abc-123"})
        self.assertEqual(hdrs["x-request-id"], "abc-123")
        status, hdrs, _ = http("GET", self.demo.base + "/hello", headers={"X-Request-Id": "bad id\"<"})
        self.assertRegex(hdrs["x-request-id"], "^[0-9a-f]{32}$")

    def test_prefix_route_query_and_header(self):
        status, _, body = http("GET", self.demo.base + "/items/a/b?q=x%20y", headers={"User-Agent": "ua-1"})
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body), {"path": "/items/a/b", "q": "x y", "ua": "ua-1"})

    def test_404_405_error_body(self):
        status, hdrs, body = http("GET", self.demo.base + "/nope")
        self.assertEqual(status, 404)
        b = json.loads(body)
        self.assertEqual(b["error"], "not_found")
        self.assertEqual(b["request_id"], hdrs["x-request-id"])
        status, _, body = http("DELETE", self.demo.base + "/hello")
        self.assertEqual(status, 405)
        self.assertEqual(json.loads(body)["error"], "invalid_request")

    def test_json_body_and_malformed(self):
        status, _, body = http("POST", self.demo.base + "/echo", body={"a": [1, 2]})
        self.assertEqual((status, json.loads(body)), (200, {"a": [1, 2]}))
        status, _, body = http("POST", self.demo.base + "/echo", body='{"a":',
                               headers={"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertIn("position", json.loads(body)["message"])

    def test_body_over_limit_is_413(self):
        status, _, body = http("POST", self.demo.base + "/echo", body="x" * 5000,
                               headers={"Content-Type": "application/json"})
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"], "payload_too_large")
        # Still serving.
        self.assertEqual(http("GET", self.demo.base + "/hello")[0], 200)

    def test_deferred_answer_from_another_thread(self):
        status, _, body = http("GET", self.demo.base + "/defer")
        self.assertEqual((status, json.loads(body)), (200, {"deferred": True}))

    def test_head_trickled_in_pieces(self):
        s = socket.create_connection(("127.0.0.1", self.demo.port))
        for piece in (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-", b"Length: 7\r\n\r\n", b'{"a":1}'):
            s.sendall(piece)
            time.sleep(0.1)
        s.settimeout(5)
        data = b""
        while b'{"a":1}' not in data:
            chunk = s.recv(4096)
            self.assertTrue(chunk, data)
            data += chunk
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
        s.close()

    def test_metrics(self):
        status, hdrs, body = http("GET", self.demo.base + "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"wsapp_http_responses_total", body)
        self.assertIn("text/plain", hdrs["content-type"])


def demo_lines(n):
    return b"".join(b"line %09d %84s\n" % (i, b"") for i in range(n))


class StreamTest(unittest.TestCase):
    """GET /stream: a thread writes numbered lines through 64 KiB."""

    def setUp(self):
        self.demo = Demo()

    def tearDown(self):
        self.demo.stop()

    def stats(self):
        return json.loads(http("GET", self.demo.base + "/stream-stats")[2])

    def test_long_body_whole_in_chunks_and_connection_kept(self):
        c = httpclient.HTTPConnection("127.0.0.1", self.demo.port, timeout=30)
        c.request("GET", "/stream?n=200000")
        r = c.getresponse()
        self.assertEqual((r.status, r.getheader("transfer-encoding"), r.getheader("content-length")),
                         (200, "chunked", None))
        self.assertRegex(r.getheader("x-request-id"), "^[0-9a-f]{32}$")
        body = r.read()
        self.assertEqual(len(body), 20000000)
        self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(demo_lines(200000)).digest())
        # The same connection serves the next request.
        c.request("GET", "/hello")
        r = c.getresponse()
        self.assertEqual((r.status, json.loads(r.read())), (200, {"hello": "world"}))
        c.close()

    def test_http_1_0_gets_a_body_ended_by_the_close(self):
        s = socket.create_connection(("127.0.0.1", self.demo.port))
        s.sendall(b"GET /stream?n=3000 HTTP/1.0\r\n\r\n")
        s.settimeout(10)
        data = recv_to_close(s)
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200"), head)
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, demo_lines(3000))

    def test_reader_that_stops_is_closed_after_the_http_timeout(self):
        self.demo.stop()
        self.demo = Demo(env={"WSAPP_DEMO_HTTP_TIMEOUT_S": "2"})
        s = socket.create_connection(("127.0.0.1", self.demo.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /stream?n=1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        self.assertTrue(s.recv(1024).startswith(b"HTTP/1.1 200"))
        t0 = time.monotonic()
        # Not reading, not closing: the server gives up on the body.
        wait_for(lambda: self.stats()["finished"] == 1, 15, what="the producer to be let go")
        self.assertGreater(time.monotonic() - t0, 1.5)
        st = self.stats()
        self.assertEqual((st["failed"], st["gone"]), (1, 1), st)
        s.close()

    def test_reader_that_stops_holds_the_producer_back(self):
        s = socket.create_connection(("127.0.0.1", self.demo.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /stream?n=1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        self.assertTrue(s.recv(1024).startswith(b"HTTP/1.1 200"))
        time.sleep(1.5)
        first = self.stats()
        time.sleep(0.5)
        held = self.stats()
        # 100 MB asked for: what was written is the 64 KiB buffer, lws's
        # and the two sockets' buffers, and it stopped growing.
        self.assertLess(held["bytes"], 16 << 20, held)
        self.assertEqual(held["bytes"], first["bytes"], (first, held))
        self.assertEqual(held["finished"], 0)
        s.close()
        wait_for(lambda: self.stats()["finished"] == 1, 10, what="the producer to see the client gone")
        st = self.stats()
        self.assertEqual((st["failed"], st["gone"]), (1, 1), st)
        self.assertEqual(http("GET", self.demo.base + "/hello")[0], 200)

    def test_failure_halfway_cuts_the_body(self):
        c = httpclient.HTTPConnection("127.0.0.1", self.demo.port, timeout=30)
        c.request("GET", "/stream?n=100000&cut=50000")
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        with self.assertRaises(httpclient.IncompleteRead) as e:
            r.read()
        self.assertEqual(e.exception.partial, demo_lines(50000))
        c.close()
        wait_for(lambda: self.stats()["gone"] == 1, 10, what="the request to be freed")

    def test_refused_before_the_body_and_head(self):
        status, hdrs, body = http("GET", self.demo.base + "/stream?refuse=1")
        self.assertEqual((status, json.loads(body)["error"]), (404, "not_found"))
        self.assertNotIn("transfer-encoding", hdrs)
        c = httpclient.HTTPConnection("127.0.0.1", self.demo.port, timeout=30)
        c.request("HEAD", "/stream?n=100000")
        r = c.getresponse()
        self.assertEqual((r.status, r.getheader("transfer-encoding"), r.read()), (200, "chunked", b""))
        c.close()
        wait_for(lambda: self.stats()["finished"] == 2, 10, what="both producers to end")
        st = self.stats()
        # Neither wrote its body: one refused, one HEAD.
        self.assertEqual((st["failed"], st["gone"]), (2, 2), st)
        self.assertLess(st["bytes"], 1 << 20, st)


class WebSocketTest(DemoCase):
    def test_echo_timer_ping_oversize_binary(self):
        r = ws_run(self.demo.port, "?key=ok", sends=["abc", "tick", "ping", "x" * 70000, "y" * 3000],
                   wait_ms=500)
        self.assertEqual(r["msgs"][0], "hello")
        self.assertIn("abc", r["msgs"])
        self.assertIn("tock", r["msgs"])
        self.assertIn("pong-received", r["msgs"])
        self.assertIn("too_big 70000", r["msgs"])
        self.assertIn("y" * 60, r["msgs"])  # fragmented by lws at 1 KiB, joined again
        self.assertEqual(r["code"], 1000)
        r = node(CLIENT + """
const ws = new WebSocket('ws://127.0.0.1:%d/echo?key=ok'); const got = [];
ws.on('open', () => ws.send(Buffer.from([0, 1, 255])));
ws.on('message', (d, bin) => { got.push(bin ? [...d] : d.toString()); if (got.length == 2) ws.close(); });
ws.on('close', () => console.log(JSON.stringify(got)));""" % self.demo.port)
        self.assertEqual(r, ["hello", [0, 1, 255]])

    def test_refused_before_upgrade(self):
        r = ws_run(self.demo.port, "?key=bad")
        self.assertEqual(r["status"], 401)
        b = json.loads(r["body"])
        self.assertEqual(b["error"], "unauthorized")
        self.assertEqual(b["request_id"], r["headers"]["x-request-id"])
        r = ws_run(self.demo.port, "?key=full")
        self.assertEqual((r["status"], json.loads(r["body"])), (503, {"error": "Server at capacity"}))
        r = ws_run(self.demo.port, "?key=ok", path="/elsewhere")
        self.assertEqual(r["status"], 404)

    def test_long_subprotocol_is_echoed(self):
        token = "access_token." + "e" * 600
        r = ws_run(self.demo.port, "?key=ok", protos=[token, "chat"], sends=["abc"])
        self.assertEqual(r["proto"], token)
        self.assertIn("abc", r["msgs"])
        r = ws_run(self.demo.port, "?key=ok", protos=["chat"], sends=["abc"])
        self.assertEqual(r["proto"], "chat")

    def test_server_close_code(self):
        r = ws_run(self.demo.port, "?key=ok", sends=["close"], wait_ms=2000)
        self.assertEqual((r["code"], r["reason"]), (4001, "asked to"))

    def test_slow_reader_dropped_others_served(self):
        slow = wsraw.connect(self.demo.port, "/echo?key=ok")
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        wsraw.send_text(slow, "flood 30000")
        # The server drops it once its queue passes 256 KiB: reading what
        # the kernel kept ends in EOF or a reset.
        def dropped():
            _, _, body = http("GET", self.demo.base + "/metrics")
            for line in body.decode().splitlines():
                if line.startswith("wsapp_websocket_dropped_slow_total"):
                    return float(line.split()[-1]) >= 1
            return False
        wait_for(dropped, timeout=20, what="the slow reader dropped")
        r = ws_run(self.demo.port, "?key=ok", sends=["still"])
        self.assertIn("still", r["msgs"])
        slow.settimeout(10)
        total = 0
        try:
            while True:
                chunk = slow.recv(65536)
                if not chunk:
                    break
                total += len(chunk)
        except ConnectionResetError:
            pass
        self.assertLess(total, 30000 * 1024)
        slow.close()


class ProcessTest(unittest.TestCase):
    def test_reuse_port_two_processes(self):
        port = free_port()
        a = Demo(port, reuse=True)
        b = Demo(port, reuse=True)
        try:
            for _ in range(20):
                self.assertEqual(http("GET", "http://127.0.0.1:%d/hello" % port)[0], 200)
        finally:
            self.assertEqual(a.stop(), 0)
        self.assertEqual(http("GET", "http://127.0.0.1:%d/hello" % port)[0], 200)
        self.assertEqual(b.stop(), 0)

    def test_sigterm_closes_websockets_1001_and_exits_0(self):
        d = Demo()
        script = CLIENT + """
const ws = new WebSocket('ws://127.0.0.1:%d/echo?key=ok');
ws.on('message', (m) => { if (m.toString() == 'hello') console.error('open'); });
ws.on('close', (c, r) => console.log(JSON.stringify({code: c, reason: r.toString()})));""" % d.port
        p = subprocess.Popen([need("node"), "-e", script], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        self.assertEqual(p.stderr.readline().strip(), "open")
        self.assertEqual(d.stop(), 0)
        out, _ = p.communicate(timeout=10)
        p.stdout.close()
        p.stderr.close()
        self.assertEqual(json.loads(out), {"code": 1001, "reason": "server stopping"})
        self.assertIn('"status":101', d.log)


if __name__ == "__main__":
    unittest.main()
