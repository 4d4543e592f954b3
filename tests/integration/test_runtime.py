"""runtime (SPEC 6) against the real PostgreSQL that run.sh started: every
route and shape, the run and worker state machines, receipts hashed
independently here, drift on a gap forced into the log, Khala poll with its
stale-cursor, guard and publish-limit answers, every sync-token refusal,
write modes, 20 concurrent appenders watched by a poller, kill -9 during
appends, runtime-migrate twice on a fresh cluster, runtime-smoke exit codes.

Tokens are minted here with hmac (an implementation independent of ours)
and, once, by the npm `jsonwebtoken` package (tests/integration/setup-node.sh).
"""

import base64
import hashlib
import hmac
import http.client as http_client
import json
import os
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.parse
import uuid

import psycopg2

from aetest import (BINDIR, DATABASE_URL, Service, http, http_json, private_db_drop, private_db_fresh, rss_kib,
                    wait_for)
from pgtmp import PgTmp, free_port
from tools import need

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "test-sync-key"
ISS = "https://openagents.com"
AUD = "openagents-sync"


def setUpModule():
    subprocess.run([os.path.join(HERE, "setup-node.sh")], check=True)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(claims, key=KEY, alg="HS256"):
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(key.encode(), (head + "." + body).encode(), hashlib.sha256).digest())
    return head + "." + body + "." + sig


