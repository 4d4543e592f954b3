"""The platform's story end to end (issue 15), through the real programs as
`make up` starts them: scripts/stack.sh up runs the five services (on free
ports, files in a temporary STACK_VAR, against the servers tests/run.sh
started, a database of its own and Redis db 7), and every step goes through
their public routes with stock clients (npm ws, eventsource, amqplib) and
the repository's own (scripts/ws.cjs, bin/runtime-smoke).

1. A user registers and signs in, creates a low-reputation trigger with a
   Telegram action and a webhook action, and an EMA trigger.
2. An indexer posts chain events: the Telegram-compatible server and the
   webhook receiver each get exactly one rendered message; the EMA trigger
   fires only when the average crosses; the results route shows the
   successes.
3. The user's page on realtime /ws (the user's token, subscribed to
   user:{id}) sees each trigger.fired.
4. A workflow worker publishes node states over AMQP; a browser on /rt (the
   user's token, granted by an execution token) sees history, then live,
   then completion; GET /executions/{id} has it all.
5. A browser on the gateway's SSE stream gets a question and answers it
   through the response route; the answer is in hitl:responses. A request
   through the gateway's proxy reaches a local upstream.
6. An agent creates a run on the runtime and appends events; a sync client
   follows the run's topic over the Khala WebSocket; runtime-smoke passes.
README's walk-through tells the same story with curl."""
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
from aetest import (AMQP_URL, BINDIR, ROOT, http_json, private_db_create, private_db_drop,  # noqa: E402
                    redis_url, wait_for)
from httppeers import Peer  # noqa: E402
from pgtmp import free_port  # noqa: E402
from tools import need  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STACK = os.path.join(ROOT, "scripts", "stack.sh")
WS = os.path.join(ROOT, "scripts", "ws.cjs")
DB = "ae_test_story"
REDIS = redis_url(7)
SECRETS = {n: "story-%s-%s" % (n.lower(), uuid.uuid4().hex) for n in
           ("JWT_SECRET", "INGEST_TOKEN", "INTERNAL_TOKEN", "RUNTIME_SYNC_TOKEN_SIGNING_KEY")}
BOT = "123456:story-bot-token"


def setUpModule():
    subprocess.run([os.path.join(HERE, "setup-node.sh")], check=True)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sync_token(scopes):
    """A Khala sync token (SPEC 6) signed with the stack's key; the issuer
    and audience are the runtime's defaults."""
    now = int(time.time())
    claims = {"iss": "https://openagents.com", "aud": "openagents-sync", "sub": "user:story", "exp": now + 600,
              "iat": now, "jti": "story-" + uuid.uuid4().hex, "oa_user_id": 1, "oa_org_id": "org:1",
              "oa_device_id": "dev-story", "oa_client_surface": "web", "oa_sync_scopes": scopes}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    key = SECRETS["RUNTIME_SYNC_TOKEN_SIGNING_KEY"].encode()
    return head + "." + body + "." + b64(hmac.new(key, (head + "." + body).encode(), hashlib.sha256).digest())


def jwt_sub(token):
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["sub"]


