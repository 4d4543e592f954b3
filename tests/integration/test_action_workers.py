"""Integration tests of bin/action-workers (SPEC 4, issue 5) against real
PostgreSQL (database ae_test_aw) and Redis (db 2), with local peers: a
Telegram-compatible recorder, webhook recorders and an MCP server built with
the official SDK (tests/integration/peers)."""
import hashlib
import hmac
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import unittest
import urllib.request
import uuid

import psycopg2.errors

import awharness as H
import tlspki
from httppeers import Peer, Resp, telegram_429
from pgtmp import PgTmp
from tools import need

PEERS = os.path.join(os.path.dirname(__file__), "peers")


class Base(unittest.TestCase):
    # The https variants (TLS = True) serve the peers with a certificate of
    # a CA made when the tests start (tlspki), which the workers trust
    # through CA_BUNDLE. Those deliveries go through libcurl.
    TLS = False
    # HTTP_CLIENT for the workers: None is the default (native: REST over
    # http and https through h1.c); "curl" sends everything through libcurl.
    CLIENT = None

    @classmethod
    def setUpClass(cls):
        H.prepare_db()
        cls.conn = H.db()
        cls.r = H.rds()
        cls.pki = tlspki.get() if cls.TLS else None
        tls = cls.pki.server_context("good") if cls.TLS else None
        cls.hook = Peer("webhook").start(H.free_port(), tls=tls)
        cls.tg = Peer("telegram").start(H.free_port(), tls=tls)

    @classmethod
    def tearDownClass(cls):
        cls.hook.stop()
        cls.tg.stop()
        cls.conn.close()

    def setUp(self):
        self.queue = "awtest:%s:%s" % (self._testMethodName, uuid.uuid4().hex[:6])
        self.hook.clear()
        self.tg.clear()
        self.workers = []

    def tearDown(self):
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(5)
            w.log.close()
        keys = list(self.r.scan_iter(self.queue + "*"))
        if keys:
            self.r.delete(*keys)

    def worker(self, binary=None, **env):
        if self.TLS:
            env.setdefault("CA_BUNDLE", self.pki.ca)
        if self.CLIENT:
            env.setdefault("HTTP_CLIENT", self.CLIENT)
        env = {k: v for k, v in env.items() if v is not None}
        w = H.Worker(self.queue, binary=binary, **env)
        self.workers.append(w)
        return w

    def push(self, job, r=None, queue=None):
        H.ensure_refs(self.conn, job["trigger_id"], [job["event_id"]])
        (r or self.r).lpush(queue or self.queue, json.dumps(job))
        return job

    def url(self, path="/hook"):
        return self.hook.base() + path