def claims(**over):
    now = int(time.time())
    c = {"iss": ISS, "aud": AUD, "sub": "user:7", "exp": now + 600, "iat": now, "jti": "j-" + uuid.uuid4().hex,
         "oa_user_id": 7, "oa_org_id": "org:7", "oa_device_id": "dev-1", "oa_client_surface": "web",
         "oa_sync_scopes": ["runtime.run_events", "runtime.worker_lifecycle_events"]}
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def canon(v):
    """Canonical JSON as SPEC 6 defines it for trajectory_hash, computed
    independently of the runtime: keys sorted, no whitespace."""
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha(text):
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def runtime_env(port, **extra):
    env = {"RUNTIME_BIND_ADDR": "127.0.0.1:%d" % port, "DATABASE_URL": DATABASE_URL,
           "RUNTIME_SYNC_TOKEN_SIGNING_KEY": KEY, "RUNTIME_KHALA_POLL_MIN_INTERVAL_MS": "0",
           "RUNTIME_KHALA_RUN_EVENTS_PUBLISH_RATE_PER_SECOND": "100000",
           "RUNTIME_KHALA_WORKER_LIFECYCLE_PUBLISH_RATE_PER_SECOND": "100000"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Runtime(Service):
    def __init__(self, **extra):
        self.port = free_port()
        self.base = "http://127.0.0.1:%d" % self.port
        super().__init__("runtime", runtime_env(self.port, **extra), health=self.base + "/healthz")

    def call(self, method, path, body=None, headers=None):
        return http_json(method, self.base + path, body, headers)

    def new_run(self, **body):
        st, _, b = self.call("POST", "/internal/v1/runs", body)
        assert st == 201, (st, b)
        return b["run"]

    def append(self, run_id, event_type, payload=None, key=None, expected=None, headers=None):
        body = {"event_type": event_type}
        if payload is not None:
            body["payload"] = payload
        if key is not None:
            body["idempotency_key"] = key
        if expected is not None:
            body["expected_previous_seq"] = expected
        return self.call("POST", "/internal/v1/runs/%s/events" % run_id, body, headers)

    def poll(self, topic, after=0, limit=None, token=None, headers=None):
        path = "/internal/v1/khala/topics/%s/messages?after_seq=%d" % (topic, after)
        if limit is not None:
            path += "&limit=%d" % limit
        h = dict(headers or {})
        if token is not False:
            h.setdefault("Authorization", "Bearer " + (token or mint(claims())))
        return self.call("GET", path, headers=h)


class WsClient:
    """tests/integration/khala_ws_client.cjs (npm ws) as a subprocess: its
    events as decoded lines."""

    def __init__(self, rt, topic, after=0, want=0, timeout_ms=15000, token=None, headers=None):
        h = dict(headers or {})
        if token is not False:
            h.setdefault("Authorization", "Bearer " + (token or mint(claims())))
        url = "ws://127.0.0.1:%d/internal/v1/khala/topics/%s/ws?after_seq=%d" % (rt.port, topic, after)
        self.proc = subprocess.Popen([need("node"), os.path.join(HERE, "khala_ws_client.cjs"), url, str(want),
                                      str(timeout_ms), json.dumps(h)], cwd=HERE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.events = []

    def wait_ready(self):
        """Reads events until the hello frame (or the end); returns them."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.events.append(json.loads(line))
            if "ready" in self.events[-1]:
                break
        return self.events

    def finish(self, timeout=30):
        # The client ends by itself (its own timeout); reading to EOF through
        # the same buffered file keeps what wait_ready's readline buffered.
        for line in self.proc.stdout:
            if line.strip():
                self.events.append(json.loads(line))
        self.proc.wait(timeout)
        self.proc.stdout.close()
        return self.events

    def frames(self, kind=None):
        return [e["frame"] for e in self.events if "frame" in e and (kind is None or e["frame"]["type"] == kind)]


def metric_values(rt):
    """The runtime's /metrics samples: {'name{labels}': value}."""
    st, _, data = http("GET", rt.base + "/metrics")
    assert st == 200, st
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
            for ln in data.decode().splitlines() if ln and not ln.startswith("#")}


def named_db_url(name):
    """DATABASE_URL with an application_name, so that a test can find (and
    kill) the backends of the runtime it started."""
    return DATABASE_URL + ("&" if "?" in DATABASE_URL else "?") + "application_name=" + name


def db():
    c = psycopg2.connect(DATABASE_URL)
    c.autocommit = True
    return c


class Runs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rt = Runtime().start()

    @classmethod
    def tearDownClass(cls):
        cls.rt.stop()

    def test_health_and_ready(self):
        st, hdrs, b = self.rt.call("GET", "/healthz")
        self.assertEqual(st, 200)
        self.assertTrue(hdrs.get("x-request-id"))
        for k in ("status", "service", "build_sha", "uptime_seconds", "authority_write_mode",
                  "authority_writer_active", "fanout_driver"):
            self.assertIn(k, b)
        self.assertEqual((b["status"], b["service"], b["build_sha"], b["authority_write_mode"]),
                         ("ok", "runtime", "dev", "rust_active"))
        self.assertIs(b["authority_writer_active"], True)
        st, _, b = self.rt.call("GET", "/readyz")
        self.assertEqual(st, 200)
        self.assertEqual(b["status"], "ready")
        for k in ("authority_ready", "projector_ready", "workers_ready"):
            self.assertIs(b[k], True)

    def test_create_run_shape(self):
        run = self.rt.new_run()
        uuid.UUID(run["id"])
        self.assertEqual(run["status"], "running")
        self.assertIsNone(run["metadata"])
        self.assertIsNone(run["worker_id"])
        self.assertEqual(len(run["events"]), 1)
        ev = run["events"][0]
        self.assertEqual((ev["seq"], ev["event_type"], ev["payload"], ev["idempotency_key"]),
                         (1, "run.started", {"source": "runtime"}, None))
        self.assertTrue(ev["recorded_at"].endswith("Z"))
        for k in ("created_at", "updated_at"):
            self.assertIn(k, run)
        run = self.rt.new_run(worker_id="desktop:w1", metadata={"a": [1, 2]})
        self.assertEqual((run["worker_id"], run["metadata"]), ("desktop:w1", {"a": [1, 2]}))
        st, _, b = self.rt.call("GET", "/internal/v1/runs/" + run["id"])
        self.assertEqual((st, b["run"]), (200, run))

    def test_run_get_whole_or_streamed(self):
        """A run whose events fit in a page (64) is answered whole, with a
        Content-Length; a longer one is streamed (chunked) a page at a
        time, and both carry the same RUN object: every field, every event
        in order, text escaped (a key with quotes, a newline and a control
        byte; unicode kept), payloads as stored."""
        run = self.rt.new_run(worker_id='w"\n\x01é', metadata={"k": [1, 2.5, None]})
        rid = run["id"]
        st, _, a = self.rt.append(rid, "step", {"n": 0, "s": "\u2028\t"}, key='k"\\0\x7f')
        self.assertEqual(st, 200, a)
        st, hdrs, body = http("GET", self.rt.base + "/internal/v1/runs/" + rid)
        self.assertEqual((st, hdrs.get("transfer-encoding"), int(hdrs["content-length"])), (200, None, len(body)))
        whole = json.loads(body)
        self.assertEqual(whole, a)
        self.assertEqual(list(whole["run"]), ["id", "worker_id", "status", "metadata", "events", "created_at",
                                              "updated_at"])
        self.assertEqual((whole["run"]["worker_id"], whole["run"]["events"][1]["idempotency_key"],
                          whole["run"]["events"][1]["payload"]), ('w"\n\x01é', 'k"\\0\x7f', {"n": 0, "s": "\u2028\t"}))
        for i in range(1, 70):
            st, _, _ = self.rt.append(rid, "step", {"n": i}, headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200)
        st, hdrs, body = http("GET", self.rt.base + "/internal/v1/runs/" + rid)
        self.assertEqual((st, hdrs.get("transfer-encoding"), hdrs.get("content-type")),
                         (200, "chunked", "application/json"))
        streamed = json.loads(body)["run"]
        self.assertEqual([e["seq"] for e in streamed["events"]], list(range(1, 72)))
        self.assertEqual([e["payload"]["n"] for e in streamed["events"][1:]], list(range(70)))
        self.assertEqual(streamed["events"][:2], whole["run"]["events"])
        self.assertEqual({k: v for k, v in streamed.items() if k not in ("events", "updated_at")},
                         {k: v for k, v in whole["run"].items() if k not in ("events", "updated_at")})
        # An append's own full answer is the same object, whole.
        st, hdrs, body = http("POST", self.rt.base + "/internal/v1/runs/%s/events" % rid,
                              json.dumps({"event_type": "step", "payload": {"n": 70}}).encode(),
                              {"Content-Type": "application/json"})
        self.assertEqual((st, hdrs.get("transfer-encoding")), (200, None))
        self.assertEqual([e["seq"] for e in json.loads(body)["run"]["events"]], list(range(1, 73)))
        st, _, b = self.rt.call("GET", "/internal/v1/runs/00000000-0000-0000-0000-000000000000")
        self.assertEqual((st, b["error"]), (404, "not_found"))

    def test_full_append_answer_of_a_long_run_is_minimal(self):
        """An append's answer with the run's events stops at 1 MiB of text:
        past it the append, committed, is answered with the run without its
        events, as Prefer: return=minimal has it (the whole run was loaded
        and rendered for every such answer, up to 256 MiB each), and GET
        still streams the whole run."""
        rid = self.rt.new_run()["id"]
        minimal = {"Prefer": "return=minimal"}
        for i in range(3):
            st, _, b = self.rt.append(rid, "big", {"i": i, "blob": "x" * 250000}, headers=minimal)
            self.assertEqual(st, 200, b)
        st, _, b = self.rt.append(rid, "full")
        self.assertEqual((st, [e["seq"] for e in b["run"]["events"]]), (200, [1, 2, 3, 4, 5]))
        for i in range(3, 5):
            st, _, b = self.rt.append(rid, "big", {"i": i, "blob": "x" * 250000}, headers=minimal)
            self.assertEqual(st, 200, b)
        for i in range(65):
            st, _, b = self.rt.append(rid, "small", {"i": i}, headers=minimal)
            self.assertEqual(st, 200, b)
        st, _, b = self.rt.append(rid, "full", key="past-the-cap")
        self.assertEqual(st, 200, b)
        self.assertEqual(list(b["run"]), ["id", "worker_id", "status", "metadata", "last_seq", "created_at",
                                          "updated_at"])
        self.assertEqual((b["run"]["id"], b["run"]["last_seq"], b["run"]["status"]), (rid, 73, "running"))
        st, hdrs, body = http("GET", self.rt.base + "/internal/v1/runs/" + rid)
        self.assertEqual((st, hdrs.get("transfer-encoding")), (200, "chunked"))
        events = json.loads(body)["run"]["events"]
        self.assertEqual([e["seq"] for e in events], list(range(1, 74)))
        self.assertEqual([e["payload"]["i"] for e in events if e["event_type"] == "big"], list(range(5)))
        self.assertEqual(events[-1]["idempotency_key"], "past-the-cap")

    def test_append_idempotency_and_expected_seq(self):
        run = self.rt.new_run()
        rid = run["id"]
        st, _, b = self.rt.append(rid, "step", {"n": 1}, key="k-1", expected=1)
        self.assertEqual(st, 200, b)
        self.assertEqual([e["seq"] for e in b["run"]["events"]], [1, 2])
        self.assertEqual(b["run"]["events"][1]["idempotency_key"], "k-1")
        # The same key again: nothing appended, 200, even with a stale expected seq.
        for expected in (1, 0, None):
            st, _, b = self.rt.append(rid, "step", {"n": 99}, key="k-1", expected=expected)
            self.assertEqual(st, 200, b)
            self.assertEqual(len(b["run"]["events"]), 2)
            self.assertEqual(b["run"]["events"][1]["payload"], {"n": 1})
        st, _, b = self.rt.append(rid, "step", {"n": 2}, expected=1)
        self.assertEqual(st, 409, b)
        self.assertEqual(b["error"], "conflict")
        self.assertIn("request_id", b)
        st, _, b = self.rt.append(rid, "step", expected=2)
        self.assertEqual(st, 200, b)
        self.assertEqual(b["run"]["events"][2]["payload"], {})
        st, _, b = self.rt.call("GET", "/internal/v1/runs/" + rid)
        self.assertEqual(len(b["run"]["events"]), 3)

    def test_bad_requests(self):
        run = self.rt.new_run()
        p = "/internal/v1/runs/%s/events" % run["id"]
        st, _, b = http_json("POST", self.rt.base + p, b'{"event_type": "x",', {"Content-Type": "application/json"})
        self.assertEqual((st, b["error"]), (400, "invalid_request"))
        self.assertIn("byte", b["message"])
        # One JSON text, nothing after it (cJSON alone took the first value).
        st, _, b = http_json("POST", self.rt.base + p, b'{"event_type": "x"} {"more": 1}',
                             {"Content-Type": "application/json"})
        self.assertEqual((st, b["error"], b["message"]), (400, "invalid_request", "trailing bytes at byte 20"))
        # A payload deeper than the receipt can hash canonically is refused;
        # one within it appends, and the run's receipt still answers.
        for depth, want in ((130, 400), (100, 200)):
            body = b'{"event_type": "deep", "payload": {"d": ' + b"[" * depth + b"]" * depth + b"}}"
            st, _, b = http_json("POST", self.rt.base + p, body, {"Content-Type": "application/json"})
            self.assertEqual(st, want, b)
        st, _, rc = self.rt.call("GET", "/internal/v1/runs/%s/receipt" % run["id"])
        self.assertEqual(st, 200, rc)
        # Bytes that are not UTF-8 in the path or the query: 400, not the
        # 503 "retry" that PostgreSQL's refusal of the statement gave.
        for path in ("/internal/v1/workers/%FF?owner_user_id=1", "/internal/v1/projectors/drift?topic=%FF"):
            st, _, b = self.rt.call("GET", path)
            self.assertEqual((st, b["error"]), (400, "invalid_request"), path)
            self.assertIn("UTF-8", b["message"])
        for body in ({}, {"event_type": 5}, {"event_type": "x", "expected_previous_seq": -1},
                     {"event_type": "x", "idempotency_key": 3}):
            st, _, b = self.rt.call("POST", p, body)
            self.assertEqual((st, b["error"]), (400, "invalid_request"), body)
        st, _, b = self.rt.call("GET", "/internal/v1/runs/" + str(uuid.uuid4()))
        self.assertEqual((st, b["error"]), (404, "not_found"))
        st, _, b = self.rt.append(str(uuid.uuid4()), "x")
        self.assertEqual(st, 404)
        st, _, b = self.rt.call("GET", "/internal/v1/runs/not-a-uuid")
        self.assertEqual(st, 400)
        st, _, b = self.rt.call("DELETE", "/internal/v1/runs/" + run["id"])
        self.assertEqual(st, 405)
        # A body over 1 MiB is refused from its Content-Length, before it is
        # read (so the client may not even get to send it).
        with socket.create_connection(("127.0.0.1", self.rt.port), timeout=10) as sock:
            sock.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          "Content-Length: %d\r\n\r\n" % (p, 1024 * 1024 + 10)).encode() + b"{" * 1000)
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head)
        self.assertEqual(json.loads(body)["error"], "payload_too_large")

    def test_state_machine(self):
        def status_after(steps):
            run = self.rt.new_run()
            last = None
            for etype, payload in steps:
                last = self.rt.append(run["id"], etype, payload)
            return last

        legal = [
            ([("run.started", {})], "running"),
            ([("run.cancel_requested", {})], "canceling"),
            ([("run.cancel_requested", {}), ("run.cancel_requested", {})], "canceling"),
            ([("run.finished", {"status": "succeeded"})], "succeeded"),
            ([("run.finished", {"status": "failed"})], "failed"),
            ([("run.finished", {"status": "canceled"})], "canceled"),
            ([("run.finished", {"status": "cancelled"})], "canceled"),
            ([("run.cancel_requested", {}), ("run.finished", {"status": "canceled"})], "canceled"),
            ([("run.cancel_requested", {}), ("run.finished", {"status": "failed"})], "failed"),
            ([("run.finished", {"status": "succeeded"}), ("run.finished", {"status": "succeeded"})], "succeeded"),
            ([("run.finished", {"status": "failed"}), ("note", {"x": 1})], "failed"),
            ([("run.cancel_requested", {}), ("note", {})], "canceling"),
            ([("run.cancel_requested", {}), ("run.finished", {"status": "cancelled"})], "canceled"),
            ([("run.finished", {"status": "failed"}), ("run.finished", {"status": "failed"})], "failed"),
            ([("run.finished", {"status": "canceled"}), ("run.finished", {"status": "canceled"})], "canceled"),
            ([("run.finished", {"status": "canceled"}), ("run.finished", {"status": "cancelled"})], "canceled"),
            ([("run.started", {}), ("run.started", {})], "running"),
        ]
        for steps, want in legal:
            st, _, b = status_after(steps)
            self.assertEqual(st, 200, (steps, b))
            self.assertEqual(b["run"]["status"], want, steps)
            self.assertEqual(len(b["run"]["events"]), len(steps) + 1)
        illegal = [
            [("run.cancel_requested", {}), ("run.finished", {"status": "succeeded"})],
            [("run.cancel_requested", {}), ("run.started", {})],
            [("run.finished", {"status": "succeeded"}), ("run.started", {})],
            [("run.finished", {"status": "succeeded"}), ("run.cancel_requested", {})],
            [("run.finished", {"status": "succeeded"}), ("run.finished", {"status": "failed"})],
            [("run.finished", {"status": "failed"}), ("run.finished", {"status": "canceled"})],
            [("run.finished", {"status": "canceled"}), ("run.finished", {"status": "succeeded"})],
            [("run.finished", {"status": "failed"}), ("run.started", {})],
            [("run.finished", {"status": "failed"}), ("run.cancel_requested", {})],
            [("run.finished", {"status": "canceled"}), ("run.started", {})],
            [("run.finished", {"status": "canceled"}), ("run.cancel_requested", {})],
            [("run.cancel_requested", {}), ("run.finished", {"status": "canceled"}), ("run.finished", {"status": "failed"})],
            [("run.finished", {"status": "done"})],
            [("run.finished", {})],
            [("run.finished", {"status": 1})],
        ]
        for steps in illegal:
            st, _, b = status_after(steps)
            self.assertEqual(st, 400, (steps, b))
            self.assertEqual(b["error"], "invalid_request")
        run = self.rt.new_run()
        st, _, b = self.rt.append(run["id"], "run.finished")
        self.assertEqual(st, 400)

    def read_slowly(self, rt, path):
        """The chunked body at `path`, read 1 MiB at a time 10 ms apart, and
        how much the runtime's RSS grew meanwhile at most (KiB)."""
        before = rss_kib(rt.proc.pid)
        c = http_client.HTTPConnection("127.0.0.1", rt.port, timeout=60)
        self.addCleanup(c.close)
        c.request("GET", path)
        r = c.getresponse()
        self.assertEqual((r.status, r.getheader("transfer-encoding")), (200, "chunked"))
        data, peak = b"", before
        while True:
            piece = r.read(1 << 20)
            if not piece:
                break
            data += piece
            peak = max(peak, rss_kib(rt.proc.pid))
            time.sleep(0.01)
        c.close()
        return data, peak - before

    def test_receipt_and_replay_of_a_run_past_64_mib(self):
        """The receipt hashes a run one event at a time: a run whose
        canonical JSON passes 64 MiB (which one whole text was limited to,
        answering 500) gets its receipt, and the hash is the one Python
        computes over the whole list. Its replay is streamed in chunks a
        page of events at a time: the runtime's memory grows by a fraction
        of the run while a client reads it slowly (the whole replay built
        in memory grew it by more than twice the run)."""
        # A runtime of its own, so that the RSS is this replay's; under
        # AddressSanitizer, with no quarantine of freed memory (it would
        # keep every freed page resident, up to 256 MiB).
        rt = Runtime(ASAN_OPTIONS="quarantine_size_mb=0").start()
        self.addCleanup(rt.stop)
        rid = rt.new_run()["id"]
        for i in range(270):  # the run_events topic takes payloads of 256 KiB at most
            st, _, b = rt.append(rid, "big", {"i": i, "blob": "x" * 250000}, key="big%d" % i,
                                 headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200, b)
        data, growth = self.read_slowly(rt, "/internal/v1/runs/%s/replay" % rid)
        lines = [json.loads(x) for x in data.decode().splitlines()]
        self.assertEqual([x["type"] for x in lines[:2]], ["ReplayHeader", "SessionStart"])
        self.assertEqual(lines[-1]["type"], "SessionEnd")
        evs = lines[2:-1]
        self.assertEqual([e["seq"] for e in evs], list(range(1, 272)))
        self.assertEqual([e["payload"]["i"] for e in evs[1:]], list(range(270)))
        self.assertEqual(evs[-1]["payload_hash"], sha(canon(evs[-1]["payload"])))
        self.assertGreater(len(data), 64 << 20)
        self.assertLess(growth, 48 * 1024)
        # The run with its events, streamed the same way (built whole, it
        # held the run three times over: rows, tree, text).
        data, growth = self.read_slowly(rt, "/internal/v1/runs/%s" % rid)
        b = json.loads(data)
        self.assertLess(growth, 48 * 1024)
        events = b["run"]["events"]
        self.assertEqual([e["seq"] for e in events], list(range(1, 272)))
        self.assertEqual((b["run"]["id"], b["run"]["status"], events[5]["idempotency_key"]), (rid, "running", "big4"))
        text = canon([{"seq": e["seq"], "event_type": e["event_type"], "payload": e["payload"],
                       "idempotency_key": e["idempotency_key"], "recorded_at": e["recorded_at"]} for e in events])
        self.assertGreater(len(text.encode()), 64 << 20)
        st, _, rc = rt.call("GET", "/internal/v1/runs/%s/receipt" % rid)
        self.assertEqual(st, 200, rc)
        self.assertEqual((rc["trajectory_hash"], rc["event_count"]), (sha(text), len(events)))
        self.assertEqual((rc["first_seq"], rc["last_seq"]), (1, 271))

    def test_replays_to_readers_that_stop(self):
        """A replay or a long run's GET whose client stops reading holds its
        handler thread: at most half of the threads do (the next long
        answer gets 503 with Retry-After while the other routes, a short
        run's GET among them, answer), and a stop does not wait for such a
        client for ever."""
        rt = Runtime(RUNTIME_WORKER_THREADS=4).start()  # 2 long answers at once
        self.addCleanup(rt.stop)
        rid = rt.new_run()["id"]
        short = rt.new_run()["id"]
        for i in range(70):  # 10 MB, more than the socket buffers of a reader that stopped; more than a page of events
            st, _, b = rt.append(rid, "big", {"i": i, "blob": "y" * 150000}, headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200, b)
        stalled = []
        for path in ("/replay", ""):
            c = socket.create_connection(("127.0.0.1", rt.port))
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            c.sendall(b"GET /internal/v1/runs/%s%s HTTP/1.1\r\nHost: x\r\n\r\n" % (rid.encode(), path.encode()))
            c.settimeout(10)
            self.assertTrue(c.recv(1024).startswith(b"HTTP/1.1 200"))
            stalled.append(c)
        time.sleep(0.5)
        for path in ("/replay", ""):
            st, hdrs, body = http("GET", rt.base + "/internal/v1/runs/%s%s" % (rid, path))
            self.assertEqual((st, hdrs.get("retry-after"), json.loads(body)["error"]), (503, "1", "unavailable"))
        st, _, b = rt.call("GET", "/internal/v1/runs/%s/receipt" % rid)
        self.assertEqual((st, b["event_count"]), (200, 71))
        st, _, b = rt.call("GET", "/internal/v1/runs/%s" % short)
        self.assertEqual((st, len(b["run"]["events"])), (200, 1))
        stalled.pop().close()
        # Its thread lets go once a write fails; then a replay goes through.
        wait_for(lambda: http("GET", rt.base + "/internal/v1/runs/%s/replay" % rid, timeout=30)[0] == 200, 15,
                 what="a replay slot to free up")
        t0 = time.monotonic()
        rt.proc.send_signal(signal.SIGTERM)
        rc = rt.proc.wait(30)
        self.assertEqual(rc, 0)
        self.assertLess(time.monotonic() - t0, 20)
        stalled[0].close()

    def test_receipt_and_replay(self):
        run = self.rt.new_run(metadata={"policy_bundle_id": "pb.test"})
        rid = run["id"]
        self.rt.append(rid, "tool", {"b": [1, 2.5, "é\n"], "a": {"z": None, "y": True}}, key="t1")
        st, _, b = self.rt.append(rid, "run.finished", {"status": "succeeded"})
        events = b["run"]["events"]
        st, _, rc = self.rt.call("GET", "/internal/v1/runs/%s/receipt" % rid)
        self.assertEqual(st, 200, rc)
        want = sha(canon([{"seq": e["seq"], "event_type": e["event_type"], "payload": e["payload"],
                           "idempotency_key": e["idempotency_key"], "recorded_at": e["recorded_at"]}
                          for e in events]))
        self.assertEqual(rc["trajectory_hash"], want)
        self.assertEqual((rc["schema"], rc["session_id"], rc["policy_bundle_id"], rc["event_count"],
                          rc["first_seq"], rc["last_seq"], rc["tool_calls"], rc["verification"]),
                         ("openagents.receipt.v1", rid, "pb.test", 3, 1, 3, [], []))
        self.assertEqual(rc["created_at"], run["created_at"])
        _, _, again = self.rt.call("GET", "/internal/v1/runs/%s/receipt" % rid)
        self.assertEqual(again, rc)
        plain = self.rt.new_run()
        _, _, rc2 = self.rt.call("GET", "/internal/v1/runs/%s/receipt" % plain["id"])
        self.assertEqual(rc2["policy_bundle_id"], "runtime.default")

        st, hdrs, data = http("GET", self.rt.base + "/internal/v1/runs/%s/replay" % rid)
        self.assertEqual(st, 200)
        self.assertTrue(hdrs["content-type"].startswith("application/x-ndjson"))
        lines = [json.loads(x) for x in data.decode().splitlines()]
        self.assertEqual(len(lines), 2 + 3 + 1)
        self.assertEqual(lines[0], {"type": "ReplayHeader", "replay_version": 1, "producer": "openagents-runtime",
                                    "created_at": run["created_at"]})
        self.assertEqual(lines[1], {"type": "SessionStart", "ts": run["created_at"], "session_id": rid,
                                    "policy_bundle_id": "pb.test"})
        for line, ev in zip(lines[2:5], events):
            self.assertEqual(line["type"], "RuntimeEvent")
            self.assertEqual((line["ts"], line["session_id"], line["seq"], line["runtime_event_type"], line["payload"]),
                             (ev["recorded_at"], rid, ev["seq"], ev["event_type"], ev["payload"]))
            self.assertEqual(line["payload_hash"], sha(canon(ev["payload"])))
        end = lines[5]
        self.assertEqual((end["type"], end["session_id"], end["status"], end["confidence"], end["total_tool_calls"]),
                         ("SessionEnd", rid, "success", 1, 0))
        for status, want_end in (("failed", "failure"), ("canceled", "cancelled")):
            r = self.rt.new_run()
            self.rt.append(r["id"], "run.finished", {"status": status})
            _, _, data = http("GET", self.rt.base + "/internal/v1/runs/%s/replay" % r["id"])
            self.assertEqual(json.loads(data.decode().splitlines()[-1])["status"], want_end)

    def test_projections_and_drift_on_forced_gap(self):
        run = self.rt.new_run()
        rid = run["id"]
        self.rt.append(rid, "step")
        self.rt.append(rid, "run.cancel_requested")
        st, _, b = self.rt.call("GET", "/internal/v1/projectors/run-summary/" + rid)
        self.assertEqual(st, 200, b)
        s = b["summary"]
        self.assertEqual((s["run_id"], s["status"], s["last_seq"], s["event_count"]), (rid, "canceling", 3, 3))
        self.assertEqual(s["projection_hash"], sha(canon({"run_id": rid, "status": "canceling", "last_seq": 3,
                                                           "event_count": 3})))
        st, _, b = self.rt.call("GET", "/internal/v1/projectors/checkpoints/" + rid)
        self.assertEqual(b["checkpoint"]["topic"], "run:%s:events" % rid)
        self.assertEqual((b["checkpoint"]["last_seq"], b["checkpoint"]["last_event_type"]), (3, "run.cancel_requested"))
        topic = "run:%s:events" % rid
        st, _, b = self.rt.call("GET", "/internal/v1/projectors/drift?topic=" + topic)
        self.assertEqual(st, 404)
        # The authority's sequence jumps (events 4 and 5 lost, as a bad
        # restore would leave it): the next append is seq 6 after 3.
        with db() as c, c.cursor() as cur:
            cur.execute("UPDATE runtime.runs SET last_seq = last_seq + 2 WHERE id = %s", (rid,))
        st, _, b = self.rt.append(rid, "after.gap")
        self.assertEqual([e["seq"] for e in b["run"]["events"]], [1, 2, 3, 6])
        st, _, b = self.rt.call("GET", "/internal/v1/projectors/drift?topic=" + topic)
        self.assertEqual(st, 200, b)
        d = b["drift"]
        self.assertEqual((d["topic"], d["expected_next_seq"], d["last_seen_seq"], d["incoming_seq"], d["reason"]),
                         (topic, 4, 3, 6, "sequence_gap"))
        self.assertIn("detected_at", d)
        st, _, b = self.rt.call("GET", "/internal/v1/projectors/drift")
        self.assertEqual(st, 400)

    def test_minimal_append_after_forced_gap_records_drift(self):
        # The loop's one-statement append leaves a run whose projector is
        # behind its log to append_run_event, which records the drift.
        rid = self.rt.new_run()["id"]
        minimal = {"Prefer": "return=minimal"}
        st, _, b = self.rt.append(rid, "step", headers=minimal)
        self.assertEqual((st, b["run"]["last_seq"]), (200, 2), b)
        with db() as c, c.cursor() as cur:
            cur.execute("UPDATE runtime.runs SET last_seq = last_seq + 2 WHERE id = %s", (rid,))
        st, _, b = self.rt.append(rid, "after.gap", key="gap-1", headers=minimal)
        self.assertEqual((st, b["run"]["last_seq"]), (200, 5), b)
        self.assertNotIn("events", b["run"])
        st, _, b = self.rt.call("GET", "/internal/v1/projectors/drift?topic=run:%s:events" % rid)
        self.assertEqual(st, 200, b)
        d = b["drift"]
        self.assertEqual((d["expected_next_seq"], d["last_seen_seq"], d["incoming_seq"]), (3, 2, 5))
        st, _, b = self.rt.append(rid, "after.gap", key="gap-1", headers=minimal)
        self.assertEqual((st, b["run"]["last_seq"]), (200, 5), b)
        st, _, b = self.rt.append(rid, "next", headers=minimal)
        self.assertEqual((st, b["run"]["last_seq"]), (200, 6), b)
        _, _, b = self.rt.call("GET", "/internal/v1/runs/" + rid)
        self.assertEqual([e["seq"] for e in b["run"]["events"]], [1, 2, 5, 6])

    def test_same_key_from_many_clients_appends_once(self):
        # Sixteen clients send one key at once (they may share a group, or
        # race on the key index from different groups): one append, fifteen
        # replays, all answered 200 with the run at seq 2.
        rid = self.rt.new_run()["id"]
        got, lock = [], threading.Lock()

        def client(n):
            st, _, b = self.rt.append(rid, "once", {"n": n}, key="the-key", headers={"Prefer": "return=minimal"})
            with lock:
                got.append((st, b.get("run", {}).get("last_seq")))

        ts = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(got, [(200, 2)] * 16)
        _, _, b = self.rt.call("GET", "/internal/v1/runs/" + rid)
        self.assertEqual([(e["seq"], e["idempotency_key"]) for e in b["run"]["events"]], [(1, None), (2, "the-key")])

    def test_metrics(self):
        """Each series moves with what it counts (the stale-cursor ones:
        Khala.test_websocket_stale_cursor_frame_then_close)."""
        run = self.rt.new_run()
        before = metric_values(self.rt)
        self.rt.append(run["id"], "metric.probe", key="m1")
        self.rt.append(run["id"], "metric.probe", key="m1")
        self.rt.append(run["id"], "metric.probe", expected=0)
        ws = WsClient(self.rt, "run:%s:events" % run["id"], after=2, want=1)
        ws.wait_ready()
        during = metric_values(self.rt)
        self.rt.append(run["id"], "metric.after", headers={"Prefer": "return=minimal"})
        ws.finish()
        wait_for(lambda: metric_values(self.rt)["runtime_khala_subscribers"] == before["runtime_khala_subscribers"],
                 10, what="the subscriber gauge to come back down")
        after = metric_values(self.rt)

        def delta(name, at=after):
            return at.get(name, 0) - before.get(name, 0)
        self.assertEqual((delta('runtime_appends_total{event_type="metric.probe"}'),
                          delta('runtime_appends_total{event_type="metric.after"}'),
                          delta("runtime_idempotent_replays_total"), delta("runtime_append_conflicts_total"),
                          delta("runtime_khala_messages_published_total"),
                          delta("runtime_khala_subscribers", during)), (1, 1, 1, 1, 2, 1))
        st, hdrs, data = http("GET", self.rt.base + "/metrics")
        r = subprocess.run([need("promtool"), "check", "metrics"], input=data, capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class Workers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rt = Runtime(RUNTIME_WORKER_HEARTBEAT_STALE_AFTER_MS=1500).start()

    @classmethod
    def tearDownClass(cls):
        cls.rt.stop()

    def wid(self):
        return "desktop:%s:w" % uuid.uuid4().hex[:8]

    def test_worker_ids_with_percent_signs(self):
        """A path is percent-decoded once (libwebsockets does it): a%2541 is
        the worker a%41, not aA, and a%25b the worker a%b, not a 400."""
        u = uuid.uuid4().hex[:6]
        for wid in ("a%b" + u, "a%41" + u, "aA" + u):
            st, _, b = self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7})
            self.assertEqual(st, 201, b)
        for path, wid in (("a%25b", "a%b"), ("a%2541", "a%41"), ("a%41", "aA"), ("aA", "aA")):
            st, _, b = self.rt.call("GET", "/internal/v1/workers/%s%s?owner_user_id=7" % (path, u))
            self.assertEqual((st, b["worker"]["worker"]["worker_id"]), (200, wid + u), path)

    def test_register_get_and_owners(self):
        wid = self.wid()
        st, _, b = self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7,
                                                                 "workspace_ref": "ws1", "metadata": {"env": "dev"}})
        self.assertEqual(st, 201, b)
        w, live = b["worker"]["worker"], b["worker"]["liveness"]
        self.assertEqual((w["worker_id"], w["owner"], w["status"], w["latest_seq"], w["workspace_ref"],
                          w["codex_home_ref"], w["adapter"], w["metadata"], w["stopped_at"]),
                         (wid, {"user_id": 7, "guest_scope": None}, "running", 1, "ws1", None, "in_memory",
                          {"env": "dev"}, None))
        for k in ("started_at", "last_heartbeat_at", "updated_at"):
            self.assertTrue(w[k])
        self.assertEqual((live["heartbeat_stale_after_ms"], live["heartbeat_state"]), (1500, "fresh"))
        self.assertGreaterEqual(live["heartbeat_age_ms"], 0)
        # The same owner reattaches; metadata merges.
        st, _, b = self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7,
                                                                 "metadata": {"k": 1}})
        self.assertEqual(st, 201, b)
        self.assertEqual((b["worker"]["worker"]["latest_seq"], b["worker"]["worker"]["metadata"]),
                         (2, {"env": "dev", "k": 1}))
        st, _, b = self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 8})
        self.assertEqual(st, 403, b)
        st, _, b = self.rt.call("GET", "/internal/v1/workers/%s?owner_user_id=7" % wid)
        self.assertEqual((st, b["worker"]["worker"]["worker_id"]), (200, wid))
        st, _, b = self.rt.call("GET", "/internal/v1/workers/" + wid)
        self.assertEqual((st, b["error"]), (400, "invalid_request"))
        st, _, b = self.rt.call("GET", "/internal/v1/workers/%s?owner_user_id=8" % wid)
        self.assertEqual(st, 403)
        st, _, b = self.rt.call("GET", "/internal/v1/workers/%s?owner_guest_scope=g1" % wid)
        self.assertEqual(st, 403)
        st, _, b = self.rt.call("GET", "/internal/v1/workers/nope:%s?owner_user_id=7" % uuid.uuid4().hex)
        self.assertEqual(st, 404)
        for body in ({"worker_id": self.wid()}, {"worker_id": self.wid(), "owner_user_id": 1, "owner_guest_scope": "g"},
                     {"worker_id": self.wid(), "owner_user_id": "7"}, {"owner_guest_scope": "  "}):
            st, _, b = self.rt.call("POST", "/internal/v1/workers", body)
            self.assertEqual(st, 400, body)
        st, _, b = self.rt.call("POST", "/internal/v1/workers", {"owner_guest_scope": "guest-abc"})
        self.assertEqual(st, 201, b)
        gid = b["worker"]["worker"]["worker_id"]
        self.assertRegex(gid, r"^codexw_[0-9a-f-]{36}$")
        self.assertEqual(b["worker"]["worker"]["owner"], {"user_id": None, "guest_scope": "guest-abc"})
        st, _, b = self.rt.call("GET", "/internal/v1/workers/%s?owner_guest_scope=guest-abc" % gid)
        self.assertEqual(st, 200)
        st, _, b = self.rt.call("GET", "/internal/v1/workers?owner_guest_scope=guest-abc")
        self.assertIn(gid, [x["worker"]["worker_id"] for x in b["workers"]])
        st, _, b = self.rt.call("GET", "/internal/v1/workers?owner_user_id=7")
        ids = [x["worker"]["worker_id"] for x in b["workers"]]
        self.assertIn(wid, ids)
        self.assertNotIn(gid, ids)

    def test_transitions(self):
        def fresh():
            wid = self.wid()
            st, _, _ = self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7})
            self.assertEqual(st, 201)
            return wid

        def move(wid, status, uid=7):
            return self.rt.call("POST", "/internal/v1/workers/%s/status" % wid,
                                {"owner_user_id": uid, "status": status, "reason": "test"})

        legal = [["stopping", "stopped", "starting", "running"], ["failed", "running"], ["stopped", "running"],
                 ["running"], ["stopping", "failed", "starting", "stopping"], ["failed", "starting", "failed"],
                 ["stopped", "starting", "running", "stopped"]]
        for path in legal:
            wid = fresh()
            for s in path:
                st, _, b = move(wid, s)
                self.assertEqual(st, 200, (path, s, b))
                self.assertEqual(b["worker"]["worker"]["status"], s)
                if s in ("stopped", "failed"):
                    self.assertTrue(b["worker"]["worker"]["stopped_at"])
                    self.assertEqual(b["worker"]["liveness"]["heartbeat_state"], s)
                else:
                    self.assertIsNone(b["worker"]["worker"]["stopped_at"])
        illegal = [["starting"], ["stopping", "running"], ["stopping", "starting"], ["stopped", "stopping"],
                   ["failed", "stopped"], ["stopped", "failed"], ["failed", "stopping"]]
        for path in illegal:
            wid = fresh()
            for s in path[:-1]:
                self.assertEqual(move(wid, s)[0], 200)
            st, _, b = move(wid, path[-1])
            self.assertEqual((st, b["error"]), (400, "invalid_request"), path)
        wid = fresh()
        self.assertEqual(move(wid, "sleeping")[0], 400)
        self.assertEqual(move(wid, "stopping", uid=8)[0], 403)
        self.assertEqual(move("unknown:" + uuid.uuid4().hex, "stopping")[0], 404)
        st, _, b = self.rt.call("POST", "/internal/v1/workers/%s/status" % wid, {"status": "stopping"})
        self.assertEqual(st, 400)

    def test_heartbeat_stale_and_checkpoint(self):
        wid = self.wid()
        self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7})
        st, _, b = self.rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid,
                                {"owner_user_id": 7, "metadata_patch": {"cpu": 3}})
        self.assertEqual(st, 200, b)
        self.assertEqual((b["worker"]["worker"]["metadata"], b["worker"]["worker"]["latest_seq"],
                          b["worker"]["liveness"]["heartbeat_state"]), ({"cpu": 3}, 2, "fresh"))
        self.assertEqual(self.rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid,
                                      {"owner_user_id": 9, "metadata_patch": {}})[0], 403)
        self.assertEqual(self.rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid, {"metadata_patch": {}})[0],
                         400)
        time.sleep(1.7)
        st, _, b = self.rt.call("GET", "/internal/v1/workers/%s?owner_user_id=7" % wid)
        self.assertEqual(b["worker"]["liveness"]["heartbeat_state"], "stale")
        self.assertGreater(b["worker"]["liveness"]["heartbeat_age_ms"], 1500)
        st, _, b = self.rt.call("GET", "/internal/v1/workers/%s/checkpoint" % wid)
        self.assertEqual(st, 200, b)
        self.assertEqual(b["checkpoint"], dict(b["checkpoint"], topic="worker:%s:lifecycle" % wid, last_seq=2,
                                               last_event_type="worker.heartbeat"))
        self.assertEqual(self.rt.call("GET", "/internal/v1/workers/nobody:%s/checkpoint" % uuid.uuid4().hex)[0], 404)
        # The worker topic carries one message per write, worker.<status>.
        st, _, b = self.rt.poll("worker:%s:lifecycle" % wid)
        self.assertEqual(st, 200, b)
        self.assertEqual([(m["sequence"], m["kind"]) for m in b["messages"]],
                         [(1, "worker.running"), (2, "worker.running")])
        self.assertEqual(b["messages"][1]["payload"], {"worker_id": wid, "status": "running", "latest_seq": 2,
                                                       "heartbeat_state": "fresh"})


