"""The api-gateway's Server-Sent Events and human-in-the-loop answers
(SPEC 2b, issue 11) against the real Redis, with a stock client (npm
`eventsource`, tests/integration/sse_client.js) and raw sockets where the
bytes on the wire matter: frames and event types, heartbeats without an id,
publishing through Redis and the internal route, two gateway instances
sharing the replay buffer, stream.reset, events published before a client
connects, a client that stops reading, and POST .../response; and, on
gateways of their own, a burst of 2,000 concurrent connects, the write
timeout and the per-address stream limit.

Each test uses its own client ids (a per-run prefix), so runs never see each
other's events; the gateways run without a database.
"""

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
import unittest
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aetest import REDIS_URL, Service, http, http_json, recv_to_close, wait_for  # noqa: E402
from pgtmp import free_port  # noqa: E402
from tools import need  # noqa: E402

import redis  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "sse-test-internal-token"
RUN = uuid.uuid4().hex[:8]


def gw_env(port, extra=None):
    env = {"SERVER_PORT": port, "SERVER_HOST": "127.0.0.1",
           "DATABASE_URL": "postgres://nobody@127.0.0.1:%d/none" % free_port(),
           "REDIS_URL": REDIS_URL, "RATE_LIMIT": "0", "INTERNAL_TOKEN": TOKEN,
           "SSE_HEARTBEAT_SECONDS": "1", "SSE_BUFFER_EVENTS": "5", "LOG_LEVEL": "warn",
           "SSE_CLIENT_BUFFER_BYTES": "65536", "SSE_WRITE_TIMEOUT_SECONDS": "3"}
    env.update(extra or {})
    return env


def cid(name):
    return "t%s-%s" % (RUN, name)


class Client:
    """npm eventsource in a node process; events as dicts, in order."""

    def __init__(self, base, client_id, count=1000, timeout_ms=15000, last_id=None):
        args = [need("node"), os.path.join(HERE, "sse_client.js"), "%s/api/v1/events/%s" % (base, client_id),
                str(count), str(timeout_ms)]
        if last_id is not None:
            args.append(str(last_id))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE)
        self.events = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.lock:
                self.events.append(json.loads(line))

    def wait(self, pred, timeout=10, what="events"):
        def check():
            with self.lock:
                evs = list(self.events)
            return evs if pred(evs) else None
        return wait_for(check, timeout=timeout, interval=0.02, what=what)

    def of(self, *types):
        with self.lock:
            return [e for e in self.events if e["type"] in types]

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def publish_http(base, client_id, event_type, data, token=TOKEN, key=None):
    headers = {"Authorization": "Bearer " + token} if token else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    return http_json("POST", "%s/internal/v1/sse/%s" % (base, client_id),
                     {"event_type": event_type, "data": data}, headers=headers)