class RestTest(Base):
    def test_rest_delivery_headers_body_signature(self):
        secret = "s3cret"
        self.worker(WEBHOOK_SECRET=secret)
        ev = H.make_event(tag1='he said "hi"\n\\', score=91)
        job = self.push(H.make_job("rest", {
            "method": "PUT", "url": self.url("/hook"), "headers": {"X-Custom": "yes"},
            "body_template": '{"agent":"{{agent_id}}","tag":"{{tag1}}","score":{{score}},"trigger":"{{trigger.name}}","missing":"{{nope}}"}',
        }, event=ev, trigger_name="Quality alert"))
        reqs = self.hook.wait(1)
        self.assertEqual(len(reqs), 1)
        req = reqs[0]
        self.assertEqual(req["method"], "PUT")
        self.assertEqual(req["path"], "/hook")
        self.assertEqual(req["headers"]["x-custom"], "yes")
        self.assertEqual(req["headers"]["x-idempotency-key"], job["id"])
        self.assertEqual(req["headers"]["content-type"], "application/json")
        body = json.loads(req["body"])
        self.assertEqual(body, {"agent": "42", "tag": 'he said "hi"\n\\', "score": 91,
                                "trigger": "Quality alert", "missing": ""})
        want = "sha256=" + hmac.new(secret.encode(), req["body"].encode(), hashlib.sha256).hexdigest()
        self.assertEqual(req["headers"]["x-signature"], want)
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        self.assertEqual([(x["status"], x["retry_count"]) for x in rows], [("success", 0)])
        self.assertEqual(rows[0]["action_type"], "rest")
        self.assertEqual(rows[0]["response_data"]["status"], 200)
        self.assertIsNotNone(rows[0]["duration_ms"])

    def test_path_and_query_as_parsed(self):
        """Issue 9.3: the request target is the path and query from the one
        curl_url() parse in target.c (dot segments resolved, the fragment
        left out), the same on h1 and on libcurl."""
        for client in ("native", "curl"):
            self.hook.clear()
            w = self.worker(HTTP_CLIENT=client)
            job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/a/../pq?x=1&y=%20z#frag")}))
            reqs = self.hook.wait(1)
            self.assertEqual([r["path"] for r in reqs], ["/pq?x=1&y=%20z"], client)
            self.assertEqual(reqs[0]["headers"]["x-idempotency-key"], job["id"])
            w.stop()

    def test_5xx_retried_then_dead_lettered(self):
        self.worker(RETRY_BASE_MS=150, RETRY_MAX_ATTEMPTS=3)
        self.hook.default = Resp(503, {"error": "down"})
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/down")}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 3, timeout=20)
        self.assertEqual([(x["status"], x["retry_count"]) for x in rows],
                         [("retrying", 0), ("retrying", 1), ("dead", 2)])
        self.assertIn("HTTP 503", rows[2]["error_message"])
        reqs = self.hook.requests("/down")
        self.assertEqual(len(reqs), 3)
        # Backoff with jitter: the second gap is at least the first's floor.
        self.assertGreaterEqual(reqs[1]["t"] - reqs[0]["t"], 0.07)
        self.assertGreaterEqual(reqs[2]["t"] - reqs[1]["t"], 0.14)
        self.assertTrue(all(r["headers"]["x-idempotency-key"] == job["id"] for r in reqs))
        time.sleep(0.3)
        dlq = self.r.lrange(self.queue + "_dlq", 0, -1)
        self.assertEqual(len(dlq), 1)
        dead = json.loads(dlq[0])
        self.assertEqual(dead["id"], job["id"])
        self.assertEqual(dead["attempt"], 3)
        self.assertIn("503", dead["last_error"])
        self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)
        self.assertEqual(self.r.zcard(self.queue + "_delayed"), 0)

    def test_response_body_not_utf8_is_recorded(self):
        # A peer's body goes into response_data (jsonb): bytes that are not
        # UTF-8 must not make PostgreSQL refuse the batch, which would hold
        # every later result too.
        self.worker()
        self.hook.script("/bin", [Resp(200, b"ok \xff\xfe \xc3( \x01 \xe2\x82")])
        bad = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/bin")}))
        rows = H.wait_results(self.conn, bad["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "success")
        self.assertEqual(rows[0]["response_data"], {"status": 200, "body": "ok \ufffd\ufffd \ufffd( \x01 \ufffd"})
        # A long plain body is kept to its first 4096 bytes, escaped.
        self.hook.script("/after", [Resp(201, 'say "hi"\\\n' + "x" * 5000)])
        good = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/after")}))
        rows = H.wait_results(self.conn, good["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "success")
        self.assertEqual(rows[0]["response_data"], {"status": 201, "body": ('say "hi"\\\n' + "x" * 5000)[:4096]})

    def test_4xx_is_final(self):
        self.worker()
        self.hook.default = Resp(404, {"error": "no such hook"})
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/gone")}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) >= 1)
        time.sleep(1.0)
        rows = H.results(self.conn, job["id"])
        self.assertEqual([(x["status"], x["retry_count"]) for x in rows], [("failed", 0)])
        self.assertEqual(len(self.hook.requests("/gone")), 1)
        self.assertEqual(self.r.llen(self.queue + "_dlq"), 0)
        self.assertEqual(self.r.zcard(self.queue + "_delayed"), 0)
        self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)

    def test_repeated_attempt_updates_its_row(self):
        # A job delivered again with the same attempt number (as after a
        # crash between its row and its ack) meets its own row: the batch's
        # COPY fails on the unique key and is sent again as the upsert, so
        # the row takes the latest outcome and the job is still recorded.
        self.worker()
        self.hook.script("/again", [Resp(200, {}), Resp(404, {"error": "gone"})])
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/again")}))
        H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1 and rs[0]["status"] == "success")
        other = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/hook")}))
        self.push(job)
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1 and rs[0]["status"] == "failed")
        self.assertEqual([(x["status"], x["retry_count"]) for x in rows], [("failed", 0)])
        # The job delivered alongside in the same batch got its row too.
        self.assertEqual([x["status"] for x in H.wait_results(self.conn, other["id"], lambda rs: len(rs) == 1)],
                         ["success"])
        deadline = time.time() + 10
        while time.time() < deadline and self.r.zcard(self.queue + "_inflight"):
            time.sleep(0.05)
        self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)
        self.assertEqual(self.r.llen(self.queue), 0)
        self.assertEqual(len(self.hook.requests("/again")), 2)

    def test_placeholders_outside_strings_are_json_values(self):
        # Issue 10, item 5: {{tag1}} outside quotes used to be pasted raw, so
        # a string field could add members ("admin":true) or break the body.
        self.worker()
        ev = H.make_event(tag1='x","admin":true,"y":"', score=91)
        job = self.push(H.make_job("rest", {
            "method": "POST", "url": self.url("/typed"),
            "body_template": '{"agent":{{agent_id}},"score":{{score}},"tag":{{tag1}},"none":{{nope}},"in":"<{{tag1}}>"}',
        }, event=ev))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "success", rows)
        body = json.loads(self.hook.requests("/typed")[0]["body"])
        self.assertEqual(body, {"agent": 42, "score": 91, "tag": 'x","admin":true,"y":"', "none": "",
                                "in": '<x","admin":true,"y":">'})
        # A template that is not JSON itself: nothing is sent, a final failure.
        bad = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/bad"),
                                            "body_template": '{"agent": {{agent_id}}, oops}'}))
        rows = H.wait_results(self.conn, bad["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "failed")
        self.assertRegex(rows[0]["error_message"], r"body_template does not render to JSON \(at byte \d+\)")
        # Another Content-Type: the body is text, values as they are.
        txt = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/text"),
                                            "headers": {"Content-Type": "text/plain"},
                                            "body_template": 'tag {{tag1}} score {{score}}'}, event=ev))
        rows = H.wait_results(self.conn, txt["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "success", rows)
        self.assertEqual(self.hook.requests("/text")[0]["body"], 'tag x","admin":true,"y":" score 91')
        # A JSON Content-Type in any case, or a +json type, is JSON too.
        for path, ctype in (("/upper", "application/JSON; charset=utf-8"), ("/plus", "application/vnd.x+json")):
            job = self.push(H.make_job("rest", {"method": "POST", "url": self.url(path), "headers": {"Content-Type": ctype},
                                                "body_template": '{"tag":{{tag1}}}'}, event=ev))
            rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
            self.assertEqual(rows[0]["status"], "success", rows)
            self.assertEqual(json.loads(self.hook.requests(path)[0]["body"]), {"tag": 'x","admin":true,"y":"'})
        self.assertEqual(self.hook.requests("/bad"), [])

    def test_429_and_408_are_retried(self):
        self.worker(RETRY_BASE_MS=100)
        self.hook.script("/busy", [Resp(429, {}, headers={"Retry-After": "1"}), Resp(408, {})])
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/busy")}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 3, timeout=15)
        self.assertEqual([x["status"] for x in rows], ["retrying", "retrying", "success"])
        reqs = self.hook.requests("/busy")
        self.assertGreaterEqual(reqs[1]["t"] - reqs[0]["t"], 0.9)  # Retry-After honoured

    def test_timeout(self):
        self.worker(RETRY_MAX_ATTEMPTS=1)
        self.hook.script("/slow", [Resp(200, {}, delay=2.0)])
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/slow"), "timeout_ms": 300}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=10)
        self.assertEqual(rows[0]["status"], "dead")
        self.assertIn("timeout", rows[0]["error_message"])
        self.assertLess(rows[0]["duration_ms"], 1500)

    def test_private_targets_refused(self):
        self.worker()
        port = self.hook.httpd.server_address[1]
        jobs = [self.push(H.make_job("rest", {"method": "POST", "url": u})) for u in (
            "http://127.0.0.2:%d/x" % port,      # loopback, not in ALLOWED_TARGETS
            "http://127.1.2.3:%d/x" % port,      # loopback, another address
            "http://169.254.169.254/latest/meta-data",  # link-local (cloud metadata)
            "http://10.1.2.3/x",                 # private
            "http://[::1]:%d/x" % port,          # v6 loopback
            "ftp://127.0.0.1/x",                 # not http
        )]
        for job in jobs:
            rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
            self.assertEqual(len(rows), 1, job["config"]["url"])
            self.assertEqual(rows[0]["status"], "failed")
            self.assertRegex(rows[0]["error_message"], "refused|not allowed")
        self.assertEqual(self.hook.requests(), [])

    def test_reused_connection_dropped_is_retried(self):
        """A peer that closes a reused keep-alive connection instead of
        answering: the delivery failed before any response byte and must go
        once more on a fresh connection, within the same attempt."""
        import socket
        import threading
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)
        port = lsock.getsockname()[1]
        seen = {"conns": 0, "reqs": 0, "dropped": 0}

        def read_request(c):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    return False
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":", 1)[1])
            while len(body) < n:
                body += c.recv(65536)
            return True

        def serve(c):
            # The first request on a connection is answered (keep-alive);
            # a second one is read and the connection closed unanswered, as
            # a server does when its idle timeout races the next request.
            if read_request(c):
                seen["reqs"] += 1
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")
                if read_request(c):
                    seen["dropped"] += 1
            c.close()

        def accept_loop():
            while True:
                try:
                    c, _ = lsock.accept()
                except OSError:
                    return
                seen["conns"] += 1
                threading.Thread(target=serve, args=(c,), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()
        try:
            # One event loop: connections are pooled per loop, and the second
            # job must meet the first one's idle connection.
            self.worker(WORKER_THREADS=1)
            url = "http://127.0.0.1:%d/hook" % port
            j1 = self.push(H.make_job("rest", {"method": "POST", "url": url}))
            rows = H.wait_results(self.conn, j1["id"], lambda rs: len(rs) == 1)
            self.assertEqual(rows[0]["status"], "success", rows)
            time.sleep(0.1)
            j2 = self.push(H.make_job("rest", {"method": "POST", "url": url}))
            rows = H.wait_results(self.conn, j2["id"], lambda rs: len(rs) == 1)
            self.assertEqual(len(rows), 1, rows)
            self.assertEqual(rows[0]["status"], "success", rows)
            self.assertEqual(rows[0]["retry_count"], 0)
            self.assertEqual(rows[0]["response_data"], {"status": 200, "body": {"ok": True}})
            self.assertEqual(seen["reqs"], 2)
            self.assertEqual(seen["dropped"], 1)
            self.assertEqual(seen["conns"], 2)
        finally:
            lsock.close()

    def test_proxy_variables_are_ignored(self):
        # A proxy would connect to the target by name, not to the address
        # the target check pinned: the workers never use one, whatever the
        # environment says (libcurl reads http_proxy, HTTPS_PROXY, ALL_PROXY).
        proxy = Peer("webhook").start(H.free_port())
        try:
            p = "http://127.0.0.1:%d" % proxy.httpd.server_address[1]
            self.worker(HTTP_CLIENT="curl", http_proxy=p, HTTPS_PROXY=p, https_proxy=p, ALL_PROXY=p, all_proxy=p)
            job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/direct")}))
            rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
            self.assertEqual(rows[0]["status"], "success", rows)
            self.assertEqual(len(self.hook.requests("/direct")), 1)
            self.assertEqual(proxy.requests(), [])
        finally:
            proxy.stop()

    def test_breaker_opens_and_defers(self):
        self.worker(BREAKER_FAILURES=2, BREAKER_COOLDOWN_MS=1500, RETRY_BASE_MS=50, RETRY_MAX_ATTEMPTS=10)
        self.hook.script("/flaky", [Resp(500, {})] * 3)
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/flaky")}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: rs and rs[-1]["status"] == "success", timeout=20)
        self.assertEqual(rows[-1]["status"], "success")
        reqs = self.hook.requests("/flaky")
        self.assertEqual(len(reqs), 4)
        # After two failures the host is open: the third attempt waits for
        # the cool-down instead of following the 50 ms backoff.
        self.assertGreaterEqual(reqs[2]["t"] - reqs[1]["t"], 1.2)


class TelegramTest(Base):
    def tg_path(self):
        return "/bot%s/sendMessage" % H.TOKEN

    def tg_base(self):
        return self.tg.base()

    def test_template_chat_and_parse_mode(self):
        self.worker(TELEGRAM_API_BASE=self.tg_base())
        job = self.push(H.make_job("telegram", {
            "chat_id": 987654, "parse_mode": "HTML",
            "message_template": "<b>{{trigger.name}}</b>: agent {{agent_id}} scored {{score}} ({{tag1}}){{missing}}",
        }, trigger_name="Score watch"))
        reqs = self.tg.wait(1)
        self.assertEqual(len(reqs), 1)
        self.assertEqual(reqs[0]["path"], self.tg_path())
        body = json.loads(reqs[0]["body"])
        self.assertEqual(body, {"chat_id": 987654, "parse_mode": "HTML",
                                "text": "<b>Score watch</b>: agent 42 scored 87 (quality)"})
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "success")
        self.assertIsInstance(rows[0]["response_data"]["message_id"], int)

    def test_default_message(self):
        self.worker(TELEGRAM_API_BASE=self.tg_base(), EXPLORER_TX_URL="https://explorer.test/tx/{tx}")
        self.push(H.make_job("telegram", {"chat_id": "-100200"}, event=H.make_event(tag1="needs_review")))
        reqs = self.tg.wait(1)
        body = json.loads(reqs[0]["body"])
        self.assertEqual(body["chat_id"], -100200)
        self.assertEqual(body["parse_mode"], "Markdown")
        text = body["text"]
        for part in ("New feedback", "#42", "Score: 87", "needs\\_review", "Chain: 1",
                     "[View transaction](https://explorer.test/tx/0xabc123)"):
            self.assertIn(part, text)

    # Issue 10, item 4: values anyone can write on chain, in every parse
    # mode. They must not become markup our bot sends (a link), nor break the
    # template's own (Telegram answers 400, final: the message is lost).
    EVIL = "[Claim your reward](https://evil.example)"
    STRAY = "a_b*c <d> & `e`"

    def sent_texts(self, configs, **event):
        self.worker(TELEGRAM_API_BASE=self.tg_base(), TELEGRAM_CHAT_INTERVAL_MS=0,
                    EXPLORER_TX_URL="https://explorer.test/tx/{tx}")
        ev = H.make_event(tag1=self.EVIL, tag2=self.STRAY, **event)
        jobs = [self.push(H.make_job("telegram", dict(c, chat_id=9000 + i), event=ev, trigger_name="Watch_1"))
                for i, c in enumerate(configs)]
        reqs = self.tg.wait(len(jobs))
        self.assertEqual(len(reqs), len(jobs))
        by_chat = {json.loads(r["body"])["chat_id"]: json.loads(r["body"]) for r in reqs}
        for i, j in enumerate(jobs):
            rows = H.wait_results(self.conn, j["id"], lambda rs: len(rs) == 1)
            self.assertEqual(rows[0]["status"], "success", rows)
        return [by_chat[9000 + i] for i in range(len(jobs))]

    def test_values_escaped_for_each_parse_mode(self):
        tpl = {
            "Markdown": "*{{trigger.name}}*: {{tag1}} / {{tag2}} [tx](https://x.test/{{tag2}})",
            "MarkdownV2": "*{{trigger.name}}*: {{tag1}} / {{tag2}} [tx](https://x.test/{{tag2}}) \\(ok\\)",
            "HTML": "<b>{{trigger.name}}</b>: {{tag1}} / <i>{{tag2}}</i> <a href=\"https://x.test/{{tag2}}\">tx</a>",
            "": "{{trigger.name}}: {{tag1}} / {{tag2}}",
        }
        sent = self.sent_texts([{"parse_mode": m, "message_template": t} for m, t in tpl.items()])
        self.assertEqual([b.get("parse_mode") for b in sent], ["Markdown", "MarkdownV2", "HTML", None])
        self.assertEqual(sent[0]["text"], "*Watch_1*: \\[Claim your reward](https://evil.example) / "
                                          "a\\_b\\*c <d> & \\`e\\` [tx](https://x.test/a_b*c%20<d>%20&%20`e`)")
        self.assertEqual(sent[1]["text"], "*Watch\\_1*: \\[Claim your reward\\]\\(https://evil\\.example\\) / "
                                          "a\\_b\\*c <d\\> & \\`e\\` [tx](https://x.test/a_b*c <d> & `e`) \\(ok\\)")
        self.assertEqual(sent[2]["text"], "<b>Watch_1</b>: [Claim your reward](https://evil.example) / "
                                          "<i>a_b*c &lt;d&gt; &amp; `e`</i> "
                                          "<a href=\"https://x.test/a_b*c &lt;d&gt; &amp; `e`\">tx</a>")
        self.assertEqual(sent[3]["text"], "Watch_1: %s / %s" % (self.EVIL, self.STRAY))

    def test_default_message_in_each_parse_mode(self):
        sent = self.sent_texts([{"parse_mode": m} for m in ("Markdown", "MarkdownV2", "HTML", "")],
                               transaction_hash="0xab)c")
        md, v2, html, plain = (b["text"] for b in sent)
        self.assertIn("*New feedback* for agent #42", md)
        self.assertIn("Tag 1: \\[Claim your reward](https://evil.example)", md)
        self.assertIn("Tag 2: a\\_b\\*c <d> & \\`e\\`", md)
        self.assertIn("[View transaction](https://explorer.test/tx/0xab%29c)", md)
        self.assertIn("*New feedback* for agent \\#42", v2)
        self.assertIn("Tag 1: \\[Claim your reward\\]\\(https://evil\\.example\\)", v2)
        self.assertIn("Tag 2: a\\_b\\*c <d\\> & \\`e\\`", v2)
        self.assertIn("[View transaction](https://explorer.test/tx/0xab\\)c)", v2)
        self.assertIn("<b>New feedback</b> for agent #42", html)
        self.assertIn("Tag 2: a_b*c &lt;d&gt; &amp; `e`", html)
        self.assertIn("<a href=\"https://explorer.test/tx/0xab)c\">View transaction</a>", html)
        self.assertIn("New feedback for agent #42", plain)
        self.assertIn("Tag 1: " + self.EVIL, plain)
        self.assertIn("Transaction: https://explorer.test/tx/0xab)c", plain)
        # An event type nobody knows is a value too, inside the bold title.
        self.tg.clear()
        for w in self.workers:
            w.proc.kill()
        sent = self.sent_texts([{"parse_mode": "Markdown"}], event_type="Odd*Type_")
        self.assertTrue(sent[0]["text"].startswith("\U0001f514 Watch\\_1\n*Odd*\\**Type_* on agent #42"), sent[0]["text"])

    def test_unknown_parse_mode_is_final(self):
        self.worker(TELEGRAM_API_BASE=self.tg_base())
        job = self.push(H.make_job("telegram", {"chat_id": 5, "parse_mode": "markdown", "message_template": "x"}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "failed")
        self.assertIn("parse_mode must be", rows[0]["error_message"])
        self.assertEqual(self.tg.requests(), [])

    def test_429_retry_after_waited_out(self):
        self.worker(TELEGRAM_API_BASE=self.tg_base())
        self.tg.script(self.tg_path(), [telegram_429(2)])
        job = self.push(H.make_job("telegram", {"chat_id": 5, "message_template": "hello"}))
        reqs = self.tg.wait(2, timeout=15)
        self.assertEqual(len(reqs), 2)
        self.assertGreaterEqual(reqs[1]["t"] - reqs[0]["t"], 1.9)
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 2)
        self.assertEqual([x["status"] for x in rows], ["retrying", "success"])
        self.assertIn("429", rows[0]["error_message"])

    def test_per_chat_pacing(self):
        self.worker(TELEGRAM_API_BASE=self.tg_base(), TELEGRAM_CHAT_INTERVAL_MS=1000)
        for i in range(3):
            self.push(H.make_job("telegram", {"chat_id": 77, "message_template": "m%d" % i}))
        self.push(H.make_job("telegram", {"chat_id": 78, "message_template": "other"}))
        reqs = self.tg.wait(4, timeout=15)
        self.assertEqual(len(reqs), 4)
        same = [r["t"] for r in reqs if json.loads(r["body"])["chat_id"] == 77]
        other = [r["t"] for r in reqs if json.loads(r["body"])["chat_id"] == 78]
        self.assertEqual(len(same), 3)
        self.assertGreaterEqual(same[1] - same[0], 0.9)
        self.assertGreaterEqual(same[2] - same[1], 0.9)
        self.assertLess(other[0] - same[0], 0.9)  # another chat is not held back