class Khala(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rt = Runtime(RUNTIME_KHALA_RUN_EVENTS_REPLAY_BUDGET_EVENTS=15, RUNTIME_KHALA_RETENTION_MESSAGES=40,
                         RUNTIME_SYNC_REVOKED_JTIS="revoked-1, revoked-2").start()

    @classmethod
    def tearDownClass(cls):
        cls.rt.stop()

    def topic_with(self, n):
        run = self.rt.new_run()
        for i in range(n - 1):
            st, _, _ = self.rt.append(run["id"], "step", {"i": i}, headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200)
        return run["id"], "run:%s:events" % run["id"]

    def test_poll_order_resume_and_shape(self):
        rid, topic = self.topic_with(8)
        st, _, b = self.rt.poll(topic, 0, limit=5)
        self.assertEqual(st, 200, b)
        self.assertEqual([m["sequence"] for m in b["messages"]], [1, 2, 3, 4, 5])
        m = b["messages"][1]
        self.assertEqual((m["topic"], m["kind"], m["payload"]), (topic, "step", {"i": 0}))
        self.assertIn("published_at", m)
        self.assertEqual((b["topic"], b["oldest_available_cursor"], b["head_cursor"], b["next_cursor"],
                          b["replay_complete"], b["limit_applied"], b["limit_capped"]),
                         (topic, 0, 8, 5, False, 5, False))
        st, _, b = self.rt.poll(topic, b["next_cursor"], limit=500)
        self.assertEqual([m["sequence"] for m in b["messages"]], [6, 7, 8])
        self.assertEqual((b["next_cursor"], b["replay_complete"], b["limit_applied"], b["limit_capped"]),
                         (8, True, 200, True))
        st, _, b = self.rt.poll(topic, 8)
        self.assertEqual((b["messages"], b["next_cursor"], b["limit_applied"]), ([], 8, 100))
        st, _, b = self.rt.poll(topic, 0, limit=0)
        self.assertEqual(len(b["messages"]), 1)

    def test_stale_cursor_budget_and_floor(self):
        rid, topic = self.topic_with(20)
        st, _, b = self.rt.poll(topic, 2)
        self.assertEqual(st, 410, b)
        self.assertEqual(b["error"], "stale_cursor")
        d = b["details"]
        self.assertEqual((d["topic"], d["requested_cursor"], d["oldest_available_cursor"], d["head_cursor"],
                          d["reason_codes"], d["recovery"]),
                         (topic, 2, 0, 20, ["replay_budget_exceeded"], "reset_local_watermark_and_replay_bootstrap"))
        self.assertEqual(self.rt.poll(topic, 5)[0], 200)
        # The retention window is 40 messages: at head 50 the floor is 10.
        for i in range(30):
            self.rt.append(rid, "more", {"i": i}, headers={"Prefer": "return=minimal"})
        st, _, b = self.rt.poll(topic, 45)
        self.assertEqual(st, 200, b)
        floor = b["oldest_available_cursor"]
        self.assertGreater(floor, 0)
        self.assertEqual(b["head_cursor"], 50)
        st, _, b = self.rt.poll(topic, floor - 1)
        self.assertEqual(st, 410, b)
        self.assertEqual(b["details"]["reason_codes"], ["retention_floor_breach", "replay_budget_exceeded"])
        self.assertEqual(b["details"]["oldest_available_cursor"], floor)
        if 50 - floor <= 15:
            st, _, b = self.rt.poll(topic, floor)
            self.assertEqual(st, 200)
            self.assertEqual(b["messages"][0]["sequence"], floor + 1)
        self.assertEqual(floor, 10)

    def test_websocket_replay_then_live_in_order(self):
        rid, topic = self.topic_with(5)
        ws = WsClient(self.rt, topic, after=2, want=6)
        ev = ws.wait_ready()
        hello = ws.frames("hello")[0]
        self.assertEqual((hello["topic"], hello["after_seq"]), (topic, 2))
        for i in range(3):
            st, _, _ = self.rt.append(rid, "live", {"i": i}, headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200)
        ws.finish()
        msgs = [f["message"] for f in ws.frames("message")]
        self.assertEqual([m["sequence"] for m in msgs], [3, 4, 5, 6, 7, 8], ev)
        self.assertEqual([m["kind"] for m in msgs[-3:]], ["live"] * 3)
        self.assertEqual([m["payload"] for m in msgs[-3:]], [{"i": 0}, {"i": 1}, {"i": 2}])
        for m in msgs:
            self.assertEqual(m["topic"], topic)
            self.assertTrue(m["published_at"].endswith("Z"))
        # The live frames carry what the poll route answers for them.
        _, _, polled = self.rt.poll(topic, 2)
        self.assertEqual(msgs, polled["messages"])
        # Resuming from a cursor: only what follows it.
        ws = WsClient(self.rt, topic, after=7, want=1)
        ws.finish()
        self.assertEqual([f["message"]["sequence"] for f in ws.frames("message")], [8])

    def test_websocket_append_in_flight_at_subscribe(self):
        """An append whose statement began before the topic's listener row
        committed did not see it and sends no NOTIFY; committing after the
        subscribers' first reads, its message still reaches each of them (a
        read follows once the statements older than the row ended), not
        only with the topic's next message."""
        rid = self.rt.new_run()["id"]
        lock = psycopg2.connect(DATABASE_URL)
        self.addCleanup(lock.close)
        lock.cursor().execute("SELECT 1 FROM runtime.runs WHERE id = %s FOR UPDATE", (rid,))
        got = []
        t = threading.Thread(target=lambda: got.append(
            self.rt.append(rid, "late", {"n": 1}, headers={"Prefer": "return=minimal"})))
        t.start()
        with db() as c:
            cur = c.cursor()

            def blocked():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND "
                            "query LIKE '%%runtime.runs%%' AND pid <> pg_backend_pid()")
                return cur.fetchone()[0] == 1
            wait_for(blocked, 10, what="the append to wait for the run's lock")
        # The first subscriber writes the topic's listener row; the second
        # comes after it, and reads before the append commits too.
        subs = []
        for _ in range(2):
            subs.append(WsClient(self.rt, "run:%s:events" % rid, after=1, want=1, timeout_ms=8000))
            subs[-1].wait_ready()
            self.assertTrue(subs[-1].frames("hello"), subs[-1].events)
        time.sleep(0.3)
        lock.commit()
        t.join(10)
        self.assertEqual(got[0][0], 200, got)
        for ws in subs:
            ws.finish()
            self.assertEqual([(f["message"]["sequence"], f["message"]["kind"]) for f in ws.frames("message")],
                             [(2, "late")], ws.events)

    def test_websocket_backlog_over_the_send_queue(self):
        """A backlog bigger than the send queue (1 MiB) reaches a reader
        that reads: its page was queued in one loop turn, which dropped the
        connection as too slow at every reconnect from the same cursor."""
        run = self.rt.new_run()
        topic = "run:%s:events" % run["id"]
        blob = "x" * 250000
        for i in range(6):
            st, _, b = self.rt.append(run["id"], "big", {"i": i, "blob": blob}, headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200, b)
        ws = WsClient(self.rt, topic, after=0, want=8)  # the run's creation is 1
        ws.wait_ready()
        st, _, _ = self.rt.append(run["id"], "live", {"i": 6}, headers={"Prefer": "return=minimal"})
        self.assertEqual(st, 200)
        ev = ws.finish()
        msgs = [f["message"] for f in ws.frames("message")]
        self.assertEqual([m["sequence"] for m in msgs], list(range(1, 9)), ev[-3:])
        self.assertEqual([m["payload"]["i"] for m in msgs[1:]], list(range(7)))
        self.assertEqual(len(msgs[1]["payload"]["blob"]), 250000)

    def test_run_topic_in_capitals_is_the_same_topic(self):
        """UUIDs compare without case: a subscriber of the topic spelled in
        capitals got the hello and the backlog, then no live message (the
        listener and the subscriber were filed under the capitals)."""
        rid, topic = self.topic_with(2)
        upper = "run:%s:events" % rid.upper()
        ws = WsClient(self.rt, upper, after=0, want=3)
        ws.wait_ready()
        self.assertEqual(ws.frames("hello")[0]["topic"], topic)
        st, _, _ = self.rt.append(rid, "live", {"i": 1}, headers={"Prefer": "return=minimal"})
        self.assertEqual(st, 200)
        ev = ws.finish()
        msgs = [f["message"] for f in ws.frames("message")]
        self.assertEqual([m["sequence"] for m in msgs], [1, 2, 3], ev[-3:])
        self.assertEqual(msgs[-1]["kind"], "live")
        st, _, b = self.rt.poll(upper, 0)
        self.assertEqual(st, 200, b)
        self.assertEqual([m["sequence"] for m in b["messages"]], [1, 2, 3])

    def test_websocket_worker_topic_live(self):
        wid = "desk:%s" % uuid.uuid4().hex[:8]
        self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7})
        ws = WsClient(self.rt, "worker:%s:lifecycle" % wid, want=3)
        ws.wait_ready()
        self.rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid, {"owner_user_id": 7})
        self.rt.call("POST", "/internal/v1/workers/%s/status" % wid, {"owner_user_id": 7, "status": "stopping"})
        ev = ws.finish()
        msgs = [f["message"] for f in ws.frames("message")]
        self.assertEqual([(m["sequence"], m["kind"]) for m in msgs],
                         [(1, "worker.running"), (2, "worker.running"), (3, "worker.stopping")], ev)
        self.assertEqual(msgs[2]["payload"]["status"], "stopping")

    def test_websocket_stale_cursor_frame_then_close(self):
        rid, topic = self.topic_with(20)
        ws = WsClient(self.rt, topic, after=1)
        ev = ws.finish()
        stale = ws.frames("stale_cursor")
        self.assertEqual(len(stale), 1, ev)
        self.assertEqual((stale[0]["topic"], stale[0]["requested_cursor"], stale[0]["head_cursor"],
                          stale[0]["reason_codes"], stale[0]["recovery"]),
                         (topic, 1, 20, ["replay_budget_exceeded"], "reset_local_watermark_and_replay_bootstrap"))
        self.assertEqual(ws.frames("message"), [])
        self.assertIn("close", ev[-1])
        self.assertEqual(stale[0]["oldest_available_cursor"], 0)
        # Past the retention floor (40 messages kept of 50): both reasons.
        before = metric_values(self.rt)
        rid, topic = self.topic_with(50)
        ws = WsClient(self.rt, topic, after=2)
        ev = ws.finish()
        stale = ws.frames("stale_cursor")
        self.assertEqual(len(stale), 1, ev)
        self.assertEqual((stale[0]["reason_codes"], stale[0]["oldest_available_cursor"], stale[0]["head_cursor"]),
                         (["retention_floor_breach", "replay_budget_exceeded"], 10, 50))
        self.assertIn("close", ev[-1])
        after = metric_values(self.rt)
        self.assertEqual([after[k] - before[k] for k in ('runtime_khala_stale_cursor_total{reason="retention_floor_breach"}',
                                                          'runtime_khala_stale_cursor_total{reason="replay_budget_exceeded"}')],
                         [1, 1])

    def test_websocket_refused_before_upgrade(self):
        rid, topic = self.topic_with(1)
        cases = [
            (dict(token=False), 401, "unauthorized", "missing_authorization"),
            (dict(token=mint(claims(exp=int(time.time()) - 5))), 401, "unauthorized", "token_expired"),
            (dict(token=mint(claims(oa_sync_scopes=[]))), 403, "forbidden_topic", "missing_scope"),
            (dict(headers={"Origin": "https://evil.example"}), 403, "forbidden_origin", "origin_not_allowed"),
        ]
        for kw, status, error, reason in cases:
            ws = WsClient(self.rt, topic, **kw)
            ev = ws.finish()
            self.assertEqual(len(ev), 1, ev)
            self.assertEqual(ev[0]["refused"], status, ev)
            self.assertEqual((ev[0]["body"]["error"], ev[0]["body"]["reason_code"]), (error, reason))
        ws = WsClient(self.rt, "worker:nobody-%s:lifecycle" % uuid.uuid4().hex)
        ev = ws.finish()
        self.assertEqual((ev[0]["refused"], ev[0]["body"]["reason_code"]), (403, "owner_mismatch"))
        # A topic past 600 bytes is refused as too long, on both routes,
        # not cut down to a shorter topic and judged as that one.
        long_topic = "run:%s:events" % ("a" * 700)
        ev = WsClient(self.rt, long_topic).finish()
        self.assertEqual((ev[0]["refused"], ev[0]["body"]["error"]), (400, "invalid_request"), ev)
        st, _, b = self.rt.poll(long_topic)
        self.assertEqual((st, b["error"]), (400, "invalid_request"), b)

    def test_token_refusals(self):
        rid, topic = self.topic_with(1)
        now = int(time.time())
        cases = [
            (None, "missing_authorization"),
            ("Basic dXNlcjpwYXNz", "invalid_authorization_scheme"),
            ("Bearer " + mint(claims(), key="another-key"), "invalid_token"),
            ("Bearer " + mint(claims(iss="https://evil.example")), "invalid_token"),
            ("Bearer " + mint(claims(aud="someone-else")), "invalid_token"),
            ("Bearer " + mint(claims(sub=None)), "invalid_token"),
            ("Bearer " + mint(claims(iss=None)), "invalid_token"),
            ("Bearer " + mint(claims(aud=None)), "invalid_token"),
            ("Bearer " + mint(claims(nbf=now + 3600)), "invalid_token"),
            ("Bearer " + mint(claims(exp=now - 10, iat=now - 20)), "token_expired"),
            ("Bearer " + mint(claims(iat=None)), "missing_iat"),
            ("Bearer " + mint(claims(iat=now - 301)), "token_too_old"),
            ("Bearer " + mint(claims(jti=None)), "missing_jti"),
            ("Bearer " + mint(claims(jti="revoked-2")), "token_revoked"),
            ("Bearer not.a.token", "invalid_token"),
        ]
        for auth, reason in cases:
            h = {"Authorization": auth} if auth else {}
            st, _, b = self.rt.poll(topic, token=False, headers=h)
            self.assertEqual((st, b.get("error"), b.get("reason_code")), (401, "unauthorized", reason), auth)
            self.assertTrue(b["message"])

    def test_forbidden(self):
        rid, topic = self.topic_with(1)
        st, _, b = self.rt.poll(topic, token=mint(claims(oa_sync_scopes=["runtime.worker_lifecycle_events"])))
        self.assertEqual((st, b["error"], b["reason_code"]), (403, "forbidden_topic", "missing_scope"))
        st, _, b = self.rt.poll("secrets:all", token=mint(claims()))
        self.assertEqual((st, b["error"], b["reason_code"]), (403, "forbidden_topic", "forbidden_topic"))
        wid = "desktop:%s" % uuid.uuid4().hex[:8]
        self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7})
        wt = "worker:%s:lifecycle" % wid
        st, _, b = self.rt.poll(wt, token=mint(claims()))
        self.assertEqual(st, 200, b)
        st, _, b = self.rt.poll(wt, token=mint(claims(oa_sync_scopes=["runtime.codex_worker_events"])))
        self.assertEqual(st, 200, b)
        st, _, b = self.rt.poll(wt, token=mint(claims(oa_sync_scopes=["runtime.run_events"])))
        self.assertEqual((st, b["reason_code"]), (403, "missing_scope"))
        st, _, b = self.rt.poll(wt, token=mint(claims(oa_user_id=8)))
        self.assertEqual((st, b["error"], b["reason_code"]), (403, "forbidden_topic", "owner_mismatch"))
        st, _, b = self.rt.poll("worker:unknown-%s:lifecycle" % uuid.uuid4().hex, token=mint(claims()))
        self.assertEqual((st, b["reason_code"]), (403, "owner_mismatch"))
        # A guest worker is its org's: a token without a user id reads it.
        st, _, b = self.rt.call("POST", "/internal/v1/workers", {"owner_guest_scope": "org:guest"})
        gt = "worker:%s:lifecycle" % b["worker"]["worker"]["worker_id"]
        self.assertEqual(self.rt.poll(gt, token=mint(claims(oa_user_id=None, oa_org_id="org:guest")))[0], 200)
        self.assertEqual(self.rt.poll(gt, token=mint(claims(oa_user_id=None, oa_org_id="org:other")))[0], 403)

    def test_origin_policy(self):
        rid, topic = self.topic_with(1)
        st, _, b = self.rt.poll(topic, headers={"Origin": "https://evil.example"})
        self.assertEqual((st, b["error"], b["reason_code"]), (403, "forbidden_origin", "origin_not_allowed"))
        for origin in ("https://openagents.com", "https://WWW.openagents.com/"):
            self.assertEqual(self.rt.poll(topic, headers={"Origin": origin})[0], 200, origin)
        self.assertEqual(self.rt.poll(topic)[0], 200)

    def test_node_jsonwebtoken_token_accepted(self):
        rid, topic = self.topic_with(2)
        script = ("const jwt=require('jsonwebtoken');"
                  "process.stdout.write(jwt.sign({sub:'user:7',oa_user_id:7,oa_sync_scopes:['runtime.run_events']},"
                  "process.argv[1],{algorithm:'HS256',expiresIn:600,issuer:process.argv[2],audience:process.argv[3],"
                  "jwtid:'node-'+Date.now()}));")
        r = subprocess.run([need("node"), "-e", script, KEY, ISS, AUD], cwd=HERE, capture_output=True, text=True,
                           check=True)
        st, _, b = self.rt.poll(topic, token=r.stdout.strip())
        self.assertEqual(st, 200, b)
        self.assertEqual([m["sequence"] for m in b["messages"]], [1, 2])

    def test_publish_limits(self):
        rt = Runtime(RUNTIME_KHALA_RUN_EVENTS_PUBLISH_RATE_PER_SECOND=3,
                     RUNTIME_KHALA_RUN_EVENTS_MAX_PAYLOAD_BYTES=64).start()
        try:
            run = rt.new_run()
            st, _, b = rt.append(run["id"], "big", {"x": "y" * 100})
            self.assertEqual((st, b["error"], b["reason_code"]), (413, "payload_too_large",
                                                                  "khala_frame_payload_too_large"))
            self.assertEqual(b["max_payload_bytes"], 64)
            # 3 publishes a second, the window starting at a topic's first:
            # what publishes nothing (a replay, a 409) counts for nothing,
            # and a replay is answered 200 even over the rate. Done again
            # on a new run if the steps did not fit in one window.
            for _ in range(5):
                rid = rt.new_run()["id"]
                t0 = time.monotonic()
                got = [rt.append(rid, "tick", {}, key="k1"), rt.append(rid, "tick", {}, key="k1"),
                       rt.append(rid, "tick", {}, expected=0), rt.append(rid, "tick", {}, key="k2"),
                       rt.append(rid, "tick", {}, key="k3"), rt.append(rid, "tick", {}, key="k4"),
                       rt.append(rid, "tick", {}, key="k1", headers={"Prefer": "return=minimal"}),
                       rt.append(rid, "tick", {}, key="k2"), rt.append(rid, "tick", {})]
                if time.monotonic() - t0 < 0.8:
                    break
            self.assertEqual([g[0] for g in got], [200, 200, 409, 200, 200, 429, 200, 200, 429])
            for st, hdrs, b in (got[5], got[8]):
                self.assertEqual((b["error"], b["reason_code"], b["topic"], b["max_publish_per_second"], hdrs["retry-after"]),
                                 ("rate_limited", "khala_publish_rate_limited", "run:%s:events" % rid, 3, "1"))
                self.assertTrue(0 <= b["retry_after_ms"] <= 1000, b)
            self.assertEqual((got[6][2]["run"]["last_seq"], len(got[7][2]["run"]["events"])), (4, 4))
            self.assertEqual([e["idempotency_key"] for e in got[7][2]["run"]["events"]], [None, "k1", "k2", "k3"])
            # Nothing refused was appended.
            _, _, b = rt.call("GET", "/internal/v1/runs/" + rid)
            self.assertEqual(len(b["run"]["events"]), 4)
        finally:
            rt.stop()

    def test_publish_rate_under_concurrent_keyed_appends(self):
        """Keyed appends from 24 clients at once over a rate of 5 a second
        (so the appender groups mix counted and over-the-rate ones), then
        each key again: nothing but 200 and 429; every key appended once
        answers its retry 200 from the log, over the rate or not."""
        rt = Runtime(RUNTIME_KHALA_RUN_EVENTS_PUBLISH_RATE_PER_SECOND=5).start()
        self.addCleanup(rt.stop)
        rid = rt.new_run()["id"]
        first, again = {}, {}

        def client(n, out):
            for i in range(4):
                key = "c%d-%d" % (n, i)
                out[key] = rt.append(rid, "tick", {"n": n}, key=key)[0]
        for out in (first, again):
            ts = [threading.Thread(target=client, args=(n, out)) for n in range(24)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
        self.assertEqual(set(first.values()) | set(again.values()), {200, 429}, (first, again))
        _, _, b = rt.call("GET", "/internal/v1/runs/" + rid)
        appended = [e["idempotency_key"] for e in b["run"]["events"][1:]]
        self.assertEqual(len(appended), len(set(appended)))
        # A key is in the log once if either of its appends got 200 (the
        # second as a replay, or as a first append once the rate allowed).
        self.assertEqual(set(appended), {k for k in first if 200 in (first[k], again[k])})
        self.assertGreater(list(first.values()).count(429), 0)
        for k in appended:
            self.assertEqual(again[k], 200, k)
        st, _, b = rt.call("GET", "/healthz")
        self.assertEqual(st, 200)

    def test_token_and_origin_switches(self):
        """RUNTIME_SYNC_TOKEN_REQUIRE_JTI=false takes a token without jti;
        RUNTIME_KHALA_ENFORCE_ORIGIN=false lets any Origin in; a custom
        RUNTIME_KHALA_ALLOWED_ORIGINS replaces the default list."""
        rt = Runtime(RUNTIME_SYNC_TOKEN_REQUIRE_JTI="false", RUNTIME_KHALA_ENFORCE_ORIGIN="false").start()
        self.addCleanup(rt.stop)
        topic = "run:%s:events" % rt.new_run()["id"]
        st, _, b = rt.poll(topic, token=mint(claims(jti=None)), headers={"Origin": "https://evil.example"})
        self.assertEqual((st, [m["sequence"] for m in b["messages"]]), (200, [1]))
        custom = Runtime(RUNTIME_KHALA_ALLOWED_ORIGINS="https://app.example").start()
        self.addCleanup(custom.stop)
        topic = "run:%s:events" % custom.new_run()["id"]
        for origin, want in (("https://app.example", 200), ("https://APP.example/", 200),
                             ("https://openagents.com", 403), ("https://evil.example", 403)):
            time.sleep(0.3)  # the poll interval guard
            st, _, b = custom.poll(topic, headers={"Origin": origin})
            self.assertEqual(st, want, (origin, b))
            if want == 403:
                self.assertEqual((b["error"], b["reason_code"]), ("forbidden_origin", "origin_not_allowed"))

    def test_live_message_past_a_notification(self):
        """A message too large for a NOTIFY payload (8000 bytes) is sent
        without it, and the subscriber reads it from the log."""
        rid, topic = self.topic_with(1)
        ws = WsClient(self.rt, topic, after=1, want=2)
        ws.wait_ready()
        for blob in ("x" * 20000, "y"):
            st, _, _ = self.rt.append(rid, "live", {"blob": blob}, headers={"Prefer": "return=minimal"})
            self.assertEqual(st, 200)
        ws.finish()
        msgs = [f["message"] for f in ws.frames("message")]
        self.assertEqual([(m["sequence"], len(m["payload"]["blob"])) for m in msgs], [(2, 20000), (3, 1)])

    def test_worker_topic_publish_limits(self):
        """Worker writes publish on worker:{id}:lifecycle and take its
        limits: the rate (a refused write counts for nothing) and the
        payload size of the message they would publish."""
        rt = Runtime(RUNTIME_KHALA_WORKER_LIFECYCLE_PUBLISH_RATE_PER_SECOND=2,
                     RUNTIME_KHALA_WORKER_LIFECYCLE_MAX_PAYLOAD_BYTES=160).start()
        self.addCleanup(rt.stop)
        for _ in range(5):
            wid = "lim-" + uuid.uuid4().hex
            t0 = time.monotonic()
            got = [rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7}),
                   rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid, {"owner_user_id": 8}),
                   rt.call("POST", "/internal/v1/workers/%s/status" % wid, {"owner_user_id": 7, "status": "bogus"}),
                   rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid, {"owner_user_id": 7}),
                   rt.call("POST", "/internal/v1/workers/%s/heartbeat" % wid, {"owner_user_id": 7})]
            if time.monotonic() - t0 < 0.8:
                break
        self.assertEqual([g[0] for g in got], [201, 403, 400, 200, 429])
        st, hdrs, b = got[4]
        self.assertEqual((b["error"], b["reason_code"], b["topic"], b["topic_class"], b["max_publish_per_second"],
                          hdrs["retry-after"]),
                         ("rate_limited", "khala_publish_rate_limited", "worker:%s:lifecycle" % wid,
                          "worker_lifecycle", 2, "1"))
        # The message of a worker with a 70-byte id passes 160 bytes.
        st, _, b = rt.call("POST", "/internal/v1/workers", {"worker_id": "w" * 70, "owner_user_id": 7})
        self.assertEqual((st, b["error"], b["reason_code"], b["max_payload_bytes"]),
                         (413, "payload_too_large", "khala_frame_payload_too_large", 160))
        st, _, b = rt.call("GET", "/internal/v1/workers/%s?owner_user_id=7" % ("w" * 70))
        self.assertEqual(st, 404)

    def test_poll_interval_guard(self):
        rt = Runtime(RUNTIME_KHALA_POLL_MIN_INTERVAL_MS=400).start()
        try:
            run = rt.new_run()
            topic = "run:%s:events" % run["id"]
            tok = mint(claims())
            self.assertEqual(rt.poll(topic, token=tok)[0], 200)
            st, _, b = rt.poll(topic, token=tok)
            self.assertEqual((st, b["error"], b["reason_code"]), (429, "rate_limited", "poll_interval_guard"))
            self.assertTrue(0 < b["retry_after_ms"] <= 400)
            # Another principal is another poller.
            self.assertEqual(rt.poll(topic, token=mint(claims(sub="user:8", oa_device_id="d8")))[0], 200)
            time.sleep(0.45)
            self.assertEqual(rt.poll(topic, token=tok)[0], 200)
        finally:
            rt.stop()


