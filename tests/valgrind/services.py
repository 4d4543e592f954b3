"""One short integration run of each service under valgrind's memcheck
(`make valgrind`, after the unit tests; scripts/valgrind.sh starts it).

The five services run at once, each under memcheck, against the local
PostgreSQL (database ae_valgrind), Redis (db 9) and RabbitMQ (vhost
valgrind), with a local webhook receiver, a Telegram-compatible peer and a
proxied upstream. A few requests of each kind go through them:

  api-gateway      register, login, refresh, a trigger created, read, listed and
                   updated, chain events ingested (one matching), results, bad
                   bodies (400), no token (401), an SSE stream with an event
                   published to it, a proxied request, /metrics
  event-processor  the matching event becomes two jobs
  action-workers   a webhook delivery and a Telegram message
  realtime         /ws: Subscribe, Broadcast, JoinRoom, RoomMessage, Ping, a
                   bad frame; /rt: an RTES node status and completion over AMQP
  runtime          a run created, three appends, read, receipt, replay, a
                   worker registered, Khala poll and WebSocket

then each gets SIGTERM. A service passes when it exited 0 by itself and its
memcheck log says 0 errors, with nothing definitely or indirectly lost (the
exit status is valgrind's 99 otherwise: --error-exitcode). The logs stay in
var/valgrind/. Exit status 0 when every service passed.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
INTEG = os.path.join(ROOT, "tests", "integration")
os.environ.setdefault("AW_TEST_DB", "ae_valgrind")
_rd = urllib.parse.urlsplit(os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
os.environ.setdefault("AW_TEST_REDIS", "redis://%s:%d/9" % (_rd.hostname or "127.0.0.1", _rd.port or 6379))
sys.path.insert(0, INTEG)

import awharness as H  # noqa: E402
import wsraw  # noqa: E402
from httppeers import Peer  # noqa: E402
from tools import need  # noqa: E402

OUT = os.path.join(ROOT, "var", "valgrind")
VALGRIND = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--show-leak-kinds=definite,indirect",
            "--errors-for-leak-kinds=definite,indirect", "--num-callers=30"]
JWT = "valgrind-jwt-secret-0123456789abcdef0123"
INGEST = "valgrind-ingest-token"
INTERNAL = "valgrind-internal-token"
SYNC_KEY = "valgrind-sync-key"
START_TIMEOUT = float(os.environ.get("VALGRIND_START_TIMEOUT", "180"))
STOP_TIMEOUT = float(os.environ.get("VALGRIND_STOP_TIMEOUT", "180"))


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(claims, key):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    return head + "." + body + "." + b64(hmac.new(key.encode(), (head + "." + body).encode(),
                                                   hashlib.sha256).digest())


def call(port, method, path, body=None, token=None, headers=None, raw=None, timeout=60):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = dict(headers or {})
    if token:
        h["Authorization"] = "Bearer " + token
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out = r.read()
    c.close()
    try:
        return r.status, json.loads(out) if out else None
    except ValueError:
        return r.status, out


def expect(what, got, want):
    if got != want and not (isinstance(want, tuple) and got in want):
        raise AssertionError("%s: got %r, want %r" % (what, got, want))


class Svc:
    def __init__(self, name, env, health):
        self.name, self.env, self.health = name, env, health
        self.log = os.path.join(OUT, name + ".log")
        self.vlog = os.path.join(OUT, name + ".memcheck.log")
        self.proc = None

    def start(self):
        for f in (self.log, self.vlog):
            if os.path.exists(f):
                os.unlink(f)
        env = dict(os.environ, LOG_FORMAT="json", LOG_LEVEL="info",
                   MIGRATIONS_DIR=os.path.join(ROOT, "database", "migrations"))
        env.update({k: str(v) for k, v in self.env.items()})
        self.out = open(self.log, "ab")
        self.proc = subprocess.Popen(VALGRIND + ["--log-file=" + self.vlog, os.path.join(H.BINDIR, self.name)],
                                     env=env, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)

    def wait_healthy(self, deadline):
        port, path = self.health
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("%s exited with %s during start-up; see %s" % (self.name, self.proc.returncode,
                                                                                   self.log))
            try:
                st, _ = call(port, "GET", path, timeout=5)
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("%s not healthy within %.0fs; see %s" % (self.name, START_TIMEOUT, self.log))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "killed after %.0fs" % STOP_TIMEOUT
        self.out.close()
        return rc

    def verdict(self, rc):
        text = open(self.vlog, errors="replace").read() if os.path.exists(self.vlog) else ""
        m = re.search(r"ERROR SUMMARY: (\d+) errors", text)
        errors = int(m.group(1)) if m else None

        def lost(kind):
            m = re.search(kind + r" lost: ([\d,]+) bytes", text)
            return int(m.group(1).replace(",", "")) if m else 0
        return {"service": self.name, "exit": rc, "errors": errors, "definitely": lost("definitely"),
                "indirectly": lost("indirectly"), "possibly": lost("possibly"),
                "ok": rc == 0 and errors == 0 and lost("definitely") == 0 and lost("indirectly") == 0}


def ws_connect(port, path, headers=None):
    """A socket upgraded on GET path (wsraw's handshake, with headers), and
    the bytes that came after the handshake answer."""
    s = wsraw.connect_headers(port, path, headers)
    return s, s.pending


def ws_frames(s, pending, want, timeout=60):
    """Reads server text frames (wsraw's parser) until `want` of them.
    Returns them and the bytes read past the last one."""
    frames, buf = [], pending
    s.settimeout(timeout)
    while len(frames) < want:
        f = wsraw.next_frame(buf)
        if f is None:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            continue
        op, payload, buf = f
        if op == 1:
            frames.append(json.loads(payload))
    return frames, buf


def read_until(fp, marker):
    """Lines of a stream (an SSE response) until one holds `marker` or it ends."""
    got = b""
    while marker not in got:
        line = fp.readline()
        if not line:
            break
        got += line
    return got


def ws_close(s):
    mask = os.urandom(4)
    payload = (1000).to_bytes(2, "big")
    s.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    s.close()


def drive(ports, hook, tg, upstream):
    gw, rt, run = ports["api-gateway"], ports["realtime"], ports["runtime"]
    # ---- api-gateway
    user = "vg" + uuid.uuid4().hex[:8]
    st, b = call(gw, "POST", "/api/v1/auth/register", {"username": user, "email": user + "@example.test",
                                                      "password": "correct horse 1"})
    expect("register", st, 201)
    st, b = call(gw, "POST", "/api/v1/auth/login", {"username": user, "password": "correct horse 1"})
    expect("login", st, 200)
    token, refresh = b["access_token"], b["refresh_token"]
    st, b = call(gw, "POST", "/api/v1/auth/refresh", {"refresh_token": refresh})
    expect("refresh", st, 200)
    token = b["access_token"]
    expect("bad JSON", call(gw, "POST", "/api/v1/auth/login", raw=b'{"username": ', headers={
        "Content-Type": "application/json"})[0], 400)
    expect("no token", call(gw, "GET", "/api/v1/triggers")[0], 401)
    agent = int(time.time() * 1000) % 1000000000 + 1000
    st, trig = call(gw, "POST", "/api/v1/triggers", {
        "name": "valgrind", "chain_id": 1, "registry": "reputation",
        "conditions": [{"condition_type": "agent_id_equals", "value": str(agent)},
                       {"condition_type": "score_threshold", "operator": ">=", "value": "80"}],
        "actions": [
            {"action_type": "telegram", "config": {"chat_id": 4242, "message_template": "{{agent_id}}: {{score}}"}},
            {"action_type": "rest", "config": {"method": "POST", "url": "http://127.0.0.1:%d/hook" % hook.port,
                                               "body_template": "{\"score\":{{score}}}"}}]}, token)
    expect("create trigger", st, 201)
    tid = trig["id"]
    expect("get trigger", call(gw, "GET", "/api/v1/triggers/%s" % tid, token=token)[0], 200)
    expect("list triggers", call(gw, "GET", "/api/v1/triggers?limit=5", token=token)[0], 200)
    expect("bad trigger", call(gw, "POST", "/api/v1/triggers", {"name": ""}, token)[0], 400)

    def ev(score):
        eid = "vg-%s" % uuid.uuid4().hex[:16]
        return {"id": eid, "chain_id": 1, "block_number": 7, "block_hash": "0xb" + eid[-8:],
                "transaction_hash": "0x" + uuid.uuid4().hex, "log_index": 0, "registry": "reputation",
                "event_type": "NewFeedback", "agent_id": agent, "timestamp": int(time.time()),
                "client_address": "0xc", "feedback_index": 1, "score": score, "tag1": "t", "tag2": ""}
    st, b = call(gw, "POST", "/api/v1/chain-events", {"events": [ev(10), ev(91)]}, INGEST)
    expect("ingest", st, (200, 201))
    # SSE: a stream, one event published to it.
    import http.client
    sse = http.client.HTTPConnection("127.0.0.1", gw, timeout=60)
    sse.request("GET", "/api/v1/events/vg-client")
    r = sse.getresponse()
    expect("sse status", r.status, 200)
    expect("sse connection.established", b"connection.established" in read_until(r.fp, b"connection.established"),
           True)
    st, _ = call(gw, "POST", "/internal/v1/sse/vg-client", {"event_type": "run.progress", "data": {"n": 1}},
                 INTERNAL)
    expect("sse publish", st, 202)
    expect("sse event", b"run.progress" in read_until(r.fp, b"run.progress"), True)
    sse.close()
    st, b = call(gw, "GET", "/api/v1/echo/some/path?x=1", headers={"X-Custom": "1", "Connection": "close, X-Hop"})
    expect("proxy", st, 200)
    expect("metrics", call(gw, "GET", "/metrics")[0], 200)
    # ---- event-processor and action-workers: the matching event's two jobs
    tg.wait(1, timeout=120)
    hook.wait(1, timeout=120)
    end = time.time() + 120
    while time.time() < end:
        st, res = call(gw, "GET", "/api/v1/triggers/%s/results?limit=10" % tid, token=token)
        if st == 200 and len([i for i in res["items"] if i["status"] == "success"]) >= 2:
            break
        time.sleep(1)
    expect("results", len([i for i in res["items"] if i["status"] == "success"]), 2)
    expect("update trigger", call(gw, "PUT", "/api/v1/triggers/%s" % tid, dict(
        {k: trig[k] for k in ("name", "chain_id", "registry", "conditions", "actions")}, enabled=False),
        token)[0], 200)
    # ---- realtime /ws
    rtok = mint({"sub": "alice", "exp": int(time.time()) + 600}, JWT)
    a, pa = ws_connect(rt, "/ws?token=" + rtok)
    frames, pa = ws_frames(a, pa, 1)
    expect("ws connected", frames[0]["type"], "Status")
    for f in ({"type": "Subscribe", "data": {"topics": ["news"]}},
              {"type": "Broadcast", "data": {"topic": "news", "payload": {"x": 1}}},
              {"type": "JoinRoom", "data": {"room": "lobby"}},
              {"type": "RoomMessage", "data": {"room": "lobby", "payload": "hi"}},
              {"type": "Ping", "data": {"timestamp": 1}}):
        wsraw.send_text(a, json.dumps(f))
    wsraw.send_text(a, "not json")
    types = set()
    while not {"Broadcast", "RoomMessage", "Pong", "Error"} <= types:
        frames, pa = ws_frames(a, pa, 1)
        if not frames:
            break
        types.add(frames[0]["type"])
    for t in ("Broadcast", "RoomMessage", "Pong", "Error"):
        expect("ws frame " + t, t in types, True)
    ws_close(a)
    # ---- realtime /rt over AMQP
    eid = str(uuid.uuid4())
    lines = [{"rk": "workflow.node.status", "body": {
        "workflow_id": "wf-vg", "execution_id": eid, "node_id": "a", "node_name": "A", "status": "success",
        "executed_at": "2026-01-01T00:00:00Z", "duration_ms": 3, "output": {"ok": True}}},
        {"rk": "workflow.completion", "body": {"workflow_id": "wf-vg", "execution_id": eid,
                                               "status": "completed", "final_context": {},
                                               "completed_at": "2026-01-01T00:01:00Z", "total_duration_ms": 1}},
        {"rk": "workflow.node.status", "body": "{not json"},
        {"rk": "execution.token", "exchange": "", "body": {"workflow_id": "wf-vg", "execution_id": eid,
                                                           "iat": int(time.time()), "user_id": "vg-user",
                                                           "exp": int(time.time()) + 600}}]
    out = subprocess.run([need("node"), os.path.join(INTEG, "rtes_amqp.js"), ports["amqp_url"]],
                         input="".join(json.dumps(x) + "\n" for x in lines), cwd=INTEG, capture_output=True,
                         text=True, timeout=120)
    expect("rtes publish", "published 4" in out.stdout, True)
    conn = H.db()
    end, stored = time.time() + 120, 0
    while time.time() < end and stored < 2:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM rtes_events WHERE execution_id = %s", (eid,))
            stored = cur.fetchone()[0]
        time.sleep(0.5)
    conn.close()
    expect("rtes stored", stored, 2)
    utok = mint({"sub": "vg-user", "exp": int(time.time()) + 600}, JWT)
    end = time.time() + 60
    while True:
        st, b = call(rt, "GET", "/executions/%s" % eid, token=utok)
        if st == 200 or time.time() > end:
            break
        time.sleep(0.5)
    expect("rtes document", (st, b.get("status") if isinstance(b, dict) else b), (200, "completed"))
    # ---- runtime
    st, b = call(run, "POST", "/internal/v1/runs", {"metadata": {"k": 1}})
    expect("create run", st, 201)
    rid = b["run"]["id"]
    for i, et in enumerate(("run.step", "run.step", "run.finished")):
        st, b = call(run, "POST", "/internal/v1/runs/%s/events" % rid, {
            "event_type": et, "payload": {"i": i, "status": "succeeded"}, "idempotency_key": "k%d" % i})
        expect("append", st, 200)
    expect("bad append", call(run, "POST", "/internal/v1/runs/%s/events" % rid, {"event_type": 5})[0], 400)
    expect("get run", call(run, "GET", "/internal/v1/runs/%s" % rid)[0], 200)
    expect("receipt", call(run, "GET", "/internal/v1/runs/%s/receipt" % rid)[0], 200)
    expect("replay", call(run, "GET", "/internal/v1/runs/%s/replay" % rid)[0], 200)
    expect("worker", call(run, "POST", "/internal/v1/workers", {"owner_user_id": 7})[0], 201)
    now = int(time.time())
    stok = mint({"iss": "https://openagents.com", "aud": "openagents-sync", "sub": "user:7", "exp": now + 600,
                 "iat": now, "jti": "j1", "oa_user_id": 7, "oa_sync_scopes": ["runtime.run_events"]}, SYNC_KEY)
    topic = "run:%s:events" % rid
    st, b = call(run, "GET", "/internal/v1/khala/topics/%s/messages?after_seq=0" % topic, token=stok)
    expect("khala poll", st, 200)
    s, p = ws_connect(run, "/internal/v1/khala/topics/%s/ws?after_seq=0" % topic,
                      {"Authorization": "Bearer " + stok})
    frames, _ = ws_frames(s, p, 4)
    expect("khala ws", [f["type"] for f in frames], ["hello", "message", "message", "message"])
    ws_close(s)


def main():
    os.makedirs(OUT, exist_ok=True)
    H.prepare_db()
    r = H.rds()
    r.flushdb()
    amqp = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    u = urllib.parse.urlsplit(amqp)
    amqp_url = urllib.parse.urlunsplit((u.scheme, u.netloc, "/valgrind", "", ""))
    # rabbitmqctl boots an Erlang VM per call: on a loaded machine one can
    # pass servers.sh's 60 s limit. Tried three times, then the default
    # vhost (nothing else runs during make test's last stage).
    for _ in range(3):
        if subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "vhost", "valgrind"],
                          stdout=subprocess.DEVNULL).returncode == 0:
            break
    else:
        print("valgrind: vhost valgrind could not be made; RTES runs in the default vhost", flush=True)
        amqp_url = amqp
    hook, tg, upstream = Peer("webhook"), Peer("telegram"), Peer("webhook")
    for p in (hook, tg, upstream):
        p.start(H.free_port())
        p.port = p.httpd.server_address[1]
    ports = {n: H.free_port() for n in ("api-gateway", "event-processor", "action-workers", "realtime",
                                        "runtime")}
    ports["amqp_url"] = amqp_url
    common = {"DATABASE_URL": H.DATABASE_URL, "REDIS_URL": H.REDIS_URL, "AMQP_URL": amqp_url}
    services = [
        Svc("api-gateway", dict(common, SERVER_HOST="127.0.0.1", SERVER_PORT=ports["api-gateway"], JWT_SECRET=JWT,
                                INGEST_TOKEN=INGEST, INTERNAL_TOKEN=INTERNAL, RATE_LIMIT="0",
                                ECHO_URL="http://127.0.0.1:%d/base" % upstream.port),
            (ports["api-gateway"], "/api/v1/health")),
        Svc("event-processor", dict(common, METRICS_PORT=ports["event-processor"], METRICS_HOST="127.0.0.1"),
            (ports["event-processor"], "/health")),
        Svc("action-workers", dict(common, METRICS_PORT=ports["action-workers"], METRICS_HOST="127.0.0.1",
                                   TELEGRAM_API_BASE="http://127.0.0.1:%d" % tg.port, TELEGRAM_BOT_TOKEN=H.TOKEN,
                                   ALLOWED_TARGETS="127.0.0.1"),
            (ports["action-workers"], "/health")),
        Svc("realtime", dict(common, HOST="127.0.0.1", PORT=ports["realtime"], JWT_SECRET=JWT),
            (ports["realtime"], "/health")),
        Svc("runtime", dict(common, RUNTIME_BIND_ADDR="127.0.0.1:%d" % ports["runtime"],
                            RUNTIME_SYNC_TOKEN_SIGNING_KEY=SYNC_KEY, RUNTIME_KHALA_POLL_MIN_INTERVAL_MS="0"),
            (ports["runtime"], "/healthz")),
    ]
    failure = None
    t0 = time.time()
    try:
        for s in services:
            s.start()
        deadline = time.time() + START_TIMEOUT
        for s in services:
            s.wait_healthy(deadline)
        print("valgrind: five services healthy under memcheck after %.0fs" % (time.time() - t0), flush=True)
        drive(ports, hook, tg, upstream)
        print("valgrind: requests done after %.0fs" % (time.time() - t0), flush=True)
    except Exception as e:  # the services are stopped and judged all the same
        failure = "%s: %s" % (type(e).__name__, e)
    rows = []
    for s in reversed(services):
        if s.proc:
            rows.append(s.verdict(s.stop()))
    for p in (hook, tg, upstream):
        p.stop()
    print("%-16s %-6s %-7s %-11s %-11s %s" % ("service", "exit", "errors", "definitely", "indirectly",
                                              "possibly (not counted)"))
    for row in reversed(rows):
        print("%-16s %-6s %-7s %-11s %-11s %s%s" % (row["service"], row["exit"], row["errors"], row["definitely"],
                                                  row["indirectly"], row["possibly"],
                                                  "" if row["ok"] else "   FAIL (%s)" % os.path.relpath(
                                                      os.path.join(OUT, row["service"] + ".memcheck.log"), ROOT)))
    print("valgrind: %.0fs in all" % (time.time() - t0))
    if failure:
        print("valgrind: the run failed: " + failure)
    return 0 if not failure and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