class McpTest(Base):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        r = subprocess.run([os.path.join(PEERS, "setup.sh")], capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError("peers/setup.sh failed (MCP SDK): " + r.stderr.strip())
        # Two servers: the agents' own (tokens are bound to its origin) and
        # another one that a trigger may name.
        cls.mcp_port, cls.mcp, cls.mcp_log = cls.start_mcp()
        cls.other_port, cls.other, cls.other_log = cls.start_mcp()

    @classmethod
    def start_mcp(cls):
        port = H.free_port()
        log = open("/tmp/aw-test-mcp-%d.log" % port, "w")
        cert = list(cls.pki.pair("good")) if cls.TLS else []
        p = subprocess.Popen([need("node"), os.path.join(PEERS, "mcp-server.mjs"), str(port)] + cert,
                             stdout=log, stderr=subprocess.STDOUT)
        if not H.wait_port(port):
            raise RuntimeError("MCP peer did not start")
        return port, p, log

    @classmethod
    def tearDownClass(cls):
        for p in (cls.mcp, cls.other):
            p.terminate()
            p.wait(5)
        super().tearDownClass()

    def origin(self, port=None):
        return "%s://127.0.0.1:%d" % ("https" if self.TLS else "http", port or self.mcp_port)

    def mcp_url(self, path="/mcp", port=None):
        return self.origin(port) + path

    def _open(self, req):
        ctx = ssl.create_default_context(cafile=self.pki.ca) if self.TLS else None
        return urllib.request.urlopen(req, context=ctx)

    def calls(self, port=None):
        with self._open(self.mcp_url("/_calls", port)) as f:
            return json.load(f)

    def auths(self, port=None):
        """The Authorization header of every request the server received."""
        with self._open(self.mcp_url("/_auth", port)) as f:
            return json.load(f)

    def clear_calls(self):
        for port in (self.mcp_port, self.other_port):
            self._open(urllib.request.Request(self.mcp_url("/_calls", port), method="DELETE")).read()

    def set_token(self, agent, token, origin):
        with self.conn.cursor() as c:
            c.execute("INSERT INTO agent_mcp_tokens (agent_id, token, server_origin) VALUES (%s, %s, %s) "
                      "ON CONFLICT (agent_id) DO UPDATE SET token = EXCLUDED.token, "
                      "server_origin = EXCLUDED.server_origin", (agent, token, origin))

    def mcp_job(self, port, agent, path="/mcp"):
        return self.push(H.make_job("mcp", {
            "server_url": self.mcp_url(path, port), "tool": "notify",
            "arguments_template": {"agent_id": "{{agent_id}}"}}, event=H.make_event(agent_id=agent)))

    def test_tools_call_with_rendered_arguments_and_token(self):
        self.clear_calls()
        self.set_token(4242, "tok-4242", self.origin())
        self.worker()
        job = self.push(H.make_job("mcp", {
            "server_url": self.mcp_url(), "tool": "notify",
            "arguments_template": {"agent_id": "{{agent_id}}", "text": "score {{score}} \"{{tag1}}\""},
        }, event=H.make_event(agent_id=4242, tag1="q\"x")))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "success", rows[0]["error_message"])
        calls = [c for c in self.calls() if c["name"] == "notify"]
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0]["arguments"], {"agent_id": 4242, "text": "score 87 \"q\"x\""})
        self.assertEqual(calls[0]["authorization"], "Bearer tok-4242")
        self.assertIn("notified 4242", json.dumps(rows[0]["response_data"]))

    def test_token_goes_only_to_its_bound_origin(self):
        """Issue 10: any user may write an MCP action for any agent naming any
        server; the agent's token reaches only the server it is bound to."""
        self.clear_calls()
        bound = self.origin()
        self.set_token(4243, "tok-4243", bound)
        self.worker()
        stolen = self.mcp_job(self.other_port, 4243)
        own = self.mcp_job(self.mcp_port, 4243)
        for job in (stolen, own):
            rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
            self.assertEqual(rows[0]["status"], "success", rows[0]["error_message"])
        # The other server got the whole exchange, and no token in any request.
        self.assertEqual(len([c for c in self.calls(self.other_port) if c["name"] == "notify"]), 1)
        other = self.auths(self.other_port)
        self.assertGreaterEqual(len(other), 3)
        self.assertEqual(other, [None] * len(other))
        # The bound server got it in every request.
        mine = self.auths(self.mcp_port)
        self.assertGreaterEqual(len(mine), 3)
        self.assertEqual(mine, ["Bearer tok-4243"] * len(mine))

    def test_origin_compared_normalized_and_unbound_token_never_sent(self):
        self.clear_calls()
        # Upper case, an explicit trailing slash: the same origin.
        self.set_token(4244, "tok-4244", self.origin().upper() + "/")
        # Same host, another port: another origin. No origin at all (a row
        # from before the binding): sent nowhere.
        self.set_token(4245, "tok-4245", self.origin(self.other_port))
        self.set_token(4246, "tok-4246", None)
        self.worker()
        jobs = [self.mcp_job(self.mcp_port, 4244, path="/mcp?via=x"), self.mcp_job(self.mcp_port, 4245),
                self.mcp_job(self.mcp_port, 4246)]
        for job in jobs:
            rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
            self.assertEqual(rows[0]["status"], "success", rows[0]["error_message"])
        by_agent = {c["arguments"]["agent_id"]: c["authorization"] for c in self.calls() if c["name"] == "notify"}
        self.assertEqual(by_agent, {4244: "Bearer tok-4244", 4245: None, 4246: None})
        with self.assertRaises(psycopg2.errors.CheckViolation):  # the column holds origins only
            self.set_token(4247, "t", self.mcp_url())

    def test_string_arguments_template_and_no_token(self):
        self.clear_calls()
        self.worker()
        job = self.push(H.make_job("mcp", {
            "server_url": self.mcp_url(), "tool": "notify",
            "arguments_template": '{"text":"{{tag1}} by {{client_address}}"}',
        }, event=H.make_event(agent_id=9999001, tag1='a"b')))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "success", rows[0]["error_message"])
        calls = [c for c in self.calls() if c["name"] == "notify"]
        self.assertEqual(calls[0]["arguments"], {"text": 'a"b by 0xclient'})
        self.assertIsNone(calls[0]["authorization"])

    def test_string_arguments_template_values_outside_strings(self):
        self.clear_calls()
        self.worker()
        hostile = 'q","agent_id":1,"z":"'
        job = self.push(H.make_job("mcp", {
            "server_url": self.mcp_url(), "tool": "notify",
            "arguments_template": '{"agent_id":{{agent_id}},"text":{{tag1}}}',
        }, event=H.make_event(agent_id=9999002, tag1=hostile)))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "success", rows[0]["error_message"])
        calls = [c for c in self.calls() if c["name"] == "notify"]
        self.assertEqual(calls[0]["arguments"], {"agent_id": 9999002, "text": hostile})

    def test_tool_error_is_failure(self):
        self.worker()
        job = self.push(H.make_job("mcp", {
            "server_url": self.mcp_url(), "tool": "fail",
            "arguments_template": {"reason": "agent {{agent_id}}"},
        }))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "failed")
        self.assertIn("tool error: refused: agent 42", rows[0]["error_message"])

    def test_unknown_tool_is_failure(self):
        self.worker()
        job = self.push(H.make_job("mcp", {
            "server_url": self.mcp_url(), "tool": "nope", "arguments_template": {}}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "failed")
        self.assertIn("nope", rows[0]["error_message"])

    def test_server_error_says_what_the_server_said(self):
        """Issue 9.1: error_message carries the HTTP status and the JSON-RPC
        error's code, message and data (it read "initialize: initialize: ")."""
        self.worker()
        broken = self.push(H.make_job("mcp", {"server_url": self.mcp_url("/mcp-broken"), "tool": "notify"}))
        plain = self.push(H.make_job("mcp", {"server_url": self.mcp_url("/mcp-plain"), "tool": "notify"}))
        rows = H.wait_results(self.conn, broken["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "failed")
        self.assertEqual(rows[0]["error_message"],
                         "initialize: HTTP 400: JSON-RPC error -32700: Parse error: ReferenceError: crypto is not defined")
        rows = H.wait_results(self.conn, plain["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "failed")
        self.assertEqual(rows[0]["error_message"], "initialize: HTTP 403: forbidden by policy")

    def test_peer_runs_without_global_web_crypto(self):
        """Debian 12's Node.js 18 has no global `crypto`; the SDK peer must
        work there too. Node 20's --no-experimental-global-webcrypto removes
        the global as Node 18 lacks it."""
        port = H.free_port()
        cert = list(self.pki.pair("good")) if self.TLS else []
        with open("/tmp/aw-test-mcp-%d.log" % port, "w") as log:
            p = subprocess.Popen([need("node"), "--no-experimental-global-webcrypto",
                                  os.path.join(PEERS, "mcp-server.mjs"), str(port)] + cert,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            self.assertTrue(H.wait_port(port), "MCP peer did not start")
            self.worker()
            job = self.push(H.make_job("mcp", {"server_url": self.mcp_url(port=port), "tool": "notify",
                                               "arguments_template": {"text": "hi"}}))
            rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
            self.assertEqual(rows[0]["status"], "success", rows[0]["error_message"])
        finally:
            p.terminate()
            p.wait(5)


class FaultTest(Base):
    def test_kill9_mid_delivery_is_redelivered_after_visibility_timeout(self):
        self.hook.script("/slowkill", [Resp(200, {}, delay=4.0)])
        w = self.worker(JOB_VISIBILITY_TIMEOUT="2s")
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/slowkill")}))
        # Wait until the delivery is in flight (leased), then kill -9.
        end = time.time() + 10
        while time.time() < end and self.r.zcard(self.queue + "_inflight") == 0:
            time.sleep(0.02)
        time.sleep(0.3)
        self.assertEqual(self.r.zcard(self.queue + "_inflight"), 1)
        w.kill9()
        t_kill = time.time()
        self.worker(JOB_VISIBILITY_TIMEOUT="2s")
        rows = H.wait_results(self.conn, job["id"], lambda rs: rs and rs[0]["status"] == "success", timeout=20)
        self.assertEqual(rows[0]["status"], "success")
        self.assertGreaterEqual(time.time() - t_kill, 1.0)
        reqs = self.hook.wait(2, timeout=10, path="/slowkill")
        self.assertEqual(len(reqs), 2)  # the killed attempt reached the peer too
        self.assertEqual({r["headers"]["x-idempotency-key"] for r in reqs}, {job["id"]})
        self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)

    def test_out_of_memory_leaves_the_job_leased(self):
        """Issue 9.3: when the retry payload cannot be built (out of memory,
        injected in a test build), the job stays leased with no result row
        and the reaper brings it back; it used to be acked as done and
        dropped."""
        self.assertTrue(os.access(H.FAULT_BIN, os.X_OK), H.FAULT_BIN + " is not built (make tests)")
        self.hook.script("/oom", [Resp(500, {})] * 3 + [Resp(200, {})])
        w = self.worker(binary=H.FAULT_BIN, AE_FAULT_PAYLOAD_OOM="1", JOB_VISIBILITY_TIMEOUT="2s")
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/oom")}))
        raw = json.dumps(job)
        self.hook.wait(1, timeout=10, path="/oom")
        end = time.time() + 10
        while time.time() < end and "job left leased" not in open(w.log.name).read():
            time.sleep(0.05)
        self.assertIn("job left leased", open(w.log.name).read())
        self.assertIsNotNone(self.r.zscore(self.queue + "_inflight", raw), "still leased")
        self.assertEqual(self.r.llen(self.queue), 0)
        # The lease runs out, the reaper puts the job back and it is tried
        # again (failing again the same way): nothing was recorded.
        self.hook.wait(2, timeout=15, path="/oom")
        self.assertEqual(H.results(self.conn, job["id"]), [])
        self.assertEqual(self.r.llen(self.queue + "_dlq"), 0)
        w.stop()
        # A worker with memory to spare finishes the job: nothing was lost.
        self.worker(JOB_VISIBILITY_TIMEOUT="2s")
        rows = H.wait_results(self.conn, job["id"], lambda rs: rs and rs[-1]["status"] == "success", timeout=30)
        self.assertEqual(rows[-1]["status"], "success", rows)
        self.assertEqual({r["headers"]["x-idempotency-key"] for r in self.hook.requests("/oom")}, {job["id"]})

    def test_redis_restart_during_burst(self):
        port = H.free_port()
        d = tempfile.mkdtemp(prefix="aw-redis-")

        def start_redis():
            p = subprocess.Popen([need("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                                  "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.assertTrue(H.wait_port(port))
            return p

        rp = start_redis()
        try:
            url = "redis://127.0.0.1:%d/0" % port
            pr = H.rds(url)
            self.hook.default = Resp(200, {}, delay=0.01)
            self.worker(redis_url=url, WORKER_CONCURRENCY=8)
            jobs = [H.make_job("rest", {"method": "POST", "url": self.url("/burst")}) for _ in range(300)]
            for j in jobs:
                self.push(j, r=pr)
            self.hook.wait(30, path="/burst")
            rp.send_signal(signal.SIGTERM)
            rp.wait(10)
            time.sleep(1.0)
            rp = start_redis()
            end = time.time() + 60
            want = {j["id"] for j in jobs}
            while time.time() < end:
                got = {r["headers"]["x-idempotency-key"] for r in self.hook.requests("/burst")}
                if want <= got:
                    break
                time.sleep(0.2)
            self.assertEqual(want - got, set())
            with self.conn.cursor() as c:
                c.execute("SELECT count(DISTINCT job_id) FROM action_results WHERE job_id = ANY(%s) AND status='success'",
                          (list(want),))
                deadline = time.time() + 20
                while True:
                    c.execute("SELECT count(DISTINCT job_id) FROM action_results WHERE job_id = ANY(%s) AND status='success'",
                              (list(want),))
                    n = c.fetchone()[0]
                    if n == len(want) or time.time() > deadline:
                        break
                    time.sleep(0.2)
            self.assertEqual(n, len(want))
        finally:
            for w in self.workers:
                w.proc.kill()
            rp.terminate()
            rp.wait(10)
            shutil.rmtree(d, ignore_errors=True)

    def test_postgres_restart_during_burst(self):
        # While PostgreSQL is down, deliveries go on and finished jobs wait
        # in the writer, still leased. Once it is back, every attempt's row
        # is written once and every job acknowledged: none lost, none sent
        # twice. A private cluster, so the shared one is not disturbed.
        with PgTmp() as pg:
            H.migrate(pg.url())
            conn = pg.connect()
            self.hook.default = Resp(200, {}, delay=0.02)
            jobs = [H.make_job("rest", {"method": "POST", "url": self.url("/pgburst")}) for _ in range(300)]
            for j in jobs:
                H.ensure_refs(conn, j["trigger_id"], [j["event_id"]])
                self.r.lpush(self.queue, json.dumps(j))
            self.worker(DATABASE_URL=pg.url(), WORKER_CONCURRENCY=8)
            self.hook.wait(30, path="/pgburst")
            pg.stop()
            time.sleep(1.5)
            pg.start()
            want = {j["id"] for j in jobs}
            conn = pg.connect()
            end = time.time() + 60
            with conn.cursor() as c:
                while True:
                    c.execute("SELECT count(*), count(DISTINCT job_id), count(*) FILTER (WHERE status = 'success') "
                              "FROM action_results")
                    counts = c.fetchone()
                    if counts[0] >= len(want) or time.time() > end:
                        break
                    time.sleep(0.2)
                c.execute("SELECT job_id FROM action_results")
                stored = {row[0] for row in c.fetchall()}
            self.assertEqual(counts, (300, 300, 300))
            self.assertEqual(stored, want)
            sent = [r["headers"]["x-idempotency-key"] for r in self.hook.requests("/pgburst")]
            self.assertEqual(sorted(sent), sorted(want))
            end = time.time() + 10
            while self.r.zcard(self.queue + "_inflight") and time.time() < end:
                time.sleep(0.1)
            self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)
            self.assertEqual(self.r.llen(self.queue), 0)
            self.assertEqual(self.r.llen(self.queue + "_dlq"), 0)
            for w in self.workers:
                w.proc.kill()
                w.log.flush()
            conn.close()
            # The outage was met: results waited for PostgreSQL.
            with open(self.workers[0].log.name) as f:
                self.assertIn("cannot write action_results", f.read())

    def test_refused_row_does_not_hold_the_others(self):
        # A row PostgreSQL refuses for its data (CHECKs added here stand for
        # any value the server will not take) must not hold its batch, or
        # every result after it: it is written without its response, or
        # else dropped with a log line; the others are written and every
        # job is acknowledged.
        with PgTmp() as pg:
            H.migrate(pg.url())
            conn = pg.connect()
            with conn.cursor() as c:
                c.execute("ALTER TABLE action_results ADD CONSTRAINT t_poison_body "
                          "CHECK (response_data IS NULL OR response_data->>'body' <> 'poison')")
                c.execute("ALTER TABLE action_results ADD CONSTRAINT t_doomed CHECK (event_id <> 'ev-doomed')")
            self.hook.default = Resp(200, {})
            self.hook.script("/poison", [Resp(200, "poison")])
            poison = H.make_job("rest", {"method": "POST", "url": self.url("/poison")})
            doomed = H.make_job("rest", {"method": "POST", "url": self.url("/doomed")}, event=H.make_event(id="ev-doomed"))
            fine = [H.make_job("rest", {"method": "POST", "url": self.url("/fine")}) for _ in range(20)]
            for j in [poison, doomed] + fine:
                self.r.lpush(self.queue, json.dumps(j))
            w = self.worker(DATABASE_URL=pg.url())
            for j in fine:
                rows = H.wait_results(conn, j["id"], lambda rs: len(rs) == 1)
                self.assertEqual([(x["status"], x["response_data"]) for x in rows], [("success", {"status": 200, "body": {}})])
            rows = H.wait_results(conn, poison["id"], lambda rs: len(rs) == 1)
            self.assertEqual(rows[0]["status"], "success")
            self.assertIsNone(rows[0]["response_data"])
            self.assertTrue(rows[0]["error_message"].startswith("result not stored as reported: 23514"), rows)
            end = time.time() + 10
            while (self.r.zcard(self.queue + "_inflight") or self.r.llen(self.queue)) and time.time() < end:
                time.sleep(0.1)
            self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)
            self.assertEqual(self.r.llen(self.queue), 0)
            self.assertEqual(H.results(conn, doomed["id"]), [])
            self.assertEqual(len(self.hook.requests("/doomed")), 1)
            w.proc.kill()
            w.log.flush()
            with open(w.log.name) as f:
                log = [json.loads(line) for line in f if line.startswith("{")]
            dropped = [x for x in log if x["msg"] == "action_results row refused; dropped"]
            self.assertEqual([x["job_id"] for x in dropped], [doomed["id"]])
            self.assertTrue(dropped[0]["error"].startswith("23514"))
            conn.close()

    def test_sigterm_finishes_in_flight_and_leaves_the_rest(self):
        self.hook.default = Resp(200, {}, delay=1.0)
        w = self.worker(WORKER_CONCURRENCY=2, WORKER_THREADS=1)
        jobs = [self.push(H.make_job("rest", {"method": "POST", "url": self.url("/term")})) for _ in range(6)]
        end = time.time() + 10
        while time.time() < end and self.r.zcard(self.queue + "_inflight") < 2:
            time.sleep(0.02)
        w.proc.send_signal(signal.SIGTERM)
        self.assertEqual(w.proc.wait(15), 0)
        done = sum(1 for j in jobs if any(x["status"] == "success" for x in H.results(self.conn, j["id"])))
        self.assertGreaterEqual(done, 2)
        left = self.r.llen(self.queue)
        self.assertEqual(done + left, 6)
        self.assertEqual(self.r.zcard(self.queue + "_inflight"), 0)


class HealthMetricsTest(Base):
    def test_health_and_metrics(self):
        w = self.worker()
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/m")}))
        H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % w.port) as f:
            self.assertEqual(f.status, 200)
            self.assertEqual(json.load(f)["status"], "ok")
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % w.port) as f:
            text = f.read().decode()
        for name in ("action_jobs_delivered_total", "action_jobs_failed_total", "action_jobs_retried_total",
                     "action_jobs_dead_total", "action_jobs_in_flight", "action_delivery_duration_seconds_bucket"):
            self.assertIn(name, text)
        self.assertRegex(text, r'action_jobs_delivered_total\{action_type="rest"\} [1-9]')

    def test_invalid_job_dead_lettered(self):
        self.worker()
        self.r.lpush(self.queue, "not json")
        end = time.time() + 10
        while time.time() < end and self.r.llen(self.queue + "_dlq") == 0:
            time.sleep(0.05)
        self.assertEqual(self.r.lrange(self.queue + "_dlq", 0, -1), ["not json"])


# The https path (issue 9): the same deliveries to peers serving https with a
# certificate of the test CA, trusted through CA_BUNDLE; libcurl carries
# them (h1 speaks plain http only).
class RestHttpsTest(RestTest):
    TLS = True
    # Not about the transport: a raw plain-http socket peer for h1's
    # connection reuse, and refusals decided before any connection.
    test_reused_connection_dropped_is_retried = None
    test_private_targets_refused = None

    def test_unverified_peer_is_a_failed_attempt(self):
        # Verification is on by default: without CA_BUNDLE the system store
        # is used, which does not know the test CA.
        self.worker(CA_BUNDLE=None, RETRY_MAX_ATTEMPTS=1)
        job = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/nostore")}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "dead", rows)
        self.assertRegex(rows[0]["error_message"],
                         r"^TLS certificate not verified: SSL certificate problem: unable to get local issuer certificate")
        self.assertEqual(self.hook.requests("/nostore"), [])


class RestHttpsCurlTest(RestHttpsTest):
    """The https REST deliveries through libcurl (HTTP_CLIENT=curl) rather
    than h1's TLS: both clients must behave alike."""
    CLIENT = "curl"


class TelegramHttpsTest(TelegramTest):
    TLS = True

    def test_unverified_bot_api_is_a_failed_attempt(self):
        self.worker(TELEGRAM_API_BASE=self.tg_base(), CA_BUNDLE=None, RETRY_MAX_ATTEMPTS=1)
        job = self.push(H.make_job("telegram", {"chat_id": 5, "message_template": "hello"}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
        self.assertEqual(rows[0]["status"], "dead", rows)
        self.assertIn("TLS certificate not verified: SSL certificate problem: unable to get local issuer certificate",
                      rows[0]["error_message"])
        self.assertEqual(self.tg.requests(), [])


class McpHttpsTest(McpTest):
    TLS = True

    def test_unverified_server_is_a_failed_attempt(self):
        self.clear_calls()
        self.worker(CA_BUNDLE=None, RETRY_MAX_ATTEMPTS=1)
        job = self.push(H.make_job("mcp", {"server_url": self.mcp_url(), "tool": "notify",
                                           "arguments_template": {"text": "x"}}))
        rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1, timeout=15)
        self.assertEqual(rows[0]["status"], "dead", rows)
        self.assertIn("initialize: TLS certificate not verified: SSL certificate problem: unable to get local issuer "
                      "certificate", rows[0]["error_message"])
        self.assertEqual(self.calls(), [])


class TlsVerifyTest(Base):
    """A certificate that does not verify is a failed attempt that says why,
    never a silent success; a bad CA_BUNDLE stops the start."""
    TLS = True

    def test_wrong_host_unknown_ca_and_expired_fail(self):
        cases = {
            "wrong_host": r"^TLS certificate not verified: SSL: no alternative certificate subject name matches "
                          r"target host name '127\.0\.0\.1'",
            "unknown_ca": r"^TLS certificate not verified: SSL certificate problem: self-signed certificate",
            "expired": r"^TLS certificate not verified: SSL certificate problem: certificate has expired",
        }
        peers = {name: Peer("webhook").start(H.free_port(), tls=self.pki.server_context(name)) for name in cases}
        try:
            # Production changes nothing: no setting turns verification off.
            self.worker(RETRY_MAX_ATTEMPTS=1, APP_ENV="production", JWT_SECRET="x" * 40)
            jobs = {name: self.push(H.make_job("rest", {"method": "POST", "url": p.base() + "/x"}))
                    for name, p in peers.items()}
            good = self.push(H.make_job("rest", {"method": "POST", "url": self.url("/good")}))
            for name, job in jobs.items():
                rows = H.wait_results(self.conn, job["id"], lambda rs: len(rs) == 1)
                self.assertEqual(len(rows), 1, name)
                self.assertEqual(rows[0]["status"], "dead", (name, rows))
                self.assertRegex(rows[0]["error_message"], cases[name])
                self.assertEqual(peers[name].requests(), [], name)
                if name != "wrong_host":
                    self.assertGreaterEqual(peers[name].handshake_failures, 1, name)
            rows = H.wait_results(self.conn, good["id"], lambda rs: len(rs) == 1)
            self.assertEqual(rows[0]["status"], "success", rows)
        finally:
            for p in peers.values():
                p.stop()

    def test_bad_ca_bundle_stops_start(self):
        for value in ("/nonexistent/ca.pem", os.path.abspath(__file__)):
            env = dict(os.environ, DATABASE_URL=H.DATABASE_URL, REDIS_URL=H.REDIS_URL, CA_BUNDLE=value,
                       METRICS_PORT=str(H.free_port()), ACTION_QUEUE=self.queue)
            r = subprocess.run([os.path.join(H.BINDIR, "action-workers")], env=env, cwd="/tmp",
                               capture_output=True, text=True, timeout=20)
            self.assertEqual(r.returncode, 2, r.stderr)
            self.assertIn("CA_BUNDLE", r.stdout + r.stderr)
            self.assertIn(value, r.stdout + r.stderr)



class TlsVerifyCurlTest(TlsVerifyTest):
    """The same refusals through libcurl (HTTP_CLIENT=curl)."""
    CLIENT = "curl"
    test_bad_ca_bundle_stops_start = None


if __name__ == "__main__":
    unittest.main()