class WriteModes(unittest.TestCase):
    def test_frozen_modes_refuse_writes(self):
        run = None
        with Runtime() as active:
            run = active.new_run()
            active.call("POST", "/internal/v1/workers", {"worker_id": "wm:%s" % run["id"], "owner_user_id": 7})
        for mode in ("shadow_only", "read_only"):
            with Runtime(RUNTIME_AUTHORITY_WRITE_MODE=mode) as rt:
                _, _, h = rt.call("GET", "/healthz")
                self.assertEqual((h["authority_write_mode"], h["authority_writer_active"]), (mode, False))
                wid = "wm:%s" % run["id"]
                for path, body in (("/internal/v1/runs", {}),
                                   ("/internal/v1/runs/%s/events" % run["id"], {"event_type": "x"}),
                                   ("/internal/v1/workers", {"owner_user_id": 7}),
                                   ("/internal/v1/workers/%s/heartbeat" % wid, {"owner_user_id": 7}),
                                   ("/internal/v1/workers/%s/status" % wid, {"owner_user_id": 7, "status": "stopping"})):
                    st, _, b = rt.call("POST", path, body)
                    self.assertEqual((st, b["error"]), (503, "write_path_frozen"), (mode, path))
                st, _, b = rt.call("GET", "/internal/v1/runs/" + run["id"])
                self.assertEqual((st, len(b["run"]["events"])), (200, 1))
        with Runtime(RUNTIME_AUTHORITY_WRITE_MODE="active") as rt:
            _, _, h = rt.call("GET", "/healthz")
            self.assertEqual(h["authority_write_mode"], "rust_active")
        port = free_port()
        r = subprocess.run([os.path.join(BINDIR, "runtime")], env=dict(os.environ, **runtime_env(
            port, RUNTIME_AUTHORITY_WRITE_MODE="sometimes")), capture_output=True, text=True, timeout=20)
        self.assertEqual(r.returncode, 2)
        self.assertIn("RUNTIME_AUTHORITY_WRITE_MODE", r.stderr)