class Lines:
    """A client subprocess whose stdout lines are collected by a thread."""

    def __init__(self, args):
        self.proc = subprocess.Popen(args, cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines, self.err = [], []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True).start()

    def _read(self, f, into):
        for line in f:
            with self.lock:
                into.append(line.rstrip("\n"))

    def json(self):
        with self.lock:
            return [json.loads(ln) for ln in self.lines if ln.startswith("{") or ln.startswith("[")]

    def wait(self, pred, timeout, what):
        wait_for(lambda: pred(self.json()), timeout,
                 what="%s (got %r, stderr %r)" % (what, self.json()[-10:], self.err[-5:]))
        return self.json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class Upstream:
    """A local service behind the gateway's proxy: answers what it got."""

    def __init__(self):
        seen = self.seen = []

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
                body = json.dumps({"upstream": "story", "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Story(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import redis
        cls.db_url = private_db_create(DB)
        cls.r = redis.Redis.from_url(REDIS, decode_responses=True)
        cls.r.flushdb()
        cls.tg = Peer("telegram").start(free_port())
        cls.hook = Peer("webhook").start(free_port())
        cls.up = Upstream()
        cls.var = tempfile.mkdtemp(prefix="ae-story-")
        cls.ports = [free_port() for _ in range(5)]
        # What `make up` would pass on, less the run's own URLs (the gateway
        # takes every *_URL for a service to proxy).
        env = {k: v for k, v in os.environ.items()
               if not k.endswith("_URL") and not k.startswith("TEST_") and k != "AE_TEST_RUN"}
        env.update(SECRETS)
        env.update({
            "STACK_VAR": cls.var, "STACK_PORTS": " ".join(map(str, cls.ports)), "STACK_TIMEOUT": "90",
            "BINDIR": os.environ.get("BINDIR", "bin"),
            "DATABASE_URL": cls.db_url, "REDIS_URL": REDIS, "AMQP_URL": AMQP_URL,
            "TELEGRAM_API_BASE": "http://127.0.0.1:%d" % cls.tg.httpd.server_address[1],
            "TELEGRAM_BOT_TOKEN": BOT, "ALLOWED_TARGETS": "127.0.0.1", "RATE_LIMIT": "100000",
            "STORYUP_URL": "http://127.0.0.1:%d" % cls.up.port,
        })
        r = subprocess.run([STACK, "up"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            cls.tearDownClass()
            raise AssertionError("stack.sh up failed:\n%s%s" % (r.stdout, r.stderr))
        cls.env = {}
        with open(os.path.join(cls.var, "env")) as f:
            for line in f:
                k, _, v = line.strip()[len("export "):].partition("=")
                cls.env[k] = v.strip("'")
        cls.gw, cls.rt, cls.runtime = cls.env["AE_GATEWAY_URL"], cls.env["AE_REALTIME_URL"], cls.env["AE_RUNTIME_URL"]

    @classmethod
    def tearDownClass(cls):
        # The services only: stack.sh down would stop the run's servers too.
        run = os.path.join(cls.var, "run")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for name in (os.listdir(run) if os.path.isdir(run) else []):
                try:
                    with open(os.path.join(run, name)) as f:
                        os.kill(int(f.read().strip()), sig)
                except (OSError, ValueError):
                    pass
            if sig == signal.SIGTERM:
                time.sleep(1)
        for log in ("api-gateway", "event-processor", "action-workers", "realtime", "runtime"):
            p = os.path.join(cls.var, "log", log + ".log")
            if os.path.exists(p):
                shutil.copy(p, "/tmp/ae-story-%s.log" % log)
        shutil.rmtree(cls.var, ignore_errors=True)
        cls.tg.stop()
        cls.hook.stop()
        cls.up.stop()
        private_db_drop(DB)

    def api(self, method, path, body=None, token=None, base=None):
        headers = {"Authorization": "Bearer " + token} if token else {}
        st, _, b = http_json(method, (base or self.gw) + path, body, headers)
        return st, b

    def test_story(self):
        # ---- 1. sign up, sign in, two triggers
        user = "story" + uuid.uuid4().hex[:8]
        st, b = self.api("POST", "/api/v1/auth/register",
                         {"username": user, "email": user + "@example.test", "password": "correct horse 1"})
        self.assertEqual(st, 201, b)
        st, b = self.api("POST", "/api/v1/auth/login", {"username": user, "password": "correct horse 1"})
        self.assertEqual(st, 200, b)
        token = b["access_token"]
        uid = jwt_sub(token)
        agent, ema_agent = 4100 + int(time.time()) % 1000, 9100 + int(time.time()) % 1000
        hook = "http://127.0.0.1:%d" % self.hook.httpd.server_address[1]
        st, low = self.api("POST", "/api/v1/triggers", {
            "name": "Low reputation", "chain_id": 1, "registry": "reputation",
            "conditions": [{"condition_type": "agent_id_equals", "value": str(agent)},
                           {"condition_type": "score_threshold", "operator": "<", "value": "30"}],
            "actions": [
                {"action_type": "telegram", "config": {
                    "chat_id": 4242, "message_template": "{{trigger.name}}: agent {{agent_id}} scored {{score}}"}},
                {"action_type": "rest", "config": {"method": "POST", "url": hook + "/hooks/low",
                                                   "body_template": "{\"agent\":{{agent_id}},\"score\":{{score}}}"}}]},
            token)
        self.assertEqual(st, 201, low)
        st, ema = self.api("POST", "/api/v1/triggers", {
            "name": "EMA below 50", "chain_id": 1, "registry": "reputation",
            "conditions": [{"condition_type": "agent_id_equals", "value": str(ema_agent)},
                           {"condition_type": "ema_threshold", "operator": "<", "value": "50",
                            "config": {"window_size": 3}}],
            "actions": [{"action_type": "rest", "config": {
                "method": "POST", "url": hook + "/hooks/ema",
                "body_template": "{\"agent\":{{agent_id}},\"score\":{{score}},\"event\":{{event_id}}}"}}]}, token)
        self.assertEqual(st, 201, ema)
        self.assertTrue(ema["is_stateful"])

        # ---- 3 (set up first). The user's page on /ws, subscribed to user:{id}.
        page = Lines([need("node"), WS, "-t", "120", "%s/ws?token=%s" % (self.rt.replace("http", "ws", 1), token),
                      json.dumps({"type": "Subscribe", "data": {"topics": ["user:" + uid]}})])
        try:
            page.wait(lambda fs: any(f.get("type") == "Status" and f["data"]["status"] == "subscribed" for f in fs),
                      20, "the page's subscription")

            # ---- 2. the indexer posts events
            def ev(score, agent_id):
                eid = "story-" + uuid.uuid4().hex[:16]
                return {"id": eid, "chain_id": 1, "block_number": 7, "block_hash": "0xb", "log_index": 0,
                        "transaction_hash": "0x" + uuid.uuid4().hex, "registry": "reputation",
                        "event_type": "NewFeedback", "agent_id": agent_id, "timestamp": int(time.time()),
                        "client_address": "0xc", "feedback_index": 1, "score": score, "tag1": "t", "tag2": ""}

            low_ev = ev(12, agent)
            # EMA with alpha 0.5: 90, 85, 52.5 stay above 50; 31.25 crosses.
            ema_evs = [ev(s, ema_agent) for s in (90, 80, 20, 10)]
            for batch in ([low_ev, ev(95, agent)], *[[e] for e in ema_evs]):
                st, b = self.api("POST", "/api/v1/chain-events", {"events": batch}, SECRETS["INGEST_TOKEN"])
                self.assertEqual((st, b["inserted"]), (200, len(batch)), b)
                time.sleep(0.2)  # one at a time: the EMA is over the order they arrive in
            self.tg.wait(1, timeout=30)
            wait_for(lambda: len(self.hook.requests()) >= 2, 30, what="both webhooks")
            time.sleep(2)  # anything extra would be here by now
            tg, hooks = self.tg.requests(), self.hook.requests()
            self.assertEqual(len(tg), 1, tg)
            self.assertEqual(tg[0]["path"], "/bot%s/sendMessage" % BOT)
            self.assertEqual(json.loads(tg[0]["body"])["text"], "Low reputation: agent %d scored 12" % agent)
            by_path = {h["path"]: h for h in hooks}
            self.assertEqual(sorted(by_path), ["/hooks/ema", "/hooks/low"], hooks)
            self.assertEqual(json.loads(by_path["/hooks/low"]["body"]), {"agent": agent, "score": 12})
            self.assertEqual(json.loads(by_path["/hooks/ema"]["body"]),
                             {"agent": ema_agent, "score": 10, "event": ema_evs[3]["id"]})

            def successes(tid, n):
                def ok():
                    st, res = self.api("GET", "/api/v1/triggers/%s/results?limit=10" % tid, token=token)
                    return st == 200 and len([i for i in res["items"] if i["status"] == "success"]) >= n
                wait_for(ok, 15, what="results of %s" % tid)
                return [i for i in self.api("GET", "/api/v1/triggers/%s/results?limit=10" % tid, token=token)[1]
                        ["items"] if i["status"] == "success"]

            self.assertEqual(sorted(i["action_type"] for i in successes(low["id"], 2)), ["rest", "telegram"])
            self.assertEqual([i["event_id"] for i in successes(ema["id"], 1)], [ema_evs[3]["id"]])

            # ---- 3. the page saw each trigger.fired
            fired = page.wait(lambda fs: len([f for f in fs if f.get("type") == "Broadcast"]) >= 2, 20,
                              "two trigger.fired")
            time.sleep(1)
            fired = [f["data"] for f in page.json() if f.get("type") == "Broadcast"]
            self.assertEqual(sorted((f["payload"]["trigger_id"], f["payload"]["event_id"]) for f in fired),
                             sorted([(low["id"], low_ev["id"]), (ema["id"], ema_evs[3]["id"])]))
            for f in fired:
                self.assertEqual(f["topic"], "user:" + uid)
                self.assertEqual(f["payload"]["type"], "trigger.fired")
        finally:
            page.stop()

        # ---- 4. a workflow over AMQP, watched on /rt
        eid, wid = "story-ex-" + uuid.uuid4().hex[:10], "story-wf"
        now = int(time.time())

        def status(node, st):
            return {"rk": "workflow.node.status", "body": {
                "workflow_id": wid, "execution_id": eid, "node_id": node, "node_name": "Node " + node, "status": st,
                "executed_at": "2026-01-01T00:00:00Z", "duration_ms": 3}}

        def publish(lines):
            r = subprocess.run([need("node"), os.path.join(HERE, "rtes_amqp.js"), AMQP_URL],
                               input="".join(json.dumps(ln) + "\n" for ln in lines), cwd=HERE,
                               capture_output=True, text=True, timeout=60)
            self.assertIn("published %d" % len(lines), r.stdout, r.stderr)

        publish([{"rk": "execution.token", "exchange": "",
                  "body": {"workflow_id": wid, "execution_id": eid, "iat": now, "exp": now + 600, "user_id": uid}},
                 {"rk": "workflow.worker.initiated", "body": {
                     "workflow_id": wid, "execution_id": eid, "current_node": "a",
                     "workflow_definition": {"nodes": [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}],
                                             "edges": []}, "accumulated_context": {"story": 1}}},
                 status("a", "running"), status("a", "success")])
        last = []

        def stored():
            last[:] = self.api("GET", "/executions/" + eid, token=token, base=self.rt)
            return last[0] == 200 and last[1]["nodes"].get("a", {}).get("latest", {}).get("status") == "success"
        try:
            wait_for(stored, 20, what="the history stored")
        except AssertionError:
            raise AssertionError("GET /executions/%s never showed node a done: last answer %r" % (eid, last))
        browser = Lines([need("node"), os.path.join(HERE, "rtes_watch.js"),
                         "%s/rt?execution_id=%s&workflow_id=%s" % (self.rt.replace("http", "ws", 1), eid, wid),
                         "1", "4", token, "400", "30000"])
        try:
            wait_for(lambda: any(ln.startswith("open") for ln in browser.err), 20, what="the /rt handshake")
            publish([status("b", "success"),
                     {"rk": "workflow.completion", "body": {
                         "workflow_id": wid, "execution_id": eid, "status": "completed", "final_context": {"ok": 1},
                         "completed_at": "2026-01-01T00:01:00Z", "total_duration_ms": 60000}}])
            res = browser.wait(lambda fs: bool(fs), 40, "the browser's frames")[0][0]
        finally:
            browser.stop()
        self.assertNotIn("http", res, res)
        self.assertEqual([(f["node_id"], f["status"]) for f in res["frames"]],
                         [("a", "running"), ("a", "success"), ("b", "success"), (None, "completed")])
        st, doc = self.api("GET", "/executions/" + eid, token=token, base=self.rt)
        self.assertEqual(st, 200, doc)
        self.assertEqual((doc["workflow_id"], doc["status"]), (wid, "completed"))
        self.assertEqual(doc["accumulated_context"], {"story": 1})
        self.assertEqual({k: v["latest"]["status"] for k, v in doc["nodes"].items()}, {"a": "success", "b": "success"})

        # ---- 5. SSE: a question, its answer in hitl:responses; the proxy
        client = "story-" + uuid.uuid4().hex[:10]
        sse = Lines([need("node"), os.path.join(HERE, "sse_client.js"), "%s/api/v1/events/%s" % (self.gw, client),
                     "2", "30000"])
        try:
            sse.wait(lambda evs: any(e["type"] == "connection.established" for e in evs), 20, "the SSE stream")
            st, b = self.api("POST", "/internal/v1/sse/" + client,
                             {"event_type": "question", "data": {"question_id": "q1", "text": "Deploy?"}},
                             SECRETS["INTERNAL_TOKEN"])
            self.assertEqual(st, 202, b)
            evs = sse.wait(lambda evs: any(e["type"] == "question" for e in evs), 20, "the question")
        finally:
            sse.stop()
        q = [e for e in evs if e["type"] == "question"][0]
        self.assertEqual(q["data"]["data"], {"question_id": "q1", "text": "Deploy?"})
        st, b = self.api("POST", "/api/v1/events/%s/response" % client, {"question_id": "q1", "answer": {"go": True}})
        self.assertEqual((st, b), (200, {"status": "ok", "message": "Response received"}))
        entries = [f for _, f in self.r.xrange("hitl:responses") if f.get("client_id") == client]
        self.assertEqual(len(entries), 1, entries)
        self.assertEqual((entries[0]["question_id"], json.loads(entries[0]["answer"])), ("q1", {"go": True}))

        st, b = self.api("GET", "/api/v1/storyup/hello?x=1")
        self.assertEqual((st, b), (200, {"upstream": "story", "path": "/hello?x=1"}))
        self.assertEqual(self.up.seen[-1]["headers"]["x-forwarded-for"], "127.0.0.1")

        # ---- 6. an agent's run on the runtime, followed over Khala
        st, b = self.api("POST", "/internal/v1/runs", {"worker_id": "story-worker", "metadata": {"story": True}},
                         base=self.runtime)
        self.assertEqual(st, 201, b)
        run = b["run"]["id"]
        topic = "run:%s:events" % run
        sync = Lines([need("node"), os.path.join(HERE, "khala_ws_client.cjs"),
                      "%s/internal/v1/khala/topics/%s/ws?after_seq=0" % (self.runtime.replace("http", "ws", 1), topic),
                      "3", "30000", json.dumps({"Authorization": "Bearer " + sync_token(["runtime.run_events"])})])
        try:
            sync.proc.stdin.write("go\n")
            sync.proc.stdin.flush()
            sync.wait(lambda es: any("ready" in e for e in es), 20, "the Khala hello")
            for i, et in enumerate(("tool.call", "run.finished")):
                payload = {"status": "succeeded"} if et == "run.finished" else {"tool": "search", "n": i}
                st, b = self.api("POST", "/internal/v1/runs/%s/events" % run,
                                 {"event_type": et, "payload": payload, "idempotency_key": "story-%d" % i},
                                 base=self.runtime)
                self.assertEqual(st, 200, b)
            self.assertEqual(b["run"]["status"], "succeeded")
            msgs = sync.wait(lambda es: len([e for e in es if e.get("frame", {}).get("type") == "message"]) >= 3,
                             20, "three Khala messages")
        finally:
            sync.stop()
        frames = [e["frame"]["message"] for e in msgs if e.get("frame", {}).get("type") == "message"]
        self.assertEqual([m["sequence"] for m in frames], [1, 2, 3])
        self.assertTrue(all(m["topic"] == topic for m in frames))

        r = subprocess.run([os.path.join(BINDIR, "runtime-smoke")], env=dict(os.environ, SMOKE_BASE_URL=self.runtime),
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()
