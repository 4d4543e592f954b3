"""End to end (issue 5): the gateway, the event-processor and the
action-workers running as `make up` starts them, against their own database
(ae_test_aw) and Redis db 2. A user signs up, creates a trigger with a
Telegram action and a webhook action through the API; an indexer posts
matching and non-matching chain events; the local Telegram-compatible
server and the webhook receiver each get exactly one rendered message; the
results route lists the successes. docs/e2e-story.md tells the same story
as curl commands."""
import json
import os
import subprocess
import time
import unittest
import urllib.error
import urllib.request
import uuid

import awharness as H
from httppeers import Peer

INGEST = "e2e-ingest-token"
JWT = "e2e-jwt-secret-0123456789abcdef0123456789"
GW_PORT = int(os.environ.get("AW_E2E_GW_PORT", "18380"))


def call(method, path, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (GW_PORT, path), data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as f:
            return f.status, json.loads(f.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode()


class EndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        H.prepare_db()
        cls.tg = Peer("telegram").start(H.free_port())
        cls.hook = Peer("webhook").start(H.free_port())
        cls.procs = []
        env = dict(os.environ, DATABASE_URL=H.DATABASE_URL, REDIS_URL=H.REDIS_URL, JWT_SECRET=JWT,
                   INGEST_TOKEN=INGEST, SERVER_HOST="127.0.0.1", SERVER_PORT=str(GW_PORT),
                   TELEGRAM_API_BASE="http://127.0.0.1:%d" % cls.tg.httpd.server_address[1],
                   TELEGRAM_BOT_TOKEN=H.TOKEN, ALLOWED_TARGETS="127.0.0.1", LOG_LEVEL="info",
                   RATE_LIMIT="100000", MIGRATIONS_DIR=os.path.join(H.ROOT, "database", "migrations"))
        # Other tests share Redis db 2 with their own key prefixes; the
        # end-to-end run uses the real queue name, so start it empty.
        r = H.rds()
        r.delete("action_jobs", "action_jobs_inflight", "action_jobs_delayed", "action_jobs_dlq")
        for name, extra in (("api-gateway", {}),
                            ("event-processor", {"METRICS_PORT": str(GW_PORT + 1)}),
                            ("action-workers", {"METRICS_PORT": str(GW_PORT + 2), "METRICS_HOST": "127.0.0.1"})):
            path = os.path.join(H.BINDIR, name)
            if not os.access(path, os.X_OK):
                raise RuntimeError("%s is not built" % path)
            log = open("/tmp/aw-e2e-%s.log" % name, "w")
            cls.procs.append((subprocess.Popen([path], env=dict(env, **extra), cwd="/tmp", stdout=log,
                                               stderr=subprocess.STDOUT), log))
        if not H.wait_port(GW_PORT, 15) or not H.wait_port(GW_PORT + 2, 15):
            raise RuntimeError("services did not start; see /tmp/aw-e2e-*.log")
        end = time.time() + 20
        while time.time() < end:
            st, _ = call("GET", "/api/v1/health")
            if st == 200:
                break
            time.sleep(0.2)

    @classmethod
    def tearDownClass(cls):
        for p, log in cls.procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()
        cls.tg.stop()
        cls.hook.stop()

    def test_story(self):
        for p, _ in self.procs:
            self.assertIsNone(p.poll(), "a service exited; see /tmp/aw-e2e-*.log")
        user = "alice" + uuid.uuid4().hex[:8]
        st, body = call("POST", "/api/v1/auth/register",
                        {"username": user, "email": user + "@example.test", "password": "correct horse 1"})
        self.assertEqual(st, 201, body)
        st, body = call("POST", "/api/v1/auth/login", {"username": user, "password": "correct horse 1"})
        self.assertEqual(st, 200, body)
        token = body["access_token"]
        agent = int(time.time() * 1000) % 1000000000 + 1000
        hook_url = "http://127.0.0.1:%d/hooks/alice" % self.hook.httpd.server_address[1]
        st, trig = call("POST", "/api/v1/triggers", {
            "name": "High scores for my agent", "chain_id": 1, "registry": "reputation",
            "conditions": [
                {"condition_type": "agent_id_equals", "value": str(agent)},
                {"condition_type": "score_threshold", "operator": ">=", "value": "80"},
            ],
            "actions": [
                {"action_type": "telegram", "config": {
                    "chat_id": 424242, "parse_mode": "Markdown",
                    "message_template": "{{trigger.name}}: agent {{agent_id}} scored {{score}} ({{tag1}})"}},
                {"action_type": "rest", "config": {
                    "method": "POST", "url": hook_url, "headers": {"X-From": "e2e"},
                    "body_template": "{\"agent\":{{agent_id}},\"score\":{{score}},\"tag\":\"{{tag1}}\",\"event\":\"{{event_id}}\"}"}},
            ]}, token)
        self.assertEqual(st, 201, trig)
        tid = trig["id"]

        def ev(score, agent_id, tag):
            eid = "e2e-%s" % uuid.uuid4().hex[:16]
            return {"id": eid, "chain_id": 1, "block_number": 123, "block_hash": "0xb" + eid[-8:],
                    "transaction_hash": "0x" + uuid.uuid4().hex, "log_index": 0, "registry": "reputation",
                    "event_type": "NewFeedback", "agent_id": agent_id, "timestamp": int(time.time()),
                    "client_address": "0xclient", "feedback_index": 1, "score": score, "tag1": tag, "tag2": ""}

        match = ev(91, agent, 'great "work"')
        events = [ev(10, agent, "low"), match, ev(95, agent + 1, "other agent")]
        st, body = call("POST", "/api/v1/chain-events", {"events": events}, INGEST)
        if st == 400:
            st, body = call("POST", "/api/v1/chain-events", events, INGEST)
        self.assertIn(st, (200, 201), body)
        self.assertEqual(body["inserted"], 3)

        tg = self.tg.wait(1, timeout=30)
        hooks = self.hook.wait(1, timeout=30)
        time.sleep(2.0)  # anything extra would arrive by now
        tg, hooks = self.tg.requests(), self.hook.requests()
        self.assertEqual(len(tg), 1, tg)
        self.assertEqual(len(hooks), 1, hooks)
        msg = json.loads(tg[0]["body"])
        self.assertEqual(msg["chat_id"], 424242)
        self.assertEqual(msg["parse_mode"], "Markdown")
        self.assertEqual(msg["text"], 'High scores for my agent: agent %d scored 91 (great "work")' % agent)
        self.assertEqual(json.loads(hooks[0]["body"]),
                         {"agent": agent, "score": 91, "tag": 'great "work"', "event": match["id"]})
        self.assertEqual(hooks[0]["headers"]["x-from"], "e2e")
        self.assertTrue(hooks[0]["headers"]["x-idempotency-key"])

        end = time.time() + 15
        while time.time() < end:
            st, res = call("GET", "/api/v1/triggers/%s/results?limit=10" % tid, token=token)
            if st == 200 and len([i for i in res["items"] if i["status"] == "success"]) >= 2:
                break
            time.sleep(0.2)
        self.assertEqual(st, 200, res)
        ok = [i for i in res["items"] if i["status"] == "success"]
        self.assertEqual(sorted(i["action_type"] for i in ok), ["rest", "telegram"])
        self.assertTrue(all(i["event_id"] == match["id"] for i in ok))


if __name__ == "__main__":
    unittest.main()