class Concurrency(unittest.TestCase):
    def test_twenty_appenders_and_a_gap_free_poller(self):
        with Runtime(DB_MAX_CONNECTIONS=24) as rt:
            run = rt.new_run()
            rid, topic = run["id"], "run:%s:events" % run["id"]
            per, stop, problems, seen = 15, threading.Event(), [], []
            tok = mint(claims())

            def appender(n):
                for i in range(per):
                    st, _, b = rt.append(rid, "w%d" % n, {"i": i}, key="a%d-%d" % (n, i),
                                         headers={"Prefer": "return=minimal"})
                    if st != 200:
                        problems.append((n, i, st, b))

            def poller():
                cursor = 0
                while True:
                    # Read before the poll: an empty answer to a poll that
                    # began before the last append committed ends nothing.
                    done = stop.is_set()
                    st, _, b = rt.poll(topic, cursor, limit=200, token=tok)
                    if st != 200:
                        problems.append(("poll", st, b))
                        return
                    seqs = [m["sequence"] for m in b["messages"]]
                    # Every answer continues exactly where the cursor was.
                    if seqs != list(range(cursor + 1, cursor + 1 + len(seqs))):
                        problems.append(("gap", cursor, seqs))
                        return
                    if seqs:
                        cursor = seqs[-1]
                        seen.extend(seqs)
                    elif done:
                        return

            ws = WsClient(rt, topic, want=20 * per + 1, timeout_ms=60000)
            ws.wait_ready()
            p = threading.Thread(target=poller)
            p.start()
            ts = [threading.Thread(target=appender, args=(n,)) for n in range(20)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            stop.set()
            p.join(30)
            self.assertEqual(problems, [])
            self.assertEqual(seen, list(range(1, 2 + 20 * per)))
            ws.finish(60)
            self.assertEqual([f["message"]["sequence"] for f in ws.frames("message")], list(range(1, 2 + 20 * per)))
            _, _, b = rt.call("GET", "/internal/v1/runs/" + rid)
            self.assertEqual([e["seq"] for e in b["run"]["events"]], list(range(1, 2 + 20 * per)))
            # The projections the group appends wrote beside the log agree with it.
            last = b["run"]["events"][-1]
            _, _, sm = rt.call("GET", "/internal/v1/projectors/run-summary/" + rid)
            self.assertEqual((sm["summary"]["last_seq"], sm["summary"]["event_count"], sm["summary"]["status"]),
                             (1 + 20 * per, 1 + 20 * per, "running"))
            _, _, cp = rt.call("GET", "/internal/v1/projectors/checkpoints/" + rid)
            self.assertEqual((cp["checkpoint"]["last_seq"], cp["checkpoint"]["last_event_type"]),
                             (last["seq"], last["event_type"]))
            st, _, _ = rt.call("GET", "/internal/v1/projectors/drift?topic=run:%s:events" % rid)
            self.assertEqual(st, 404)


    def test_concurrent_appends_keep_their_own_outcomes(self):
        # Concurrent appends are committed in groups (rtappend): a 409, a
        # 400, a 404 or a replay in a group answers that append alone, and
        # every other one is appended exactly once, in a gap-free log.
        self.concurrent_outcomes(all_minimal=False)

    def test_concurrent_minimal_appends_keep_their_own_outcomes(self):
        # The same, every append answered without events: all of them go
        # through the loop's asynchronous connections (rtpipe), whose groups
        # mix common appends (one set-based statement) with the rest.
        self.concurrent_outcomes(all_minimal=True)

    def concurrent_outcomes(self, all_minimal):
        minimal = {"Prefer": "return=minimal"}
        with Runtime() as rt:
            runs = [rt.new_run()["id"] for _ in range(3)]
            missing = str(uuid.uuid4())
            got, lock = [], threading.Lock()

            def client(n):
                rid = runs[n % 3]
                for i in range(12):
                    key = "g%d-%d" % (n, i)
                    kind = i % 6
                    h = minimal if all_minimal else None
                    if kind == 1:
                        st, _, b = rt.append(rid, "step", {"i": i}, key=key, expected=0, headers=h)
                    elif kind == 2:
                        st, _, b = rt.append(rid, "run.finished", {"status": "bogus"}, key=key, headers=h)
                    elif kind == 3:
                        key = "g%d-%d" % (n, i - 3)
                        st, _, b = rt.append(rid, "step", {"i": i - 3}, key=key,
                                             headers={"Prefer": "return=minimal"})
                    elif kind == 4:
                        st, _, b = rt.append(missing, "step", {"i": i}, key=key, headers=h)
                    else:
                        st, _, b = rt.append(rid, "step", {"i": i}, key=key, headers={"Prefer": "return=minimal"})
                    with lock:
                        got.append((kind, rid, key, st, b.get("error")))

            ts = [threading.Thread(target=client, args=(n,)) for n in range(12)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            want = {0: (200, None), 1: (409, "conflict"), 2: (400, "invalid_request"), 3: (200, None),
                    4: (404, "not_found"), 5: (200, None)}
            self.assertEqual([g for g in got if (g[3], g[4]) != want[g[0]]], [])
            for rid in runs:
                _, _, b = rt.call("GET", "/internal/v1/runs/" + rid)
                ev = b["run"]["events"]
                self.assertEqual([e["seq"] for e in ev], list(range(1, len(ev) + 1)))
                keys = sorted(e["idempotency_key"] for e in ev[1:])
                self.assertEqual(keys, sorted(g[2] for g in got if g[1] == rid and g[0] in (0, 5)))
                self.assertEqual(b["run"]["status"], "running")


    def test_append_connections_broken_under_load(self):
        # The loop's append connections (rtpipe) killed while 8 clients
        # append to 4 runs: an append in flight answers 200 (committed) or
        # 503 (outcome unknown), what waits goes to a connection still up
        # (or answers 503 when none is), and the pipe reconnects. No 200 is
        # lost, no append is doubled, every log stays gap-free.
        name = "rt-broken-%d" % os.getpid()
        url = named_db_url(name)
        minimal = {"Prefer": "return=minimal"}
        with Runtime(DATABASE_URL=url, RUNTIME_APPEND_CONNECTIONS=2) as rt:
            runs = [rt.new_run()["id"] for _ in range(4)]
            got, lock, stop = [], threading.Lock(), threading.Event()

            def client(n):
                i = 0
                while not stop.is_set():
                    key = "b%d-%d" % (n, i)
                    st, _, _ = rt.append(runs[n % 4], "step", {"i": i}, key=key, headers=minimal)
                    with lock:
                        got.append((runs[n % 4], key, st))
                    i += 1

            ts = [threading.Thread(target=client, args=(n,)) for n in range(8)]
            for t in ts:
                t.start()
            c = db()
            killed = 0
            try:
                for _ in range(3):
                    time.sleep(0.4)
                    cur = c.cursor()
                    cur.execute("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE application_name = %s", (name,))
                    killed += cur.fetchone()[0]
                time.sleep(0.4)
            finally:
                stop.set()
                for t in ts:
                    t.join()
                c.close()
            self.assertGreater(killed, 0)
            self.assertEqual(sorted({g[2] for g in got} - {200, 503}), [])
            ok = [g for g in got if g[2] == 200]
            self.assertGreater(len(ok), 50)
            for rid in runs:
                _, _, b = rt.call("GET", "/internal/v1/runs/" + rid)
                ev = b["run"]["events"]
                self.assertEqual([e["seq"] for e in ev], list(range(1, len(ev) + 1)))
                keys = [e["idempotency_key"] for e in ev[1:]]
                self.assertEqual(len(keys), len(set(keys)))
                self.assertEqual(sorted(g[1] for g in ok if g[0] == rid and g[1] not in keys), [])
            # Reconnected: appends are answered 200 again.
            wait_for(lambda: rt.append(runs[0], "step", {"after": 1}, headers=minimal)[0] == 200, timeout=15,
                     what="an append answered 200 after the connections came back")


class Crash(unittest.TestCase):
    def test_kill9_during_appends_loses_no_acknowledged_append(self):
        # The killed runtime's sessions carry a name of their own, so that
        # the wait below is for them alone (libpq takes the URL's
        # application_name over the runtime's default).
        name = "runtime-kill9-" + uuid.uuid4().hex[:8]
        url = named_db_url(name)
        rt = Runtime(DATABASE_URL=url).start()
        run = rt.new_run()
        acked, lock, stop = [], threading.Lock(), threading.Event()

        def appender(n):
            i = 0
            while not stop.is_set():
                key = "c%d-%d" % (n, i)
                try:
                    st, _, b = rt.append(run["id"], "crash", {"n": n, "i": i}, key=key,
                                         headers={"Prefer": "return=minimal"})
                except (OSError, http_client.HTTPException):  # the kill cut the answer
                    return
                if st == 200:
                    with lock:
                        acked.append(key)
                i += 1

        ts = [threading.Thread(target=appender, args=(n,)) for n in range(6)]
        for t in ts:
            t.start()
        wait_for(lambda: len(acked) > 60, timeout=20, what="appends before the kill")
        rt.kill9()
        stop.set()
        for t in ts:
            t.join(20)
        n_acked = len(acked)
        c = db()
        try:
            cur = c.cursor()

            # A statement the killed runtime had sent still commits; wait
            # for its server sessions to end (each ends once it has read
            # the closed socket's end, after any statement it had been
            # sent) before counting. Each poll is a statement of its own
            # (autocommit, no `with c`): inside one transaction
            # pg_stat_activity is read once and kept, so a first look that
            # saw a session still at work saw it until the timeout (the
            # flake: about one run in fifteen).
            def sessions_left():
                cur.execute("SELECT pid, state, wait_event, left(query, 80) FROM pg_stat_activity "
                            "WHERE application_name = %s", (name,))
                return cur.fetchall()
            left = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (left := sessions_left()):
                time.sleep(0.05)
            self.assertEqual(left, [], "the killed runtime's sessions did not end")
            cur.execute("SELECT array_agg(idempotency_key), max(seq), count(*), "
                        "(SELECT last_seq FROM runtime.runs WHERE id = %s) "
                        "FROM runtime.run_events WHERE run_id = %s", (run["id"], run["id"]))
            keys, top, count, head = cur.fetchone()
            stored = set(keys)
        finally:
            c.close()
        self.assertGreater(n_acked, 60)
        self.assertEqual(set(acked) - stored, set())
        self.assertEqual((top, head), (count, count))
        with Runtime() as again:
            # The log goes on where it stopped; a retried key is not appended twice.
            st, _, b = again.append(run["id"], "crash", key=acked[0], headers={"Prefer": "return=minimal"})
            self.assertEqual((st, b["run"]["last_seq"]), (200, count))
            st, _, b = again.append(run["id"], "after", headers={"Prefer": "return=minimal"})
            self.assertEqual(b["run"]["last_seq"], count + 1)


class Outage(unittest.TestCase):
    def test_database_down_then_back(self):
        """With PostgreSQL gone: /readyz answers 503 not_ready (within its
        checks' 2 s) while /healthz answers, a write answers 503
        unavailable, and a Khala subscriber gets the error frame then the
        close (1011); once PostgreSQL is back, the same runtime writes and
        delivers again."""
        with PgTmp() as pg:
            rt = Runtime(DATABASE_URL=pg.url()).start()
            self.addCleanup(rt.stop)
            rid = rt.new_run()["id"]
            pg.stop()
            # The health checks run every 2 s in the background.
            wait_for(lambda: rt.call("GET", "/readyz")[0] == 503, 10, what="readyz to see PostgreSQL gone")
            st, _, b = rt.call("GET", "/readyz")
            self.assertEqual((st, b["status"], b["database"], b["authority_ready"]),
                             (503, "not_ready", "disconnected", False), b)
            st, _, b = rt.call("GET", "/healthz")
            self.assertEqual((st, b["status"]), (200, "ok"))
            st, _, b = rt.append(rid, "during")
            self.assertEqual((st, b["error"]), (503, "unavailable"), b)
            ws = WsClient(rt, "run:%s:events" % rid)
            ev = ws.finish()
            self.assertEqual([(f["code"], bool(f["message"])) for f in ws.frames("error")], [("unavailable", True)], ev)
            self.assertEqual(ev[-1].get("close"), 1011, ev)
            pg.start()
            wait_for(lambda: rt.call("GET", "/readyz")[0] == 200, 30, what="readyz once PostgreSQL is back")
            wait_for(lambda: rt.append(rid, "after", key="a1")[0] == 200, 30, what="an append once PostgreSQL is back")
            ws = WsClient(rt, "run:%s:events" % rid, after=0, want=2)
            ws.finish()
            self.assertEqual([(f["message"]["sequence"], f["message"]["kind"]) for f in ws.frames("message")],
                             [(1, "run.started"), (2, "after")])


class ListenPing(unittest.TestCase):
    def test_listen_connection_that_stops_answering_is_replaced(self):
        """The LISTEN connection's backend stops (SIGSTOP: its kernel still
        acknowledges, so TCP keepalives see nothing): the next ping is not
        answered, the runtime opens a new LISTEN connection, and a
        subscriber gets a message that another writer (SQL here, not this
        runtime's own append path) committed meanwhile."""
        name = "listen-ping-%d" % os.getpid()
        rt = Runtime(DATABASE_URL=named_db_url(name), RUNTIME_KHALA_LISTEN_PING_MS=400).start()
        self.addCleanup(rt.stop)
        c = db()
        self.addCleanup(c.close)

        def listeners():
            with c.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN %%'",
                            (name,))
                return [r[0] for r in cur.fetchall()]
        wait_for(lambda: len(listeners()) == 1, 10, what="the runtime's LISTEN connection")
        old = listeners()[0]
        rid = rt.new_run()["id"]
        topic = "run:%s:events" % rid
        ws = WsClient(rt, topic, after=1, want=1, timeout_ms=20000)
        ws.wait_ready()
        with c.cursor() as cur:
            wait_for(lambda: cur.execute("SELECT count(*) FROM runtime.khala_listeners WHERE topic = %s", (topic,))
                     or cur.fetchone()[0] == 1, 10, what="the topic's listener row")
        os.kill(old, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(old, signal.SIGCONT))
        with c.cursor() as cur:
            cur.execute("SELECT outcome FROM runtime.append_run_event(%s, 'from.sql', '{\"n\": 1}', NULL, NULL)",
                        (rid,))
            self.assertEqual(cur.fetchone()[0], "appended")
        wait_for(lambda: [p for p in listeners() if p != old], 15, what="a new LISTEN connection")
        ws.finish()
        self.assertEqual([(f["message"]["sequence"], f["message"]["kind"]) for f in ws.frames("message")],
                         [(2, "from.sql")], ws.events)
        self.assertIn("LISTEN connection not answering", rt.log())


FANOUT_JS = r"""
const WebSocket = require('ws');
const [url, n, headers] = [process.argv[1], Number(process.argv[2]), JSON.parse(process.argv[3])];
const subs = []; let ready = 0;
const done = () => { process.stdout.write(JSON.stringify({got: subs.filter(s => s.got).length,
  closes: subs.filter(s => s.close).map(s => s.close)}) + '\n', () => process.exit(0)); };
for (let i = 0; i < n; i++) {
  const s = {ws: new WebSocket(url, {headers}), got: false, close: null}; subs.push(s);
  s.ws.on('message', d => { const f = JSON.parse(d.toString());
    if (f.type === 'hello' && ++ready === n) process.stdout.write(JSON.stringify({ready}) + '\n');
    if (f.type === 'message' && f.message.sequence === 2) { s.got = true;
      if (subs.every(x => x.got || x.close)) done(); } });
  s.ws.on('close', code => { s.close = code; if (subs.every(x => x.got || x.close)) done(); });
  s.ws.on('error', () => {});
}
setTimeout(done, 20000);
"""


class FanOutReads(unittest.TestCase):
    def test_many_subscribers_sent_to_the_log_share_the_handler_queue(self):
        """60 subscribers of one topic on a runtime whose handler queue
        holds 8: their first reads and, after a message too large for its
        NOTIFY (so every subscriber reads it from the log), their second
        all go through, none is closed 1013, and HTTP requests meanwhile
        are answered, not 503."""
        rt = Runtime(RUNTIME_WORKER_THREADS=2, DB_MAX_CONNECTIONS=2, RUNTIME_HANDLER_QUEUE_MAX=8).start()
        self.addCleanup(rt.stop)
        rid = rt.new_run()["id"]
        topic = "run:%s:events" % rid
        url = "ws://127.0.0.1:%d/internal/v1/khala/topics/%s/ws?after_seq=1" % (rt.port, topic)
        p = subprocess.Popen([need("node"), "-e", FANOUT_JS, url, "60",
                              json.dumps({"Authorization": "Bearer " + mint(claims())})],
                             cwd=HERE, stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (p.kill(), p.wait(), p.stdout.close()))
        self.assertEqual(json.loads(p.stdout.readline()), {"ready": 60})
        c = db()
        self.addCleanup(c.close)
        with c.cursor() as cur:
            cur.execute("SELECT outcome FROM runtime.append_run_event(%s, 'big', %s, NULL, NULL)",
                        (rid, json.dumps({"blob": "x" * 20000})))
            self.assertEqual(cur.fetchone()[0], "appended")
        statuses = [rt.call("GET", "/internal/v1/runs/" + rid)[0] for _ in range(20)]
        got = json.loads(p.stdout.readline())
        self.assertEqual(got, {"got": 60, "closes": []})
        self.assertEqual(set(statuses), {200})


class DatabaseFaults(unittest.TestCase):
    """A runtime on a database of its own on the shared server, whose
    tables these tests lock, rename and fit with triggers without touching
    anyone else's."""

    @classmethod
    def setUpClass(cls):
        cls.dbname = "rt_faults_%d" % os.getpid()
        cls.url = private_db_fresh(cls.dbname)
        cls.rt = Runtime(DATABASE_URL=cls.url).start()
        # Migrations run on start: ready once they are applied.
        wait_for(lambda: cls.rt.call("GET", "/readyz")[0] == 200, 60, what="the runtime's migrations")

    @classmethod
    def tearDownClass(cls):
        cls.rt.stop()
        private_db_drop(cls.dbname)

    def conn(self):
        c = psycopg2.connect(self.url)
        c.autocommit = True
        self.addCleanup(c.close)
        return c

    def test_database_failure_is_logged_once_escaped(self):
        """A failed database call answers 503 without its reason and logs
        the reason once, as JSON fields, with the client's value escaped (a
        failed projection read logged nothing at all)."""
        topic = 'run:"q"\\\t\u00e9%s:events' % uuid.uuid4().hex
        with self.conn().cursor() as cur:
            cur.execute("ALTER TABLE runtime.projection_drift RENAME TO projection_drift_away")
            try:
                st, _, b = self.rt.call("GET", "/internal/v1/projectors/drift?topic=" + urllib.parse.quote(topic))
            finally:
                cur.execute("ALTER TABLE runtime.projection_drift_away RENAME TO projection_drift")
        self.assertEqual((st, b["error"]), (503, "unavailable"), b)
        self.assertNotIn("projection_drift", json.dumps(b))
        logged = [x for x in self.rt.log_lines() if x.get("msg") == "database call failed" and x.get("id") == topic]
        self.assertEqual(len(logged), 1, self.rt.log()[-3000:])
        self.assertTrue(logged[0]["error"].startswith("42P01: "), logged[0])
        self.assertEqual(logged[0]["level"], "warn")


    def lock_run(self, rid):
        """Holds run rid's row lock (until the returned connection rolls
        back): every append to it waits."""
        c = psycopg2.connect(self.url)
        self.addCleanup(c.close)
        with c.cursor() as cur:
            cur.execute("SELECT 1 FROM runtime.runs WHERE id = %s FOR UPDATE", (rid,))
        return c

    def wait_lock_waiters(self, n):
        def waiting():
            with self.conn().cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                            "wait_event_type = 'Lock'")
                return cur.fetchone()[0] >= n
        wait_for(waiting, 10, what="%d appends waiting for the run's lock" % n)

    def test_stop_with_a_minimal_append_in_flight(self):
        """A stop that drops an append still waiting for its commit (the
        pipe's, answered without events) exits cleanly: the dropped job was
        freed while its request still named it, and the request's end wrote
        to it (AddressSanitizer: heap-use-after-free at exit)."""
        rt = Runtime(DATABASE_URL=self.url).start()
        self.addCleanup(rt.stop)
        rid = rt.new_run()["id"]
        minimal = {"Prefer": "return=minimal"}
        self.assertEqual(rt.append(rid, "before", headers=minimal)[0], 200)
        lock = self.lock_run(rid)
        self.addCleanup(lock.rollback)
        t = threading.Thread(target=lambda: self.swallow(rt.append, rid, "in-flight", headers=minimal), daemon=True)
        t.start()
        self.wait_lock_waiters(1)
        self.assertEqual(rt.stop(timeout=30), 0, rt.log()[-4000:])
        self.assertNotIn("AddressSanitizer", rt.log())
        self.assertNotIn("runtime error", rt.log())
        t.join(15)

    def test_websocket_owner_check_waits_a_bounded_time(self):
        """The owner check of a worker topic's handshake runs on the loop
        thread: with its read stuck behind a lock it is refused 503 with the
        JSON error body within a second, and the loop serves meanwhile (the
        read waited as long as the lock, every other connection with it)."""
        wid = "faults:%s" % uuid.uuid4().hex[:8]
        st, _, b = self.rt.call("POST", "/internal/v1/workers", {"worker_id": wid, "owner_user_id": 7})
        self.assertEqual(st, 201, b)
        lock = psycopg2.connect(self.url)
        self.addCleanup(lock.close)
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE runtime.workers IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        ws = WsClient(self.rt, "worker:%s:lifecycle" % wid)
        try:
            self.wait_lock_waiters(1)
            t1 = time.monotonic()
            st, _, _ = http("GET", self.rt.base + "/healthz", timeout=5)
            self.assertEqual(st, 200)
            self.assertLess(time.monotonic() - t1, 1.0)
            ev = ws.finish(timeout=20)
            took = time.monotonic() - t0
        finally:
            lock.rollback()
        self.assertEqual(len(ev), 1, ev)
        self.assertEqual((ev[0]["refused"], ev[0]["body"]["error"]), (503, "unavailable"), ev)
        self.assertTrue(ev[0]["body"]["request_id"])
        self.assertLess(took, 5, ev)
        # With the lock gone the same handshake is accepted.
        ws = WsClient(self.rt, "worker:%s:lifecycle" % wid, timeout_ms=2000)
        ev = ws.wait_ready()
        self.assertEqual(ws.frames("hello")[0]["topic"], "worker:%s:lifecycle" % wid, ev)
        ws.proc.kill()
        ws.proc.wait()

    def test_listener_row_written_again_after_a_failure(self):
        """A subscriber whose topic's listener row could not be written (the
        INSERT failed) gets live messages once the row can be written: it
        is tried again with back-off while the topic has subscribers (the
        topic was marked listed with no row, so no append NOTIFYed it)."""
        rid = self.rt.new_run()["id"]
        topic = "run:%s:events" % rid
        c = self.conn()
        with c.cursor() as cur:
            cur.execute("CREATE FUNCTION public.refuse_listener() RETURNS trigger LANGUAGE plpgsql AS "
                        "$$BEGIN RAISE EXCEPTION 'listener rows refused by the test'; END$$")
            cur.execute("CREATE TRIGGER refuse BEFORE INSERT ON runtime.khala_listeners "
                        "FOR EACH ROW EXECUTE FUNCTION public.refuse_listener()")
        try:
            ws = WsClient(self.rt, topic, want=2)
            ws.wait_ready()
            wait_for(lambda: "listener rows refused by the test" in self.rt.log(), 10,
                     what="the listener row's INSERT to fail")
        finally:
            with c.cursor() as cur:
                cur.execute("DROP TRIGGER refuse ON runtime.khala_listeners")
                cur.execute("DROP FUNCTION public.refuse_listener()")

        def listed():
            with c.cursor() as cur:
                cur.execute("SELECT count(*) FROM runtime.khala_listeners WHERE topic = %s", (topic,))
                return cur.fetchone()[0] == 1
        wait_for(listed, 15, what="the listener row to be written again")
        st, _, b = self.rt.append(rid, "live", {"n": 1}, headers={"Prefer": "return=minimal"})
        self.assertEqual(st, 200, b)
        ws.finish()
        self.assertEqual([(f["message"]["sequence"], f["message"]["kind"]) for f in ws.frames("message")],
                         [(1, "run.started"), (2, "live")], ws.events)

    @staticmethod
    def swallow(fn, *args, **kw):
        try:
            fn(*args, **kw)
        except (OSError, http_client.HTTPException):
            pass