def publish_raw_key(port, client_id, key):
    """POST with an Idempotency-Key of any bytes (http.client refuses some)."""
    body = b'{"event_type":"run.start","data":null}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /internal/v1/sse/" + client_id.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Idempotency-Key: " + key + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        data = recv_to_close(s)
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def raw_stream(port, client_id, last_id=None, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    req = "GET /api/v1/events/%s HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n" % client_id
    if last_id is not None:
        req += "Last-Event-ID: %s\r\n" % last_id
    s.sendall((req + "\r\n").encode())
    return s


def setUpModule():
    global A, B, BASE_A, BASE_B, PORT_A, PORT_B, R
    subprocess.run([os.path.join(HERE, "setup-node.sh")], check=True)
    R = redis.Redis.from_url(REDIS_URL)
    PORT_A, PORT_B = free_port(), free_port()
    BASE_A, BASE_B = "http://127.0.0.1:%d" % PORT_A, "http://127.0.0.1:%d" % PORT_B
    A = Service("api-gateway", gw_env(PORT_A), health=BASE_A + "/health")
    B = Service("api-gateway", gw_env(PORT_B), health=BASE_B + "/health")
    try:
        A.start()
        B.start()
        _wait_for_ingester()
    except BaseException:
        # tearDownModule does not run after a failed setUpModule.
        A.stop()
        B.stop()
        raise


def _wait_for_ingester():
    """A live gateway holds the ingest lock (raw PUBLISH): one of the two,
    within a second of a killed holder's lock expiring (3 s)."""
    def ingester():
        v = R.get("sse:ingest:lock")
        if v is None:
            return False
        try:
            os.kill(int(v.split(b"-")[0]), 0)
            return True
        except (ValueError, OSError):
            return False
    wait_for(ingester, timeout=10, what="a live gateway holding the ingest lock")


def tearDownModule():
    A.stop()
    B.stop()


class SseTest(unittest.TestCase):
    def test_established_first_then_heartbeats_without_id(self):
        c = Client(BASE_A, cid("hb"))
        try:
            evs = c.wait(lambda e: len([x for x in e if x["type"] == "heartbeat"]) >= 2, what="two heartbeats")
            first = evs[0]
            self.assertEqual(first["type"], "connection.established")
            self.assertEqual(first["data"]["event_type"], "connection.established")
            self.assertEqual(first["data"]["data"]["client_id"], cid("hb"))
            self.assertIn("message", first["data"]["data"])
            self.assertEqual(first["data"]["id"], first["id"])
            self.assertRegex(first["data"]["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
            for hb in c.of("heartbeat"):
                self.assertIn("timestamp", hb["data"])
                self.assertEqual(hb["id"], first["id"])  # a heartbeat does not move Last-Event-ID
        finally:
            c.close()
        # On the wire: no id: line in a heartbeat frame.
        s = raw_stream(PORT_A, cid("hb-raw"))
        s.settimeout(5)
        data = b""
        while b"\n\n" not in data.split(b"event: heartbeat", 1)[-1] or b"event: heartbeat" not in data:
            data += s.recv(4096)
        s.close()
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertIn(b"text/event-stream", head)
        # The frame (chunked encoding aside) runs from the blank line before it.
        frame = body.split(b"event: heartbeat", 1)
        before = frame[0].rsplit(b"\n\n", 1)[-1]
        self.assertNotIn(b"id:", before)
        self.assertNotIn(b"id:", frame[1].split(b"\n\n", 1)[0])

    def test_publish_through_redis_and_internal_route(self):
        c = Client(BASE_A, cid("pub"))
        try:
            c.wait(lambda e: any(x["type"] == "connection.established" for x in e))
            status, _, body = publish_http(BASE_A, cid("pub"), "run.start", {"run": 1})
            self.assertEqual(status, 202, body)
            self.assertRegex(body["id"], r"^\d+$")
            R.publish("sse:" + cid("pub"), json.dumps({"event_type": "question", "data": {"q": "ok?"}}))
            status, _, body2 = publish_http(BASE_B, cid("pub"), "run.complete", {"run": 1, "ok": True})
            self.assertEqual(status, 202)
            evs = c.wait(lambda e: len([x for x in e if x["type"] in ("run.start", "question", "run.complete")]) >= 3,
                         what="three events")
            got = [x for x in evs if x["type"] in ("run.start", "question", "run.complete")]
            self.assertEqual(got[0]["data"]["data"], {"run": 1})
            self.assertEqual(got[0]["id"], body["id"])
            self.assertEqual({x["type"] for x in got}, {"run.start", "question", "run.complete"})
            ids = [int(x["id"]) for x in got]
            self.assertEqual(ids, sorted(ids))
            self.assertEqual(len(set(ids)), 3)
            for x in got:
                self.assertEqual(x["data"]["id"], x["id"])
                self.assertEqual(x["data"]["event_type"], x["type"])
        finally:
            c.close()

    def test_internal_route_needs_the_token(self):
        status, _, body = publish_http(BASE_A, cid("auth"), "run.start", {}, token=None)
        self.assertEqual(status, 401)
        self.assertEqual(body["error"], "unauthorized")
        status, _, _ = publish_http(BASE_A, cid("auth"), "run.start", {}, token="wrong")
        self.assertEqual(status, 401)
        status, _, body = publish_http(BASE_A, cid("auth"), "heartbeat", {})
        self.assertEqual(status, 400)
        status, _, body = publish_http(BASE_A, cid("auth"), "bad type\n", {})
        self.assertEqual(status, 400)

    def test_idempotency_key_repeated_stores_once(self):
        """A publisher's retry after a lost answer (same Idempotency-Key, to
        either instance) stores nothing new: 202 with the first id, and the
        client gets the event once."""
        name = cid("idem")
        c = Client(BASE_A, name)
        try:
            c.wait(lambda e: any(x["type"] == "connection.established" for x in e))
            status, hdrs, first = publish_http(BASE_A, name, "run.progress", {"n": 1}, key="job-1/step 1")
            self.assertEqual(status, 202, first)
            self.assertNotIn("idempotent-replayed", hdrs)
            for base in (BASE_A, BASE_B, BASE_A):
                status, hdrs, again = publish_http(base, name, "run.progress", {"n": 1}, key="job-1/step 1")
                self.assertEqual((status, again), (202, first))
                self.assertEqual(hdrs.get("idempotent-replayed"), "true")
            # Another key, and no key at all, are new events.
            status, _, second = publish_http(BASE_B, name, "run.progress", {"n": 2}, key="job-1/step 2")
            self.assertEqual(status, 202)
            self.assertGreater(int(second["id"]), int(first["id"]))
            status, _, third = publish_http(BASE_B, name, "run.progress", {"n": 3})
            self.assertEqual(status, 202)
            evs = c.wait(lambda e: any(x["type"] == "run.progress" and x["data"]["data"]["n"] == 3 for x in e),
                         what="the last event")
            time.sleep(0.3)
            got = [(x["id"], x["data"]["data"]["n"]) for x in c.of("run.progress")]
            self.assertEqual(got, [(first["id"], 1), (second["id"], 2), (third["id"], 3)], evs)
            self.assertEqual(R.llen("sse:buf:" + name), 3)
        finally:
            c.close()

    def test_concurrent_retries_of_one_key_store_once(self):
        name = cid("idem-race")
        results = []

        def post(base):
            results.append(publish_http(base, name, "run.start", {"x": 1}, key="same")[:3:2])

        threads = [threading.Thread(target=post, args=(BASE_A if i % 2 else BASE_B,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(len(results), 16)
        self.assertEqual({st for st, _ in results}, {202})
        self.assertEqual(len({b["id"] for _, b in results}), 1, results)
        self.assertEqual(R.llen("sse:buf:" + name), 1)

    def test_bad_idempotency_key_is_400(self):
        name = cid("idem-bad")
        for key in (b"", b"k" * 256, b"tab\tin", b"\x01", b"caf\xc3\xa9", b"del\x7f"):
            status, body = publish_raw_key(PORT_A, name, key)
            self.assertEqual(status, 400, (key, body))
            err = json.loads(body)
            self.assertEqual(err["error"], "invalid_request")
            self.assertIn("Idempotency-Key", err["message"])
        status, body = publish_raw_key(PORT_A, name, b"k" * 255)
        self.assertEqual(status, 202, body)
        status, body = publish_raw_key(PORT_A, name, b" ~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
        self.assertEqual(status, 202, body)
        self.assertEqual(R.llen("sse:buf:" + name), 2)

    def test_idempotency_key_on_the_redis_path(self):
        """PUBLISH sse:{id} {"event_type","data","idempotency_key"}: once per
        key; a bad key is dropped (logged), nothing stored."""
        name = cid("idem-redis")
        for n in (1, 1, 2):
            R.publish("sse:" + name, json.dumps({"event_type": "run.progress", "data": {"n": n},
                                                 "idempotency_key": "k%d" % n}))
        R.publish("sse:" + name, json.dumps({"event_type": "run.progress", "data": {"n": 9},
                                             "idempotency_key": "bad\nkey"}))
        R.publish("sse:" + name, json.dumps({"event_type": "run.progress", "data": {"n": 9},
                                             "idempotency_key": 7}))
        R.publish("sse:" + name, json.dumps({"event_type": "run.progress", "data": {"n": 3}}))
        wait_for(lambda: R.llen("sse:buf:" + name) >= 3, what="the raw publishes stored")
        # The HTTP route and the Redis path share the keys of a client.
        status, hdrs, body = publish_http(BASE_A, name, "run.progress", {"n": 1}, key="k1")
        self.assertEqual(status, 202)
        self.assertEqual(hdrs.get("idempotent-replayed"), "true")
        time.sleep(0.5)
        frames = [f.decode() for f in R.lrange("sse:buf:" + name, 0, -1)]
        self.assertEqual([json.loads(f.split("data: ", 1)[1])["data"]["n"] for f in frames], [1, 2, 3])
        self.assertTrue(frames[0].startswith("id: %s\n" % body["id"]), frames[0])

    def test_reconnect_to_the_other_instance_gets_exactly_the_missed_events(self):
        name = cid("two")
        c = Client(BASE_A, name)
        try:
            c.wait(lambda e: any(x["type"] == "connection.established" for x in e))
            publish_http(BASE_B, name, "run.progress", {"n": 1})
            publish_http(BASE_B, name, "run.progress", {"n": 2})
            evs = c.wait(lambda e: len([x for x in e if x["type"] == "run.progress"]) >= 2)
            last = [x for x in evs if x["type"] == "run.progress"][-1]["id"]
        finally:
            c.close()
        publish_http(BASE_A, name, "run.progress", {"n": 3})
        R.publish("sse:" + name, json.dumps({"event_type": "run.progress", "data": {"n": 4}}))
        wait_for(lambda: R.llen("sse:buf:" + name) >= 4, what="the raw publish stored")
        c2 = Client(BASE_B, name, last_id=last)
        try:
            evs = c2.wait(lambda e: len([x for x in e if x["type"] == "run.progress"]) >= 2, what="missed events")
            time.sleep(0.5)
            got = c2.of("run.progress", "stream.reset", "connection.established")
            self.assertEqual(got[0]["type"], "connection.established")
            self.assertEqual([x["data"]["data"]["n"] for x in got[1:]], [3, 4])
        finally:
            c2.close()

    def test_stream_reset_when_the_id_is_too_old_or_unknown(self):
        name = cid("reset")
        ids = []
        for i in range(8):  # the buffer holds 5
            _, _, body = publish_http(BASE_A, name, "node.complete", {"i": i})
            ids.append(body["id"])
        for last in (ids[0], "999999999", "not-a-number"):
            c = Client(BASE_B, name, last_id=last)
            try:
                evs = c.wait(lambda e: len([x for x in e if x["type"] == "node.complete"]) >= 5)
                time.sleep(0.3)
                got = c.of("connection.established", "stream.reset", "node.complete")
                self.assertEqual([x["type"] for x in got[:2]], ["connection.established", "stream.reset"], last)
                self.assertEqual([x["data"]["data"]["i"] for x in got[2:]], [3, 4, 5, 6, 7])
            finally:
                c.close()
        # An id still covered by the buffer: no reset, just what follows it.
        c = Client(BASE_B, name, last_id=ids[5])
        try:
            c.wait(lambda e: len([x for x in e if x["type"] == "node.complete"]) >= 2)
            time.sleep(0.3)
            self.assertEqual(c.of("stream.reset"), [])
            self.assertEqual([x["data"]["data"]["i"] for x in c.of("node.complete")], [6, 7])
        finally:
            c.close()

    def test_event_published_before_the_client_connects(self):
        name = cid("early")
        status, _, _ = publish_http(BASE_B, name, "question", {"q": "before"})
        self.assertEqual(status, 202)
        self.assertGreater(R.ttl("sse:buf:" + name), 0)
        c = Client(BASE_A, name)
        try:
            evs = c.wait(lambda e: any(x["type"] == "question" for x in e))
            self.assertEqual(evs[0]["type"], "connection.established")
            self.assertEqual(c.of("question")[0]["data"]["data"], {"q": "before"})
            self.assertEqual(c.of("stream.reset"), [])
        finally:
            c.close()

    def test_a_client_that_stops_reading_does_not_block_another(self):
        slow = raw_stream(PORT_A, cid("slow"), rcvbuf=4096)
        fast = Client(BASE_A, cid("fast"))
        try:
            fast.wait(lambda e: any(x["type"] == "connection.established" for x in e))
            wait_for(lambda: http_json("GET", BASE_A + "/health")[2]["sse_clients"] >= 2, what="both held")
            big = "x" * 30000
            for i in range(300):  # far more than the slow one's socket and buffer hold
                publish_http(BASE_A, cid("slow"), "run.progress", {"i": i, "pad": big})
            t0 = time.time()
            publish_http(BASE_A, cid("fast"), "run.complete", {"ok": True})
            evs = fast.wait(lambda e: any(x["type"] == "run.complete" for x in e), timeout=3)
            self.assertLess([x for x in evs if x["type"] == "run.complete"][0]["t"] / 1000.0 - t0, 1.0)

            def dropped():
                _, _, m = http("GET", BASE_A + "/metrics")
                for line in m.decode().splitlines():
                    if line.startswith("sse_clients_dropped_total"):
                        return float(line.split()[-1]) >= 1
                return False
            wait_for(dropped, timeout=10, what="the slow client dropped")
        finally:
            slow.close()
            fast.close()

    def test_hitl_response_stored_once(self):
        name = cid("hitl")
        c = Client(BASE_A, name)
        try:
            c.wait(lambda e: any(x["type"] == "connection.established" for x in e))
            before = R.xlen("hitl:responses")
            url = "%s/api/v1/events/%s/response" % (BASE_B, name)
            qid = "q-" + uuid.uuid4().hex
            status, _, body = http_json("POST", url, {"question_id": qid, "answer": {"b": [1, 2], "a": "yes"}})
            self.assertEqual(status, 200, body)
            self.assertEqual(body, {"status": "ok", "message": "Response received"})
            # A retry (same answer, members in another order) appends nothing.
            status, _, body = http_json("POST", url, {"question_id": qid, "answer": {"a": "yes", "b": [1, 2]}})
            self.assertEqual(status, 200)
            status, _, body = http_json("POST", url, {"question_id": qid, "answer": "no"})
            self.assertEqual(status, 409)
            self.assertEqual(body["error"], "conflict")
            self.assertEqual(R.xlen("hitl:responses"), before + 1)
            entry = [e for e in R.xrange("hitl:responses", count=100000)
                     if e[1][b"question_id"] == qid.encode()]
            self.assertEqual(len(entry), 1)
            f = entry[0][1]
            self.assertEqual(f[b"client_id"], name.encode())
            self.assertEqual(json.loads(f[b"answer"]), {"a": "yes", "b": [1, 2]})
            self.assertRegex(f[b"received_at"].decode(), r"^\d{4}-\d\d-\d\dT")
            status, _, body = http_json("POST", url, {"answer": 1})
            self.assertEqual(status, 400)
            self.assertIn("question_id", body["details"])
        finally:
            c.close()
        status, _, body = http_json("POST", "%s/api/v1/events/%s/response" % (BASE_A, cid("nobody")),
                                    {"question_id": "q", "answer": 1})
        self.assertEqual(status, 404)
        self.assertEqual(body["error"], "not_found")

    def _read_until(self, s, pred, limit=5):
        s.settimeout(limit)
        data = b""
        while not pred(data):
            got = s.recv(65536)
            if not got:
                break
            data += got
        return data

    def test_chunked_on_the_wire_and_http10_to_the_close(self):
        # HTTP/1.1: the head, then chunks that decode to whole frames.
        name = cid("wire")
        s = raw_stream(PORT_A, name)
        try:
            data = self._read_until(s, lambda d: b"connection.established" in d and d.endswith(b"\r\n"))
            head, body = data.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
            hdrs = {k.strip().lower(): v.strip() for k, v in (x.split(b":", 1) for x in lines[1:])}
            self.assertEqual(hdrs[b"content-type"], b"text/event-stream")
            self.assertEqual(hdrs[b"transfer-encoding"], b"chunked")
            self.assertEqual(hdrs[b"cache-control"], b"no-cache")
            self.assertRegex(hdrs[b"x-request-id"].decode(), r"^[0-9a-f]{32}$")
            self.assertIn(b"date", hdrs)
            publish_http(BASE_A, name, "run.start", {"n": 1})
            body += self._read_until(s, lambda d: b"run.start" in body + d and (body + d).endswith(b"\r\n"))
            text = b""
            while body:
                size, rest = body.split(b"\r\n", 1)
                n = int(size, 16)
                self.assertEqual(rest[n:n + 2], b"\r\n")
                text += rest[:n]
                body = rest[n + 2:]
            frames = [f for f in text.split(b"\n\n") if f]
            self.assertTrue(frames[0].startswith(b"id: "))
            self.assertIn(b"event: connection.established", frames[0])
            ev = [f for f in frames if b"event: run.start" in f][0].split(b"\n")
            self.assertEqual(json.loads(ev[2][len(b"data: "):])["data"], {"n": 1})
        finally:
            s.close()
        # HTTP/1.0 has no chunked encoding: the body runs to the close.
        s = socket.create_connection(("127.0.0.1", PORT_A))
        try:
            s.sendall(("GET /api/v1/events/%s HTTP/1.0\r\n\r\n" % name).encode())
            data = self._read_until(s, lambda d: b"connection.established" in d and d.endswith(b"\n\n"))
            head, body = data.split(b"\r\n\r\n", 1)
            self.assertIn(b"Connection: close", head)
            self.assertNotIn(b"Transfer-Encoding", head)
            self.assertTrue(body.startswith(b"id: "), body[:40])
        finally:
            s.close()
        # HEAD: the head alone.
        status, headers, body = http("HEAD", "%s/api/v1/events/%s" % (BASE_A, name))
        self.assertEqual(status, 200)
        self.assertEqual(body, b"")

    def test_a_stopping_gateway_ends_its_streams_cleanly(self):
        port = free_port()
        c = Service("api-gateway", gw_env(port), health="http://127.0.0.1:%d/health" % port)
        c.start()
        try:
            s = raw_stream(port, cid("stop"))
            self._read_until(s, lambda d: b"connection.established" in d and d.endswith(b"\r\n"))
        finally:
            c.stop()
        self.assertEqual(c.proc.returncode, 0)
        # The last chunk, then the close: the client reconnects elsewhere.
        data = self._read_until(s, lambda d: False)
        s.close()
        self.assertTrue(data.endswith(b"0\r\n\r\n"), data[-40:])

    def test_bad_client_id(self):
        status, _, body = http_json("GET", BASE_A + "/api/v1/events/" + "x" * 200)
        self.assertEqual(status, 400)

    def test_health_and_metrics(self):
        c = Client(BASE_A, cid("health"))
        try:
            c.wait(lambda e: any(x["type"] == "connection.established" for x in e))
            _, _, h = http_json("GET", BASE_A + "/health")
            self.assertEqual(h["status"], "ok")
            self.assertGreaterEqual(h["sse_clients"], 1)
            self.assertIsInstance(h["upstreams"], list)
            _, _, m = http("GET", BASE_A + "/metrics")
            for name in (b"sse_clients ", b"sse_events_delivered_total", b"sse_events_replayed_total",
                         b"sse_clients_dropped_total"):
                self.assertIn(name, m)
        finally:
            c.close()


if __name__ == "__main__":
    unittest.main()


class SseLimitsTest(unittest.TestCase):
    """Gateways of their own: a burst of connects with no per-address
    limit, the write-timeout cut with small socket buffers (so the queue,
    not the kernel, holds what a stopped client has not taken), and the
    per-address stream limit."""

    @classmethod
    def setUpClass(cls):
        cls.port_c, cls.port_d = free_port(), free_port()
        cls.base_c = "http://127.0.0.1:%d" % cls.port_c
        cls.base_d = "http://127.0.0.1:%d" % cls.port_d
        cls.C = Service("api-gateway", gw_env(cls.port_c, {
            "MAX_CONNECTIONS_PER_IP": "0", "SSE_HEARTBEAT_SECONDS": "30", "LOG_LEVEL": "info",
            "SSE_SEND_BUFFER_BYTES": "4096", "SSE_CLIENT_BUFFER_BYTES": str(4 << 20),
            "SSE_WRITE_TIMEOUT_SECONDS": "2", "HTTP_HEADER_TIMEOUT": "60s"}), health=cls.base_c + "/health")
        cls.D = Service("api-gateway", gw_env(cls.port_d, {"MAX_CONNECTIONS_PER_IP": "3",
                                                           "SSE_BUFFER_TTL_SECONDS": "2"}),
                        health=cls.base_d + "/health")
        try:
            cls.C.start()
            cls.D.start()
        except BaseException:
            cls.C.stop()
            cls.D.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.C.stop()
        cls.D.stop()

    def test_a_burst_of_connects_all_get_established(self):
        """2,000 streams opened at once (from 8 source addresses), without
        waiting for any answer: every one gets connection.established
        first. The connect scripts are pipelined on one Redis connection,
        so the burst does not queue behind one round trip per stream on
        the HTTP threads (it used to pass the header deadline). That
        deadline is 60 s on this gateway: with the test starved of CPU (a
        nice 15 suite beside unniced benchmarks), the client alone can take
        10 s to send the last heads, and a 408 would measure the machine,
        not the gateway; what is asserted is that no stream is lost."""
        n = 2000
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < n + 200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 500), hard))
        sel = selectors.DefaultSelector()
        socks, got, done = [], {}, set()
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.%d" % (2 + i % 8), 0))
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", self.port_c))
                socks.append(s)
                got[i] = b""
                sel.register(s, selectors.EVENT_WRITE, i)
            req = ("GET /api/v1/events/%s HTTP/1.1\r\nHost: x\r\n\r\n" % cid("burst")).encode()
            deadline = time.time() + 120
            while len(done) < n and time.time() < deadline:
                for key, ev in sel.select(timeout=1):
                    i, s = key.data, key.fileobj
                    if ev & selectors.EVENT_WRITE:
                        s.send(req)  # a few dozen bytes: the socket takes them whole
                        sel.modify(s, selectors.EVENT_READ, i)
                        continue
                    chunk = s.recv(4096)
                    got[i] += chunk
                    if b"\n\n" in got[i].split(b"\r\n\r\n", 1)[-1] or not chunk:
                        done.add(i)
                        sel.unregister(s)
            self.assertEqual(len(done), n, "streams answered")
            bad = [i for i in range(n) if not got[i].startswith(b"HTTP/1.1 200")
                   or b"event: connection.established" not in got[i]]
            self.assertEqual(bad, [], "streams without 200 and connection.established: %d, first: %r"
                             % (len(bad), got[bad[0]][:300] if bad else b""))
            for i in range(n):
                body = got[i].split(b"\r\n\r\n", 1)[1]
                first = body.split(b"\n\n", 1)[0]
                self.assertIn(b"event: connection.established", first)
        finally:
            sel.close()
            for s in socks:
                s.close()

    def _dropped(self, base):
        _, _, m = http("GET", base + "/metrics")
        for line in m.decode().splitlines():
            if line.startswith("sse_clients_dropped_total"):
                return float(line.split()[-1])
        return 0.0

    def test_a_client_that_takes_nothing_is_cut_after_the_write_timeout(self):
        name = cid("stalled")
        before = self._dropped(self.base_c)
        slow = raw_stream(self.port_c, name, rcvbuf=4096)
        try:
            wait_for(lambda: b"connection.established" in slow.recv(4096, socket.MSG_PEEK), what="established")
            # The gateway's end of the stream has the send buffer asked for
            # (the kernel doubles SO_SNDBUF for its bookkeeping), not
            # tcp_wmem's autotuned one.
            ss = subprocess.run([need("ss"), "-tmnH", "state", "established", "sport", "= :%d" % self.port_c,
                                 "dport", "= :%d" % slow.getsockname()[1]], capture_output=True, text=True).stdout
            self.assertIn("tb8192,", ss)
            # 300 KiB: far more than both sockets' buffers, far less than
            # the queue's bound (4 MiB), so only the timeout can cut it.
            for i in range(30):
                self.assertEqual(publish_http(self.base_c, name, "run.progress", {"i": i, "pad": "x" * 10000})[0], 202)
            wait_for(lambda: self._dropped(self.base_c) > before, timeout=30, what="the stalled client cut")
            with open(self.C.logpath, "rb") as f:
                self.assertIn(b'"reason":"write timeout"', f.read())
            slow.settimeout(10)
            data = recv_to_close(slow)
            self.assertLess(data.count(b"event: run.progress"), 30, "cut before the end")
        finally:
            slow.close()

    def test_idempotency_key_after_the_buffer_ttl_stores_again(self):
        """A key is remembered for SSE_BUFFER_TTL_SECONDS (2 s on D)."""
        name = cid("idem-ttl")
        status, _, first = publish_http(self.base_d, name, "run.start", {}, key="k")
        self.assertEqual(status, 202)
        self.assertEqual(publish_http(self.base_d, name, "run.start", {}, key="k")[2], first)
        self.assertLessEqual(R.ttl("sse:idem:%s:k" % name), 2)
        wait_for(lambda: not R.exists("sse:idem:%s:k" % name), timeout=5, what="the key expired")
        status, hdrs, again = publish_http(self.base_d, name, "run.start", {}, key="k")
        self.assertEqual(status, 202)
        self.assertNotIn("idempotent-replayed", hdrs)
        self.assertGreater(int(again["id"]), int(first["id"]))

    def test_streams_per_address_are_limited(self):
        name = cid("perip")
        held = []
        try:
            for _ in range(3):
                s = raw_stream(self.port_d, name)
                held.append(s)
                wait_for(lambda: b"connection.established" in s.recv(4096, socket.MSG_PEEK), what="established")
            extra = raw_stream(self.port_d, name)
            held.append(extra)
            extra.settimeout(10)
            head = extra.recv(4096)
            self.assertTrue(head.startswith(b"HTTP/1.1 503"), head[:200])
            self.assertIn(b"too many streams from this address", head)
            # Another address is not counted with them.
            other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            other.bind(("127.0.0.9", 0))
            other.connect(("127.0.0.1", self.port_d))
            held.append(other)
            other.sendall(("GET /api/v1/events/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name).encode())
            other.settimeout(10)
            self.assertTrue(other.recv(4096).startswith(b"HTTP/1.1 200"))
            # One ends: its place is free again.
            held.pop(0).close()
            wait_for(lambda: http_json("GET", self.base_d + "/health")[2]["sse_clients"] <= 3, what="one gone")
            # The address's count drops when the gateway has seen the close,
            # which under load can come after the health figure: retried.
            heads = []

            def admitted():
                again = raw_stream(self.port_d, name)
                held.append(again)
                again.settimeout(10)
                heads.append(again.recv(4096))
                return heads[-1].startswith(b"HTTP/1.1 200")
            try:
                wait_for(admitted, 20, interval=0.3, what="a stream admitted again")
            except AssertionError:
                self.fail("no stream admitted again; heads: %r" % [h[:120] for h in heads])
        finally:
            for s in held:
                s.close()