class Programs(unittest.TestCase):
    def test_runtime_migrate_reads_database_url_too(self):
        with PgTmp() as pg:
            env = dict(os.environ, DATABASE_URL=pg.url())
            env.pop("DB_URL", None)
            r = subprocess.run([os.path.join(BINDIR, "runtime-migrate")], env=env, capture_output=True, text=True,
                               timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertRegex(r.stdout, r"applied \d+ migrations")
            self.assertEqual(pg.query("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'runtime'"),
                             [(6,)])

    def test_runtime_migrate_twice_on_a_fresh_database(self):
        with PgTmp() as pg:
            env = dict(os.environ, DB_URL=pg.url(), LOG_FORMAT="json")
            env.pop("DATABASE_URL", None)
            prog = os.path.join(BINDIR, "runtime-migrate")
            first = subprocess.run([prog], env=env, capture_output=True, text=True, timeout=60)
            self.assertEqual(first.returncode, 0, first.stderr)
            self.assertRegex(first.stdout, r"applied \d+ migrations")
            q = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'runtime' ORDER BY 1"
            tables = pg.query(q)
            second = subprocess.run([prog], env=env, capture_output=True, text=True, timeout=60)
            self.assertEqual(second.returncode, 0, second.stderr)
            self.assertEqual(second.stdout.strip(), "up to date")
            self.assertEqual(pg.query(q), tables)
            self.assertEqual([t[0] for t in tables], ["khala_listeners", "projection_drift", "run_events", "runs",
                                                      "worker_events", "workers"])

    def test_runtime_smoke_exit_codes(self):
        prog = os.path.join(BINDIR, "runtime-smoke")
        with Runtime() as rt:
            r = subprocess.run([prog], env=dict(os.environ, SMOKE_BASE_URL=rt.base), capture_output=True, text=True,
                               timeout=60)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            for step in ("healthz", "readyz", "create run", "append run.started", "append event", "read back",
                         "receipt"):
                self.assertIn("ok   " + step, r.stdout)
        r = subprocess.run([prog], env=dict(os.environ, SMOKE_BASE_URL="http://127.0.0.1:%d" % free_port()),
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("FAIL healthz", r.stdout)


if __name__ == "__main__":
    unittest.main()
