"""realtime /ws (SPEC 5a) against real Redis, with the stock npm `ws` client
(node) and raw sockets for the misbehaving peers: every frame type, the four
token sources, 401s, refresh and 4001 at expiry, topic permissions, rooms
and presence, two instances through Redis (broadcast, direct message, room,
presence, a dead instance's presence expiring), trigger.fired on
rt:topic:user:{id}, MAX_CONNECTIONS, rate limits, bad and oversize frames,
heartbeat timeout, a slow reader dropped, /health /info /metrics
(promtool). The C client drivers/rtclient.c goes through every frame type
again (the JSON Pong included), every token source and refusal, 4001, the
per-user and global token buckets, the routing rules, /rt streams outside
MAX_CONNECTIONS, and a killed or paused instance's users going offline."""

import base64
import json
import os
import socket
import subprocess
import time
import unittest
import uuid

import redis

from aetest import (AMQP_URL, BINDIR, DATABASE_URL, REDIS_URL, ROOT, Service, http, http_json, recv_to_close,
                    wait_for)
from pgtmp import free_port
from tools import need
import wsraw

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = "test-realtime-secret-0123456789abcdef"


def setUpModule():
    subprocess.run([os.path.join(HERE, "setup-node.sh")], check=True)


def node(script, timeout=60):
    r = subprocess.run([need("node"), "-e", PRELUDE + script], cwd=HERE, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise AssertionError("node failed: %s\n%s" % (r.stdout, r.stderr))
    return json.loads(r.stdout.strip().splitlines()[-1])


# A scripted client: connect(url, opts) resolves once Status connected
# arrives; c.next(pred) waits for a frame; c.frames keeps everything.
PRELUDE = r"""
const WebSocket = require('ws'); const jwt = require('jsonwebtoken');
const SECRET = %s;
function tok(claims, exp) { return jwt.sign(claims, SECRET, {expiresIn: exp || 60}); }
function connect(url, protos, headers) {
  return new Promise((res, rej) => {
    const ws = new WebSocket(url, protos || [], {headers: headers || {}});
    const c = {ws, frames: [], waiters: [], closed: null};
    ws.on('unexpected-response', (req, r) => { let b = ''; r.on('data', d => b += d);
      r.on('end', () => res({refused: r.statusCode, body: b})); });
    ws.on('message', (d, bin) => { const f = JSON.parse(d.toString());
      if (f.type == 'Status' && f.data.status == 'connected' && !c.hello) { c.hello = f; return res(c); }
      c.frames.push(f); c.waiters = c.waiters.filter(w => !(w.pred(f) && (w.res(f), true))); });
    ws.on('close', (code, reason) => { c.closed = {code, reason: reason.toString()};
      for (const w of c.waiters) w.res(null); c.waiters = []; });
    ws.on('error', e => rej(e));
  });
}
function next(c, pred, ms) {
  const seen = c.frames.find(pred); if (seen) { c.frames.splice(c.frames.indexOf(seen), 1); return Promise.resolve(seen); }
  return new Promise(res => { const w = {pred: f => pred(f), res: f => { if (f) c.frames.splice(c.frames.indexOf(f), 1); res(f); }};
    c.waiters.push(w); setTimeout(() => { c.waiters = c.waiters.filter(x => x !== w); res(null); }, ms || 3000); });
}
function send(c, type, data) { c.ws.send(JSON.stringify({type, data})); }
const is = (t, f2) => f => f.type == t && (!f2 || f2(f.data));
const sleep = ms => new Promise(r => setTimeout(r, ms));
function closed(c, ms) { return new Promise(res => { if (c.closed) return res(c.closed);
  c.ws.on('close', () => res(c.closed)); setTimeout(() => res(null), ms); }); }
""" % json.dumps(SECRET)


def rt_env(port, **extra):
    env = {"PORT": str(port), "HOST": "127.0.0.1", "JWT_SECRET": SECRET, "DATABASE_URL": DATABASE_URL,
           "AMQP_URL": AMQP_URL, "LOG_LEVEL": "info"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Realtime(Service):
    def __init__(self, port=None, **extra):
        self.port = port or free_port()
        super().__init__("realtime", rt_env(self.port, **extra), health="http://127.0.0.1:%d/health" % self.port,
                         health_status=200)
        self.url = "ws://127.0.0.1:%d/ws" % self.port
        self.base = "http://127.0.0.1:%d" % self.port


def metric(base, name):
    _, _, body = http("GET", base + "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


def metric_exact(base, series):
    """The value of one series, labels included (`name{a="b"}`), 0 when absent."""
    _, _, body = http("GET", base + "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


RTCLIENT = os.path.join(ROOT, os.environ.get("O", "build"), "tests", "drivers", "rtclient")
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
RFC3339_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"


class RtClient:
    """drivers/rtclient.c, the C client, as a scripted peer: send() writes a
    frame to its stdin, next() waits for a line it printed (a server frame,
    or an event such as {"close": ...}). `head` is its first line: {"open":
    ...} or {"refused": {"status", "body"}}."""

    def __init__(self, port, path, headers=(), protocols=None, no_pong=False, timeout=60):
        import queue
        import threading
        args = [RTCLIENT]
        for h in headers:
            args += ["-H", h]
        if protocols:
            args += ["-P", protocols]
        if no_pong:
            args.append("-n")
        args += ["-t", str(timeout), str(port), path]
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.q, self.backlog = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()
        self.head = self.q.get(timeout=10)
        if self.head is None:
            raise AssertionError("rtclient ended at once: %s" % self.p.stderr.read())

    def _read(self):
        # This thread alone reads and closes stdout (closing it from another
        # thread while a read waits would race with that read).
        with self.p.stdout:
            for line in self.p.stdout:
                try:
                    self.q.put(json.loads(line))
                except ValueError:
                    self.q.put({"unparsed": line})
        self.q.put(None)

    def send(self, type_, data=None):
        self.line(json.dumps({"type": type_, "data": data}))

    def line(self, text):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def next(self, pred=lambda f: True, timeout=5):
        """The first line (kept back or to come) pred accepts, else None."""
        import queue
        for f in self.backlog:
            if pred(f):
                self.backlog.remove(f)
                return f
        deadline = time.monotonic() + timeout
        while True:
            try:
                f = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if f is None:
                self.q.put(None)
                return None
            if pred(f):
                return f
            self.backlog.append(f)
            if time.monotonic() >= deadline:
                return None

    def frame(self, type_, pred=lambda d: True, timeout=5):
        """The data of the next server frame of that type that pred accepts."""
        f = self.next(lambda f: f.get("type") == type_ and pred(f.get("data")), timeout)
        return f["data"] if f else None

    def frames(self):
        """Every line kept back so far (and taken from what came)."""
        import queue
        while True:
            try:
                f = self.q.get_nowait()
            except queue.Empty:
                return list(self.backlog)
            if f is None:
                self.q.put(None)
                return list(self.backlog)
            self.backlog.append(f)

    def finish(self, timeout=10):
        """Closes stdin (a close 1000 goes out) and returns the exit status."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            return self.p.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        for f in (self.p.stdin, self.p.stderr):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        return False


class LocalTest(unittest.TestCase):
    """One instance without Redis."""

    @classmethod
    def setUpClass(cls):
        cls.rt = Realtime(RATE_LIMIT_PER_SECOND=50, RATE_LIMIT_BURST=50, HEARTBEAT_INTERVAL="1s",
                          CLIENT_TIMEOUT="3s")
        cls.rt.start()

    @classmethod
    def tearDownClass(cls):
        cls.rt.stop()

    def run_js(self, body, timeout=60):
        return node("const URL = %s;\n(async () => {\n%s\n})().catch(e => { console.error(e); process.exit(1); });"
                    % (json.dumps(self.rt.url), body), timeout)

    def test_every_frame_type(self):
        r = self.run_js(r"""
const a = await connect(URL + '?token=' + tok({sub: 'alice'}));
const b = await connect(URL + '?token=' + tok({user_id: 'bob', sub: 'ignored'}));
const out = {};
out.connected = a.frames.length == 0;
send(a, 'Ping', {timestamp: 12345}); out.pong = (await next(a, is('Pong'))).data;
send(a, 'Subscribe', {topics: ['news', 'sport']}); out.sub = (await next(a, is('Status'))).data;
send(b, 'Subscribe', {topics: ['news']}); await next(b, is('Status'));
send(b, 'Broadcast', {topic: 'news', payload: {headline: 'x'}});
out.ack = (await next(b, is('Ack'))).data;
out.bcast_a = (await next(a, is('Broadcast'))).data;
out.bcast_b = (await next(b, is('Broadcast'))).data;
send(a, 'Unsubscribe', {topics: ['news']}); out.unsub = (await next(a, is('Status'))).data;
send(b, 'Broadcast', {topic: 'news', payload: 2}); await next(b, is('Broadcast')); await next(b, is('Ack'));
out.after_unsub = await next(a, is('Broadcast'), 300);
const a2 = await connect(URL + '?token=' + tok({sub: 'alice'}));
send(b, 'DirectMessage', {target_user: 'alice', payload: {hi: 1}});
out.dm_ack = (await next(b, is('Ack', d => d.message_id.startsWith('direct_')))).data;
out.dm1 = (await next(a, is('DirectMessage'))).data; out.dm2 = (await next(a2, is('DirectMessage'))).data;
send(b, 'DirectMessage', {target_user: 'nobody', payload: 1}); out.dm404 = (await next(b, is('Error'))).data;
send(a, 'JoinRoom', {room: 'lobby'}); out.joined = (await next(a, is('Status'))).data;
out.pres_self = (await next(a, is('PresenceUpdate'))).data;
send(b, 'JoinRoom', {room: 'lobby'}); await next(b, is('Status'));
out.pres_b = (await next(a, is('PresenceUpdate', d => d.user_id == 'bob'))).data;
send(b, 'RoomMessage', {room: 'lobby', payload: 'hello room'});
out.room_ack = (await next(b, is('Ack', d => d.message_id.startsWith('room_')))).data; out.room = (await next(a, is('RoomMessage'))).data;
send(a, 'UpdatePresence', {status: 'busy', message: 'meeting'}); out.presence_status = (await next(a, is('Status'))).data;
out.pres_busy = (await next(b, is('PresenceUpdate', d => d.user_id == 'alice' && d.status == 'busy'))).data;
send(b, 'GetPresence', {room: 'lobby'}); out.presence = (await next(b, is('Presence'))).data;
send(b, 'LeaveRoom', {room: 'lobby'}); out.left = (await next(b, is('Status'))).data;
out.pres_left = (await next(a, is('PresenceUpdate', d => d.user_id == 'bob' && d.status == 'offline'))).data;
a.ws.send(Buffer.from([1, 2, 3, 4])); out.binary = (await next(a, is('Status'))).data;
send(a, 'RefreshToken', {token: tok({sub: 'alice'}, 120)}); out.refreshed = (await next(a, is('Status'))).data;
send(a, 'Nonsense', {}); out.unknown = (await next(a, is('Error'))).data;
console.log(JSON.stringify(out)); process.exit(0);
""")
        self.assertEqual(r["pong"], {"timestamp": 12345})
        self.assertEqual(r["sub"], {"status": "subscribed", "details": {"topics": ["news", "sport"]}})
        mid = r["ack"]["message_id"]
        self.assertRegex(mid, r"^broadcast_[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
        for k in ("bcast_a", "bcast_b"):
            d = r[k]
            self.assertEqual((d["topic"], d["payload"], d["from"], d["message_id"]),
                             ("news", {"headline": "x"}, "bob", mid))
            self.assertRegex(d["timestamp"], r"^\d{4}-\d\d-\d\dT")
        self.assertEqual(r["unsub"]["status"], "unsubscribed")
        self.assertIsNone(r["after_unsub"])
        self.assertRegex(r["dm_ack"]["message_id"], "^direct_")
        for k in ("dm1", "dm2"):
            self.assertEqual((r[k]["from"], r[k]["payload"], r[k]["message_id"]),
                             ("bob", {"hi": 1}, r["dm_ack"]["message_id"]))
        self.assertEqual(r["dm404"], {"code": 404, "message": "User nobody not found or not connected"})
        self.assertEqual(r["joined"], {"status": "joined", "details": {"room": "lobby"}})
        self.assertEqual((r["pres_self"]["room"], r["pres_self"]["user_id"], r["pres_self"]["status"]),
                         ("lobby", "alice", "online"))
        self.assertEqual(r["pres_b"]["status"], "online")
        self.assertRegex(r["room_ack"]["message_id"], "^room_")
        self.assertEqual((r["room"]["room"], r["room"]["from"], r["room"]["payload"]), ("lobby", "bob", "hello room"))
        self.assertEqual(r["presence_status"]["status"], "presence_updated")
        self.assertEqual(r["pres_busy"]["room"], "lobby")
        self.assertEqual(r["presence"]["room"], "lobby")
        self.assertEqual(sorted((u["user_id"], u["status"]) for u in r["presence"]["users"]),
                         [("alice", "busy"), ("bob", "online")])
        self.assertEqual(r["left"]["status"], "left")
        self.assertEqual(r["binary"], {"status": "binary_received", "details": {"size": 4}})
        self.assertEqual(r["refreshed"]["status"], "token_refreshed")
        self.assertEqual(r["unknown"]["code"], 400)

    def test_one_user_many_connections_in_a_room(self):
        """Three connections of one user in a room: the room hears the user
        come online once, GetPresence lists the user once, and offline comes
        only when the last of them leaves."""
        r = self.run_js(r"""
const out = {};
const w = await connect(URL + '?token=' + tok({sub: 'watcher'}));
send(w, 'JoinRoom', {room: 'many'}); await next(w, is('Status'));
const cs = [];
for (let i = 0; i < 3; i++) { const c = await connect(URL + '?token=' + tok({sub: 'trio'}));
  send(c, 'JoinRoom', {room: 'many'}); await next(c, is('Status')); cs.push(c); }
await sleep(300);
out.online = w.frames.filter(f => f.type == 'PresenceUpdate' && f.data.user_id == 'trio').map(f => f.data.status);
send(w, 'GetPresence', {room: 'many'}); out.users = (await next(w, is('Presence'))).data.users.map(u => u.user_id).sort();
send(cs[0], 'LeaveRoom', {room: 'many'}); await next(cs[0], is('Status'));
cs[1].ws.close(); await sleep(300);
out.after_two = w.frames.filter(f => f.type == 'PresenceUpdate' && f.data.user_id == 'trio').map(f => f.data.status);
w.frames.length = 0;
send(cs[2], 'LeaveRoom', {room: 'many'}); await next(cs[2], is('Status'));
out.last = (await next(w, is('PresenceUpdate', d => d.user_id == 'trio'))).data.status;
console.log(JSON.stringify(out)); process.exit(0);
""")
        self.assertEqual(r["online"], ["online"])
        self.assertEqual(r["users"], ["trio", "watcher"])
        self.assertEqual(r["after_two"], ["online"])
        self.assertEqual(r["last"], "offline")

    def test_refresh_with_a_narrower_claim_drops_what_it_no_longer_allows(self):
        r = self.run_js(r"""
const out = {};
const c = await connect(URL + '?token=' + tok({sub: 'nora', topics: ['news', 'sport', 'private:club']}));
send(c, 'Subscribe', {topics: ['news', 'sport']}); await next(c, is('Status'));
send(c, 'JoinRoom', {room: 'private:club'}); out.joined = (await next(c, is('Status'))).data.status;
send(c, 'JoinRoom', {room: 'open'}); await next(c, is('Status'));
send(c, 'RefreshToken', {token: tok({sub: 'nora', topics: ['news']})});
out.refreshed = (await next(c, is('Status', d => d.status == 'token_refreshed'))).data.status;
out.unsub = (await next(c, is('Status', d => d.status == 'unsubscribed'))).data.details;
out.left = (await next(c, is('Status', d => d.status == 'left'))).data.details;
const p = await connect(URL + '?token=' + tok({sub: 'pub'}));
send(p, 'Broadcast', {topic: 'sport', payload: 's'}); send(p, 'Broadcast', {topic: 'news', payload: 'n'});
out.got = (await next(c, is('Broadcast'))).data.topic;
await sleep(200); out.more = c.frames.filter(f => f.type == 'Broadcast').length;
send(c, 'DirectMessage', {target_user: 41.5, payload: 'x'}); out.fraction = (await next(c, is('Error'))).data.code;
console.log(JSON.stringify(out)); process.exit(0);
""")
        self.assertEqual(r["joined"], "joined")
        self.assertEqual(r["refreshed"], "token_refreshed")
        self.assertEqual(r["unsub"], {"topics": ["sport"]})
        self.assertEqual(r["left"], {"room": "private:club"})
        self.assertEqual((r["got"], r["more"]), ("news", 0))
        self.assertEqual(r["fraction"], 400)

    def test_token_sources_and_refusals(self):
        r = self.run_js(r"""
const out = {};
const t = tok({sub: 'carol'});
out.query = !!(await connect(URL + '?token=' + t)).ws;
out.access_token = !!(await connect(URL + '?access_token=' + t)).ws;
out.bearer = !!(await connect(URL, [], {Authorization: 'Bearer ' + t})).ws;
const p = await connect(URL, ['access_token.' + t]); out.subproto = p.ws && p.ws.protocol == 'access_token.' + t;
out.missing = await connect(URL);
out.bad = await connect(URL + '?token=' + t.slice(0, -3) + 'AAA');
out.expired = await connect(URL + '?token=' + jwt.sign({sub: 'carol', exp: Math.floor(Date.now() / 1000) - 10}, SECRET));
out.other_secret = await connect(URL + '?token=' + jwt.sign({sub: 'carol'}, 'nope', {expiresIn: 60}));
console.log(JSON.stringify(out)); process.exit(0);
""")
        self.assertTrue(r["query"] and r["access_token"] and r["bearer"] and r["subproto"])
        for k in ("missing", "bad", "expired", "other_secret"):
            self.assertEqual(r[k]["refused"], 401, k)
            self.assertEqual(json.loads(r[k]["body"])["error"], "unauthorized")

    def test_token_numbers_user_ids_and_far_expiry(self):
        r = self.run_js(r"""
const out = {};
out.fraction = await connect(URL + '?token=' + tok({user_id: 1.5}));
out.huge = await connect(URL + '?token=' + tok({user_id: 1234567890123456789}));
const n = await connect(URL + '?token=' + tok({user_id: 77}));
send(n, 'Subscribe', {topics: ['user:77']}); out.own = (await next(n, is('Status'))).data;
const far = await connect(URL + '?token=' + jwt.sign({sub: 'methuselah', exp: 1e16}, SECRET));
await sleep(1500);
send(far, 'Ping', {timestamp: 3}); out.far_pong = (await next(far, is('Pong'))).data;
out.far_closed = far.closed;
console.log(JSON.stringify(out)); process.exit(0);
""")
        # A number names a user only when it is an exact integer a double
        # holds: 1.5 printed as "2", or 2^60 rounded, would be someone else.
        self.assertEqual(r["fraction"]["refused"], 401)
        self.assertEqual(r["huge"]["refused"], 401)
        self.assertEqual(r["own"]["status"], "subscribed")
        # An exp past what milliseconds in 64 bits hold is clamped, not
        # overflowed into the past (which closed with 4001 within a second).
        self.assertEqual(r["far_pong"], {"timestamp": 3})
        self.assertIsNone(r["far_closed"])

    def test_refresh_extends_and_expiry_closes_4001(self):
        r = self.run_js(r"""
const now = Math.floor(Date.now() / 1000);
const a = await connect(URL + '?token=' + jwt.sign({sub: 'dave', exp: now + 2}, SECRET));
const b = await connect(URL + '?token=' + jwt.sign({sub: 'dave', exp: now + 2}, SECRET));
send(b, 'RefreshToken', {token: jwt.sign({sub: 'dave', exp: now + 60}, SECRET)});
const st = (await next(b, is('Status'))).data;
send(b, 'RefreshToken', {token: jwt.sign({sub: 'eve', exp: now + 60}, SECRET)});
const other = (await next(b, is('Error'))).data;
const ca = await closed(a, 6000);
send(b, 'Ping', {timestamp: 1}); const alive = !!(await next(b, is('Pong')));
console.log(JSON.stringify({st, other, ca, alive, bclosed: b.closed})); process.exit(0);
""")
        self.assertEqual(r["st"]["status"], "token_refreshed")
        self.assertEqual(r["other"]["code"], 403)
        self.assertEqual(r["ca"], {"code": 4001, "reason": "Token expired"})
        self.assertTrue(r["alive"])
        self.assertIsNone(r["bclosed"])

    def test_signed_out_everywhere_refused(self):
        """users.tokens_valid_after (the gateway's logout-all) and is_active
        count at the handshake and on RefreshToken, and a change made in SQL
        reaches a running instance through the user_tokens notification."""
        import psycopg2
        uid = "rt-revoked-" + uuid.uuid4().hex[:12]
        t0 = int(time.time()) - 100
        db = psycopg2.connect(DATABASE_URL)
        db.autocommit = True
        try:
            with db.cursor() as c:
                c.execute("INSERT INTO users (id, username, email, password_hash, tokens_valid_after) "
                          "VALUES (%s, %s, %s, 'x', to_timestamp(%s))", (uid, uid, uid + "@x", t0))
            js = r"""
const U = %s, T0 = %d, out = {};
const old = jwt.sign({sub: U, iat: T0 - 10}, SECRET, {expiresIn: 600});
const fresh = jwt.sign({sub: U, iat: T0 + 10}, SECRET, {expiresIn: 600});
out.old = await connect(URL + '?token=' + old);
out.same_second = await connect(URL + '?token=' + jwt.sign({sub: U, iat: T0}, SECRET, {expiresIn: 600}));
const c = await connect(URL + '?token=' + fresh);
out.fresh = !!c.ws;
send(c, 'RefreshToken', {token: old}); out.refresh_old = (await next(c, is('Error'))).data;
send(c, 'RefreshToken', {token: fresh}); out.refresh_fresh = (await next(c, is('Status'))).data.status;
console.log(JSON.stringify(out)); process.exit(0);
""" % (json.dumps(uid), t0)
            r = self.run_js(js)
            for k in ("old", "same_second"):
                self.assertEqual(r[k]["refused"], 401, k)
                body = json.loads(r[k]["body"])
                self.assertEqual(body["error"], "unauthorized")
                self.assertIn("revoked", body["message"])
            self.assertTrue(r["fresh"])
            self.assertEqual(r["refresh_old"]["code"], 401)
            self.assertIn("revoked", r["refresh_old"]["message"])
            self.assertEqual(r["refresh_fresh"], "token_refreshed")

            probe = r"""
const t = jwt.sign({sub: %s, iat: %d}, SECRET, {expiresIn: 600});
const c = await connect(URL + '?token=' + t);
console.log(JSON.stringify(c.ws ? {ok: true} : {refused: c.refused, body: JSON.parse(c.body)})); process.exit(0);
""" % (json.dumps(uid), t0 + 10)
            # Sign out everywhere now, in SQL: the token accepted above (and
            # cached as good) is refused once the notification arrives.
            with db.cursor() as c:
                c.execute("UPDATE users SET tokens_valid_after = now() WHERE id = %s", (uid,))
            r = wait_for(lambda: (lambda x: x if x.get("refused") else None)(self.run_js(probe)), timeout=15,
                         what="the fresh token refused after logout-all")
            self.assertEqual(r["refused"], 401)
            self.assertIn("revoked", r["body"]["message"])
            with db.cursor() as c:
                c.execute("UPDATE users SET tokens_valid_after = NULL, is_active = false WHERE id = %s", (uid,))
            r = wait_for(lambda: (lambda x: x if x.get("refused") and "deactivated" in x["body"]["message"] else None)(
                self.run_js(probe)), timeout=15, what="the token refused once the account is deactivated")
            self.assertEqual(r["refused"], 401)
            self.assertGreater(metric(self.rt.base, "realtime_token_state_reads_total"), 0)
        finally:
            with db.cursor() as c:
                c.execute("DELETE FROM users WHERE id = %s", (uid,))
            db.close()

    def test_permissions(self):
        r = self.run_js(r"""
const out = {};
const a = await connect(URL + '?token=' + tok({sub: 'frank', topics: ['orders.*', 'news', 'private:team']}));
send(a, 'Subscribe', {topics: ['user:frank', 'user:grace', 'orders.eu', 'sport', 'news']});
out.e1 = (await next(a, is('Error'))).data; out.e2 = (await next(a, is('Error'))).data;
out.st = (await next(a, is('Status'))).data;
send(a, 'JoinRoom', {room: 'private:team'}); out.join_ok = (await next(a, f => f.type == 'Status' || f.type == 'Error')).data;
send(a, 'JoinRoom', {room: 'private:other'}); out.join_no = (await next(a, is('Error'))).data;
send(a, 'Broadcast', {topic: 'user:grace', payload: 1}); out.pub_no = (await next(a, is('Error'))).data;
const g = await connect(URL + '?token=' + tok({sub: 'grace'}));
send(g, 'JoinRoom', {room: 'private:team'}); out.noclaim = (await next(g, is('Error'))).data;
send(g, 'JoinRoom', {room: 'public'}); out.public = (await next(g, is('Status'))).data;
console.log(JSON.stringify(out)); process.exit(0);
""")
        self.assertEqual(sorted([r["e1"]["code"], r["e2"]["code"]]), [403, 403])
        self.assertEqual(sorted([r["e1"]["message"], r["e2"]["message"]]),
                         ["Not allowed to subscribe to sport", "Not allowed to subscribe to user:grace"])
        self.assertEqual(r["st"]["details"]["topics"], ["user:frank", "orders.eu", "news"])
        self.assertEqual(r["join_ok"]["status"], "joined")
        self.assertEqual(r["join_no"]["code"], 403)
        self.assertEqual(r["pub_no"]["code"], 403)
        self.assertEqual(r["noclaim"]["code"], 403)
        self.assertEqual(r["public"]["status"], "joined")

    def test_bad_and_oversize_frames_keep_the_connection(self):
        r = self.run_js(r"""
const a = await connect(URL + '?token=' + tok({sub: 'henry'}));
const out = {};
a.ws.send('{not json'); out.bad = (await next(a, is('Error'))).data;
a.ws.send(JSON.stringify({type: 'Subscribe', data: {topics: 'x'}})); out.shape = (await next(a, is('Error'))).data;
a.ws.send('x'.repeat(70000)); out.big = (await next(a, is('Error'))).data;
a.ws.send(Buffer.from('{"type":"Ping","data":{"x":"\xff"}}', 'latin1'), {binary: false});
out.utf8 = (await next(a, is('Error'))).data;
send(a, 'a'.repeat(63) + '\u00e9', {}); out.unknown = (await next(a, is('Error'))).data;
send(a, 'Ping', {timestamp: 7}); out.pong = (await next(a, is('Pong'))).data;
out.closed = a.closed;
console.log(JSON.stringify(out)); process.exit(0);
""")
        self.assertEqual(r["bad"]["code"], 400)
        # Not UTF-8: refused to its sender, who stays connected; the echo
        # of an unknown type is cut on a character boundary (a cut inside
        # the two bytes of e-acute made the Error frame itself invalid).
        self.assertEqual(r["utf8"], {"code": 400, "message": "Frame text is not valid UTF-8"})
        self.assertEqual(r["unknown"], {"code": 400, "message": "Unknown message type " + "a" * 63})
        self.assertIsNone(r["closed"])
        self.assertEqual(r["shape"]["code"], 400)
        self.assertEqual(r["big"]["code"], 400)
        self.assertIn("70000", r["big"]["message"])
        self.assertEqual(r["pong"], {"timestamp": 7})

    def test_rate_limit_429(self):
        before = metric(self.rt.base, "realtime_rate_limited_total")
        r = self.run_js(r"""
const a = await connect(URL + '?token=' + tok({sub: 'ivy'}));
for (let i = 0; i < 120; i++) send(a, 'Ping', {timestamp: i});
const e = await next(a, is('Error'));
await sleep(1200);
send(a, 'Ping', {timestamp: 'later'}); const later = await next(a, is('Pong', d => d.timestamp == 'later'));
console.log(JSON.stringify({e: e.data, later: !!later})); process.exit(0);
""")
        self.assertEqual(r["e"], {"code": 429, "message": "Rate limit exceeded"})
        self.assertTrue(r["later"])
        self.assertGreater(metric(self.rt.base, "realtime_rate_limited_total"), before)

    def test_heartbeat_json_ping_and_dead_peer_closed(self):
        r = self.run_js(r"""
const a = await connect(URL + '?token=' + tok({sub: 'jack'}));
const ping = await next(a, is('Ping'), 2500);
await sleep(3500);
console.log(JSON.stringify({ping: ping && ping.data, open: !a.closed})); process.exit(0);
""")
        self.assertIsInstance(r["ping"]["timestamp"], (int, float))
        self.assertTrue(r["open"], "a client that answers pings stays")
        # A peer that never answers (nor sends anything) is closed.
        s = wsraw.connect(self.rt.port, "/ws?token=" + sign({"sub": "kate"}))
        s.settimeout(10)
        start = time.monotonic()
        data = recv_to_close(s)
        self.assertLess(time.monotonic() - start, 9)
        self.assertIn(b"Client timeout", data)
        s.close()

    def test_health_info_metrics_promtool(self):
        status, _, body = http_json("GET", self.rt.base + "/health")
        self.assertEqual(status, 200)
        self.assertEqual(body["status"], "healthy")
        for k in ("active_connections", "max_connections", "uptime_seconds"):
            self.assertIn(k, body)
        status, _, info = http_json("GET", self.rt.base + "/info")
        self.assertEqual((info["version"], info["redis"]), ("0.2.0", "disabled"))
        self.assertEqual(info["limits"]["max_frame_bytes"], 65536)
        self.assertTrue(info["instance_id"])
        _, _, text = http("GET", self.rt.base + "/metrics")
        for name in (b"realtime_frames_in_total", b"realtime_frames_out_total", b"realtime_deliveries_total",
                     b"wsapp_websocket_dropped_slow_total", b"realtime_rate_limited_total",
                     b"realtime_bytes_per_connection", b"wsapp_websocket_connections"):
            self.assertIn(name, text)
        p = subprocess.run([need("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)


def sign(claims, exp=60, secret=SECRET):
    """HS256 by hand, so the raw-socket and C-client tests need no node.
    `exp` is seconds from now (negative: already expired)."""
    import hashlib
    import hmac

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    claims = dict(claims, exp=int(time.time()) + exp)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest())


class LimitsTest(unittest.TestCase):
    def test_max_connections_503_and_health(self):
        with Realtime(MAX_CONNECTIONS=2) as rt:
            r = node("""(async () => {
const t = tok({sub: 'x'}); const a = await connect(%(u)s + '?token=' + t); const b = await connect(%(u)s + '?token=' + t);
const c = await connect(%(u)s + '?token=' + t);
const health = await new Promise(res => require('http').get(%(h)s, r => { let b = ''; r.on('data', d => b += d);
  r.on('end', () => res({status: r.statusCode, body: JSON.parse(b)})); }));
console.log(JSON.stringify({c, health})); process.exit(0); })();""" % {"u": json.dumps(rt.url), "h": json.dumps(rt.base + "/health")})
            self.assertEqual(r["c"]["refused"], 503)
            self.assertEqual(json.loads(r["c"]["body"]), {"error": "Server at capacity"})
            self.assertEqual(r["health"]["status"], 503)
            self.assertEqual((r["health"]["body"]["status"], r["health"]["body"]["reason"]), ("unhealthy", "At capacity"))
            self.assertEqual(r["health"]["body"]["active_connections"], 2)

    def test_max_connections_per_user_429(self):
        """One user's token cannot take every slot: past
        MAX_CONNECTIONS_PER_USER its handshakes get 429, other users still
        connect, and a closed connection frees its slot."""
        with Realtime(MAX_CONNECTIONS_PER_USER=2) as rt:
            r = node("""(async () => {
const u = %(u)s + '?token=';
const a = await connect(u + tok({sub: 'hog'})), b = await connect(u + tok({sub: 'hog'}));
const third = await connect(u + tok({sub: 'hog'}));
const other = await connect(u + tok({sub: 'someone-else'}));
a.ws.close(); await closed(a, 3000); await sleep(200);
const again = await connect(u + tok({sub: 'hog'}));
console.log(JSON.stringify({third, other: !!other.hello, again: !!again.hello})); process.exit(0); })();""" % {
                "u": json.dumps(rt.url)})
            self.assertEqual(r["third"]["refused"], 429)
            body = json.loads(r["third"]["body"])
            self.assertEqual((body["error"], body["message"]),
                             ("too_many_connections", "too many connections for this user"))
            self.assertTrue(r["other"])
            self.assertTrue(r["again"])
            self.assertEqual(metric(rt.base, "realtime_user_connection_refusals_total"), 1)
            _, _, info = http("GET", rt.base + "/info")
            self.assertEqual(json.loads(info)["limits"]["max_connections_per_user"], 2)

    def test_max_connections_counts_only_ws(self):
        """MAX_CONNECTIONS is SPEC 5a's limit of /ws: execution streams on
        /rt (the same port) neither take /ws places nor make /health report
        the service at capacity."""
        with Realtime(MAX_CONNECTIONS=2, RTES_SKIP_AUTH=1) as rt:
            watchers = [RtClient(rt.port, "/rt?execution_id=cap-%s" % uuid.uuid4().hex) for _ in range(3)]
            try:
                for w in watchers:
                    self.assertIn("open", w.head, w.head)
                status, _, body = http_json("GET", rt.base + "/health")
                self.assertEqual((status, body["active_connections"]), (200, 0), body)
                a, b = (RtClient(rt.port, "/ws?token=" + sign({"sub": "cap%d" % i})) for i in range(2))
                with a, b:
                    self.assertIn("open", a.head, a.head)
                    self.assertIn("open", b.head, b.head)
                    with RtClient(rt.port, "/ws?token=" + sign({"sub": "cap3"})) as c:
                        self.assertEqual(c.head["refused"]["status"], 503)
                        self.assertEqual(json.loads(c.head["refused"]["body"]), {"error": "Server at capacity"})
                    status, _, body = http_json("GET", rt.base + "/health")
                    self.assertEqual((status, body["active_connections"], body["reason"]), (503, 2, "At capacity"))
                    self.assertEqual(http_json("GET", rt.base + "/info")[2]["active_connections"], 2)
                # Closed /ws connections give their places back.
                wait_for(lambda: http_json("GET", rt.base + "/health")[2]["active_connections"] == 0,
                         what="the /ws count back to 0")
                with RtClient(rt.port, "/ws?token=" + sign({"sub": "cap4"})) as d:
                    self.assertIn("open", d.head, d.head)
            finally:
                for w in watchers:
                    w.kill()

    def test_user_and_global_token_buckets_429(self):
        """Each of the three buckets refuses on its own: with the connection's
        bucket large, two connections of one user empty the user's bucket
        (another user still gets through); with the user's large too, two
        users empty the global one."""
        def burst(rt, clients, n):
            for c in clients:
                for i in range(n):
                    c.send("Ping", {"timestamp": i})
            out = {"Pong": 0, "Error": 0}
            for c in clients:
                for _ in range(n):
                    f = c.next(lambda f: f.get("type") in ("Pong", "Error"))
                    self.assertIsNotNone(f)
                    if f["type"] == "Error":
                        self.assertEqual(f["data"], {"code": 429, "message": "Rate limit exceeded"})
                    out[f["type"]] += 1
            return out

        def scopes(rt):
            return {k: metric_exact(rt.base, 'realtime_rate_limited_total{scope="%s"}' % k)
                    for k in ("connection", "user", "global")}

        big = {"RATE_LIMIT_PER_SECOND": 1000, "RATE_LIMIT_BURST": 1000}
        with Realtime(RATE_LIMIT_USER_PER_SECOND=1, RATE_LIMIT_USER_BURST=10, **big) as rt:
            ca, cb, other = (RtClient(rt.port, "/ws?token=" + sign({"sub": u})) for u in ("uma", "uma", "vic"))
            with ca, cb, other:
                t0 = time.monotonic()
                got = burst(rt, [ca, cb], 8)
                # The burst of 10, and one a second refilled while the frames went.
                self.assertLessEqual(got["Pong"], 10 + 1 + int(time.monotonic() - t0), got)
                self.assertEqual(got["Error"], 16 - got["Pong"], got)
                self.assertGreater(got["Error"], 0, got)
                self.assertEqual(burst(rt, [other], 5), {"Pong": 5, "Error": 0})
                sc = scopes(rt)
                self.assertEqual((sc["connection"], sc["global"]), (0, 0), sc)
                self.assertEqual(sc["user"], got["Error"], sc)
        with Realtime(RATE_LIMIT_USER_PER_SECOND=1000, RATE_LIMIT_USER_BURST=1000, RATE_LIMIT_GLOBAL_PER_SECOND=1,
                      RATE_LIMIT_GLOBAL_BURST=10, **big) as rt:
            g1, g2 = (RtClient(rt.port, "/ws?token=" + sign({"sub": u})) for u in ("gus", "gia"))
            with g1, g2:
                got = burst(rt, [g1, g2], 8)
                self.assertGreaterEqual(got["Error"], 4, got)
                sc = scopes(rt)
                self.assertEqual((sc["connection"], sc["user"]), (0, 0), sc)
                self.assertEqual(sc["global"], got["Error"], sc)

    def test_slow_reader_dropped_others_keep_receiving(self):
        with Realtime(SEND_QUEUE_BYTES=1048576, RATE_LIMIT_ENABLED="false") as rt:
            slow = wsraw.connect(rt.port, "/ws?token=" + sign({"sub": "slow"}))
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            wsraw.send_text(slow, json.dumps({"type": "Subscribe", "data": {"topics": ["firehose"]}}))
            time.sleep(0.3)
            r = node("""(async () => {
const pub = await connect(%(u)s + '?token=' + tok({sub: 'pub'}));
const fast = await connect(%(u)s + '?token=' + tok({sub: 'fast'}));
send(fast, 'Subscribe', {topics: ['firehose']}); await next(fast, is('Status'));
let got = 0; fast.ws.on('message', d => { if (JSON.parse(d).type == 'Broadcast') got++; });
const big = 'x'.repeat(4000);
for (let i = 0; i < 3000; i++) { send(pub, 'Broadcast', {topic: 'firehose', payload: big}); if (i %% 50 == 49) await sleep(5); }
const t0 = Date.now(); while (got < 3000 && Date.now() - t0 < 30000) await sleep(50);
console.log(JSON.stringify({got})); process.exit(0); })();""" % {"u": json.dumps(rt.url)}, timeout=90)
            self.assertEqual(r["got"], 3000)
            wait_for(lambda: metric(rt.base, "wsapp_websocket_dropped_slow_total") >= 1, timeout=10,
                     what="the slow reader dropped")
            slow.close()


    def test_timed_out_peer_that_stopped_reading_is_dropped(self):
        """The client-timeout close waits behind frames the peer never takes
        (it stopped reading with a full window): the connection must still
        go, and give back its place, within the close's grace."""
        with Realtime(SEND_QUEUE_BYTES=64 << 20, RATE_LIMIT_ENABLED="false", HEARTBEAT_INTERVAL="1s",
                      CLIENT_TIMEOUT="2s") as rt:
            mute = wsraw.connect(rt.port, "/ws?token=" + sign({"sub": "mute"}))
            mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            wsraw.send_text(mute, json.dumps({"type": "Subscribe", "data": {"topics": ["flood"]}}))
            time.sleep(0.3)
            r = node("""(async () => {
const pub = await connect(%(u)s + '?token=' + tok({sub: 'pub'}));
const big = 'y'.repeat(60000);
for (let i = 0; i < 200; i++) { send(pub, 'Broadcast', {topic: 'flood', payload: big}); if (i %% 20 == 19) await sleep(5); }
await sleep(300); console.log(JSON.stringify({sent: 200})); process.exit(0); })();""" % {"u": json.dumps(rt.url)},
                     timeout=60)
            self.assertEqual(r["sent"], 200)
            t0 = time.time()
            wait_for(lambda: http_json("GET", rt.base + "/health")[2]["active_connections"] == 0, timeout=25,
                     what="the mute peer dropped")
            self.assertLess(time.time() - t0, 20)
            self.assertEqual(metric(rt.base, "wsapp_websocket_dropped_slow_total"), 0)
            mute.close()


def children(pid):
    """The pids whose parent is `pid` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    # The field after the command's closing parenthesis: state, then ppid.
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


class HungDatabaseTest(unittest.TestCase):
    def test_hung_database_costs_the_loop_one_timeout_a_second(self):
        """The token-state read at the handshake runs on the loop, bounded
        to 500 ms; with the database hung (every PostgreSQL process stopped),
        a read that timed out makes the handshakes of the next second
        answer 503 at once instead of each waiting out its own timeout."""
        from pgtmp import PgTmp
        import signal
        with PgTmp() as pg:
            env = dict(os.environ, DATABASE_URL=pg.url())
            r = subprocess.run([os.path.join(BINDIR, "migrate")], env=env, capture_output=True, text=True,
                               timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr)
            with Realtime(DATABASE_URL=pg.url()) as rt:
                ok = RtClient(rt.port, "/ws?token=" + sign({"sub": "before-hang"}))
                with ok:
                    self.assertIn("open", ok.head, ok.head)
                with open(os.path.join(pg.datadir, "postmaster.pid")) as f:
                    pids = [int(f.readline())]
                pids += children(pids[0])
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    reads = metric(rt.base, "realtime_token_state_reads_total")
                    t0 = time.monotonic()
                    heads = []
                    for i in range(6):
                        with RtClient(rt.port, "/ws?token=" + sign({"sub": "hung-%d" % i})) as c:
                            heads.append(c.head)
                    took = time.monotonic() - t0
                    new_reads = metric(rt.base, "realtime_token_state_reads_total") - reads
                finally:
                    for pid in pids:
                        os.kill(pid, signal.SIGCONT)
                for h in heads:
                    self.assertEqual(h.get("refused", {}).get("status"), 503, h)
                self.assertLessEqual(new_reads, 2, "reads tried with the database hung")
                self.assertLess(took, 2.5)
                # Once it answers again, so do the handshakes.
                def opens():
                    with RtClient(rt.port, "/ws?token=" + sign({"sub": "after"})) as c:
                        return "open" in c.head
                wait_for(opens, timeout=15, what="a handshake after the database came back")


class IssuerAudienceTest(unittest.TestCase):
    def test_issuer_and_audience_checked_at_handshake_and_refresh(self):
        """With JWT_ISSUER and JWT_AUDIENCE set (the original's values), a
        token must carry both, from the handshake on and in RefreshToken;
        `aud` may be a list holding ours (RFC 7519 4.1.3)."""
        with Realtime(JWT_ISSUER="ai-system-rust", JWT_AUDIENCE="realtime-communication") as rt:
            r = node("""(async () => {
const U = %(u)s, out = {};
const good = {issuer: 'ai-system-rust', audience: 'realtime-communication', expiresIn: 60};
const s = (claims, o) => jwt.sign(claims, SECRET, Object.assign({expiresIn: 60}, o));
out.good = !!(await connect(U + '?token=' + s({sub: 'ia'}, good))).ws;
out.aud_list = !!(await connect(U + '?token=' + s({sub: 'ia', aud: ['other', 'realtime-communication']},
                                                  {issuer: 'ai-system-rust'}))).ws;
out.wrong_iss = await connect(U + '?token=' + s({sub: 'ia'}, {issuer: 'someone-else', audience: good.audience}));
out.wrong_aud = await connect(U + '?token=' + s({sub: 'ia'}, {issuer: good.issuer, audience: 'elsewhere'}));
out.no_iss = await connect(U + '?token=' + s({sub: 'ia'}, {audience: good.audience}));
out.no_aud = await connect(U + '?token=' + s({sub: 'ia'}, {issuer: good.issuer}));
const c = await connect(U + '?token=' + s({sub: 'ia'}, good));
send(c, 'RefreshToken', {token: s({sub: 'ia'}, {issuer: 'someone-else', audience: good.audience})});
out.refresh_bad = (await next(c, is('Error'))).data;
send(c, 'RefreshToken', {token: s({sub: 'ia'}, good)});
out.refresh_good = (await next(c, is('Status'))).data;
console.log(JSON.stringify(out)); process.exit(0); })();""" % {"u": json.dumps(rt.url)})
            self.assertTrue(r["good"] and r["aud_list"], r)
            for k in ("wrong_iss", "wrong_aud", "no_iss", "no_aud"):
                self.assertEqual(r[k]["refused"], 401, k)
                self.assertEqual(json.loads(r[k]["body"])["error"], "unauthorized", k)
            self.assertEqual(r["refresh_bad"]["code"], 401, r["refresh_bad"])
            self.assertEqual(r["refresh_good"]["status"], "token_refreshed")


class CClientTest(unittest.TestCase):
    """The C load client (drivers/rtload.c, also the benchmark's): 300
    authenticated connections subscribe, one more publishes 20 broadcasts;
    every subscriber gets all 20, nothing is refused."""

    def test_c_client_fan_out(self):
        load = os.path.join(ROOT, os.environ.get("O", "build"), "tests", "drivers", "rtload")
        with Realtime(RATE_LIMIT_PER_SECOND=1000, RATE_LIMIT_BURST=1000) as rt:
            r = subprocess.run([load, "-p", str(rt.port), "-n", "300", "-k", SECRET, "-t", "ctopic", "-P", "20",
                                "-r", "100", "-d", "1", "-w", "10", "-e", "20"], capture_output=True, text=True,
                               timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            out = json.loads(r.stdout)
            self.assertEqual((out["connected"], out["subscribed"], out["errors"]), (301, 301, 0), r.stderr)
            self.assertEqual(out["conns_with_all"], 300)
            self.assertEqual(out["received"], 300 * 20)
            self.assertGreaterEqual(metric(rt.base, "realtime_deliveries_total"), 6000)


class RtclientTest(unittest.TestCase):
    """The C client (drivers/rtclient.c) through every client frame type of
    SPEC 5a, the JSON Pong included, asserting every server frame type and
    its fields; each token source at the handshake; 401 for a missing, bad
    or expired token (at the handshake and on RefreshToken); 4001 at
    expiry."""

    @classmethod
    def setUpClass(cls):
        cls.rt = Realtime(HEARTBEAT_INTERVAL="1s", CLIENT_TIMEOUT="3s")
        cls.rt.start()

    @classmethod
    def tearDownClass(cls):
        cls.rt.stop()

    def client(self, claims=None, token=None, **kw):
        c = RtClient(self.rt.port, "/ws?token=" + (token or sign(claims)), **kw)
        self.addCleanup(c.kill)
        self.assertIn("open", c.head, c.head)
        return c

    def assert_timestamp(self, v):
        import calendar
        self.assertRegex(v, RFC3339_RE)
        self.assertLess(abs(calendar.timegm(time.strptime(v[:19], "%Y-%m-%dT%H:%M:%S")) - time.time()), 120, v)

    def test_status_connected(self):
        before = int(time.time())
        c = self.client({"sub": "cora"})
        self.assertEqual(c.head, {"open": {"status": 101, "protocol": None}})
        hello = c.frame("Status")
        self.assertEqual(hello["status"], "connected")
        d = hello["details"]
        self.assertEqual(set(d), {"connection_id", "server_time", "protocol_version"})
        self.assertRegex(d["connection_id"], r"^[1-9][0-9]*$")
        self.assertIsInstance(d["server_time"], int)
        self.assertTrue(before - 1 <= d["server_time"] <= time.time() + 1, d)
        self.assertEqual(d["protocol_version"], "1.0")
        other = self.client({"sub": "cora"})
        self.assertNotEqual(other.frame("Status")["details"]["connection_id"], d["connection_id"])

    def test_every_client_frame_type(self):
        a, b = self.client({"sub": "abe"}), self.client({"user_id": "bea", "sub": "ignored"})
        for c in (a, b):
            self.assertEqual(c.frame("Status")["status"], "connected")
        topic, room = "c-news-" + uuid.uuid4().hex[:6], "c-lobby-" + uuid.uuid4().hex[:6]

        a.send("Ping", {"timestamp": 12345})
        self.assertEqual(a.frame("Pong"), {"timestamp": 12345})
        a.send("Subscribe", {"topics": [topic, topic + ".2"]})
        self.assertEqual(a.frame("Status"), {"status": "subscribed", "details": {"topics": [topic, topic + ".2"]}})

        b.send("Broadcast", {"topic": topic, "payload": {"n": 1, "s": "x"}})
        ack = b.frame("Ack")
        self.assertEqual(set(ack), {"message_id"})
        self.assertRegex(ack["message_id"], "^broadcast_" + UUID_RE + "$")
        got = a.frame("Broadcast")
        self.assertEqual(set(got), {"topic", "payload", "from", "message_id", "timestamp"})
        self.assertEqual((got["topic"], got["payload"], got["from"], got["message_id"]),
                         (topic, {"n": 1, "s": "x"}, "bea", ack["message_id"]))
        self.assert_timestamp(got["timestamp"])

        a.send("Unsubscribe", {"topics": [topic]})
        self.assertEqual(a.frame("Status"), {"status": "unsubscribed", "details": {"topics": [topic]}})
        b.send("Broadcast", {"topic": topic, "payload": 2})
        b.frame("Ack")
        self.assertIsNone(a.frame("Broadcast", timeout=0.5))

        b.send("DirectMessage", {"target_user": "abe", "payload": {"hi": 1}})
        ack = b.frame("Ack")
        self.assertRegex(ack["message_id"], "^direct_" + UUID_RE + "$")
        dm = a.frame("DirectMessage")
        self.assertEqual(set(dm), {"from", "payload", "message_id", "timestamp"})
        self.assertEqual((dm["from"], dm["payload"], dm["message_id"]), ("bea", {"hi": 1}, ack["message_id"]))
        self.assert_timestamp(dm["timestamp"])
        b.send("DirectMessage", {"target_user": "nobody-here", "payload": 1})
        self.assertEqual(b.frame("Error"), {"code": 404, "message": "User nobody-here not found or not connected"})

        a.send("JoinRoom", {"room": room})
        self.assertEqual(a.frame("Status"), {"status": "joined", "details": {"room": room}})
        pu = a.frame("PresenceUpdate")
        self.assertEqual(set(pu), {"room", "user_id", "status", "last_seen"})
        self.assertEqual((pu["room"], pu["user_id"], pu["status"]), (room, "abe", "online"))
        self.assert_timestamp(pu["last_seen"])
        b.send("JoinRoom", {"room": room})
        self.assertEqual(b.frame("Status")["status"], "joined")
        self.assertEqual(a.frame("PresenceUpdate", lambda d: d["user_id"] == "bea")["status"], "online")

        b.send("RoomMessage", {"room": room, "payload": "hello room"})
        ack = b.frame("Ack")
        self.assertRegex(ack["message_id"], "^room_" + UUID_RE + "$")
        rm = a.frame("RoomMessage")
        self.assertEqual(set(rm), {"room", "from", "payload", "message_id", "timestamp"})
        self.assertEqual((rm["room"], rm["from"], rm["payload"], rm["message_id"]),
                         (room, "bea", "hello room", ack["message_id"]))
        self.assert_timestamp(rm["timestamp"])

        a.send("UpdatePresence", {"status": "away", "message": "brb"})
        self.assertEqual(a.frame("Status"), {"status": "presence_updated",
                                             "details": {"presence": "away", "message": "brb"}})
        pu = b.frame("PresenceUpdate", lambda d: d["user_id"] == "abe")
        self.assertEqual((pu["room"], pu["status"]), (room, "away"))
        self.assert_timestamp(pu["last_seen"])

        b.send("GetPresence", {"room": room})
        pres = b.frame("Presence")
        self.assertEqual(set(pres), {"room", "users"})
        self.assertEqual(pres["room"], room)
        self.assertEqual(sorted((u["user_id"], u["status"]) for u in pres["users"]), [("abe", "away"), ("bea", "online")])
        for u in pres["users"]:
            self.assertEqual(set(u), {"user_id", "status", "last_seen"})
            self.assert_timestamp(u["last_seen"])

        b.send("LeaveRoom", {"room": room})
        self.assertEqual(b.frame("Status"), {"status": "left", "details": {"room": room}})
        pu = a.frame("PresenceUpdate", lambda d: d["user_id"] == "bea")
        self.assertEqual((pu["room"], pu["status"]), (room, "offline"))

        tok = sign({"sub": "abe"}, 600)
        exp = json.loads(base64.urlsafe_b64decode(tok.split(".")[1] + "=="))["exp"]
        a.send("RefreshToken", {"token": tok})
        self.assertEqual(a.frame("Status"), {"status": "token_refreshed", "details": {"expires_at": exp}})

        a.line("!binary 5")
        self.assertEqual(a.frame("Status"), {"status": "binary_received", "details": {"size": 5}})
        a.send("Nonsense", {})
        self.assertEqual(a.frame("Error"), {"code": 400, "message": "Unknown message type Nonsense"})

        # The answer to the server's JSON heartbeat is taken quietly: the
        # Ping sent after it is answered first, with no Error before it.
        self.assertIsNotNone(a.frame("Ping", timeout=3), "a JSON heartbeat Ping within HEARTBEAT_INTERVAL")
        a.frames()
        a.backlog.clear()
        a.send("Pong", {"timestamp": 1})
        a.send("Ping", {"timestamp": "after-pong"})
        f = a.next(lambda f: f.get("type") in ("Pong", "Error"))
        self.assertEqual(f, {"type": "Pong", "data": {"timestamp": "after-pong"}})

        # UpdatePresence by a user in no room: SPEC 5a names no receiver
        # for it, so only the sender's Status comes (no room-less PresenceUpdate).
        c = self.client({"sub": "cal"})
        c.send("UpdatePresence", {"status": "busy"})
        self.assertEqual(c.frame("Status", lambda d: d["status"] != "connected"),
                         {"status": "presence_updated", "details": {"presence": "busy"}})
        self.assertIsNone(c.frame("PresenceUpdate", timeout=0.5))

        self.assertEqual(a.finish(), 0)
        self.assertEqual(a.frames()[-1], {"close": {"code": 1000, "reason": ""}})

    def test_json_pong_keeps_a_client_that_sends_nothing_else(self):
        """A client that does not answer WebSocket pings (-n) but answers
        each JSON heartbeat Ping with a JSON Pong stays past CLIENT_TIMEOUT
        (3 s here), gets no Error and no bad-frame count; one that answers
        nothing is closed 4000."""
        bad = metric(self.rt.base, "realtime_bad_frames_total")
        pongs = metric_exact(self.rt.base, 'realtime_frames_in_total{type="Pong"}')
        quiet = self.client({"sub": "quiet"}, no_pong=True)
        mute = self.client({"sub": "mute"}, no_pong=True)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            ping = quiet.frame("Ping", timeout=0.5)
            if ping:
                quiet.send("Pong", {"timestamp": ping["timestamp"]})
        self.assertEqual([f for f in quiet.frames() if f.get("type") == "Error" or "close" in f], [])
        quiet.send("Ping", {"timestamp": "alive"})
        self.assertEqual(quiet.frame("Pong"), {"timestamp": "alive"})
        self.assertEqual(mute.next(lambda f: "close" in f, timeout=3), {"close": {"code": 4000, "reason": "Client timeout"}})
        self.assertEqual(metric(self.rt.base, "realtime_bad_frames_total"), bad)
        self.assertGreaterEqual(metric_exact(self.rt.base, 'realtime_frames_in_total{type="Pong"}') - pongs, 3)

    def test_token_sources(self):
        t = sign({"sub": "toby"})
        for how, path, kw in (("query", "/ws?token=" + t, {}), ("access_token", "/ws?access_token=" + t, {}),
                              ("bearer", "/ws", {"headers": ["Authorization: Bearer " + t]}),
                              ("subprotocol", "/ws", {"protocols": "access_token." + t})):
            with RtClient(self.rt.port, path, **kw) as c:
                self.assertEqual(c.head["open"]["protocol"], "access_token." + t if how == "subprotocol" else None, how)
                self.assertEqual(c.frame("Status")["status"], "connected", how)
                c.send("Ping", {"timestamp": how})
                self.assertEqual(c.frame("Pong"), {"timestamp": how}, how)

    def test_missing_bad_and_expired_tokens_refused_401(self):
        t = sign({"sub": "rex"})
        for how, path, kw in (("missing", "/ws", {}), ("empty", "/ws?token=", {}),
                              ("bad signature", "/ws?token=" + t[:-3] + "AAA", {}),
                              ("other secret", "/ws?token=" + sign({"sub": "rex"}, secret="other"), {}),
                              ("expired", "/ws?token=" + sign({"sub": "rex"}, -10), {}),
                              ("expired bearer", "/ws", {"headers": ["Authorization: Bearer " + sign({"sub": "r"}, -10)]}),
                              ("bad subprotocol", "/ws", {"protocols": "access_token.not-a-jwt"})):
            with RtClient(self.rt.port, path, **kw) as c:
                self.assertIn("refused", c.head, how)
                self.assertEqual(c.head["refused"]["status"], 401, how)
                self.assertEqual(json.loads(c.head["refused"]["body"])["error"], "unauthorized", how)
                self.assertEqual(c.p.wait(10), 2, how)

    def test_refresh_with_bad_or_expired_token_401_then_expiry_closes_4001(self):
        c = self.client(token=sign({"sub": "ria"}, 10))  # room for 5 round trips on a loaded machine
        for tok in (sign({"sub": "ria"}, -10), sign({"sub": "ria"}, 600, secret="other"), "not.a.jwt"):
            c.send("RefreshToken", {"token": tok})
            e = c.frame("Error")
            self.assertEqual(e["code"], 401, e)
        c.send("RefreshToken", {"token": sign({"sub": "someone-else"}, 600)})
        self.assertEqual(c.frame("Error")["code"], 403)
        # None of those extended the token: it still closes at its expiry.
        self.assertEqual(c.next(lambda f: "close" in f, timeout=15), {"close": {"code": 4001, "reason": "Token expired"}})
        self.assertEqual(c.p.wait(10), 0)


class BusHoldTest(unittest.TestCase):
    """The Redis hand-off is bounded (drivers/rtbus_hold.c drives
    realtime/rtbus.c on a loop it holds): while the loop is behind, at most
    MAX_HELD bytes of messages wait for it, the rest are dropped and
    counted, and once it catches up messages flow again."""

    def test_messages_past_the_bound_are_dropped_and_counted(self):
        drv = os.path.join(ROOT, os.environ.get("O", "build"), "tests", "drivers", "rtbus_hold")
        r = redis.Redis.from_url(REDIS_URL)
        chan = "rt:topic:hold-%s" % uuid.uuid4().hex[:8]
        size, count, max_held = 10000, 40, 100000
        env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
        env["REDIS_URL"] = REDIS_URL
        p = subprocess.Popen([drv, chan, str(max_held)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        try:
            self.assertEqual(p.stdout.readline().strip(), "ready", p.stderr.read() if p.poll() else "")
            wait_for(lambda: r.pubsub_numsub(chan)[0][1] == 1, what="the driver's subscription")
            for i in range(count):
                self.assertEqual(r.publish(chan, ("%04d" % i) + "x" * (size - 4)), 1)
            p.stdin.write("count %d\n" % count)
            p.stdin.flush()
            got = json.loads(p.stdout.readline())
            fits = max_held // (size + len(chan))
            self.assertEqual(got, {"delivered": fits, "bytes": fits * (size + len(chan)),
                                   "dropped": count - fits})
            self.assertEqual(r.publish(chan, "after"), 1)
            p.stdin.write("one\n")
            p.stdin.flush()
            self.assertEqual(json.loads(p.stdout.readline()), {"delivered": fits + 1, "dropped": count - fits})
            self.assertEqual(p.wait(timeout=10), 0)
            log = p.stderr.read()
            self.assertIn("bus message dropped: the loop is behind", log)
            self.assertEqual(log.count("bus message dropped"), 1, "one log line a second, not one a message")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                f.close()


class RoutingRulesTest(unittest.TestCase):
    """ROUTING_RULES: drop, copy and filter applied to Broadcasts from
    clients and from Redis (rt:topic:*), and counted in /info."""

    def test_drop_copy_filter(self):
        k = uuid.uuid4().hex[:6]
        rules = [{"match": "debug%s.*" % k, "action": "drop"},
                 {"match": "orders%s.eu" % k, "action": "copy", "to": "orders%s.all" % k},
                 {"match": "alerts" + k, "action": "filter", "field": "payload.level", "equals": "high"}]
        path = os.path.join(self.tmpdir(), "rules.json")
        with open(path, "w") as f:
            json.dump({"rules": rules}, f)
        r = redis.Redis.from_url(REDIS_URL)
        topics = ["debug%s.x" % k, "orders%s.eu" % k, "orders%s.all" % k, "alerts" + k, "mark" + k]
        with Realtime(ROUTING_RULES=path, REDIS_URL=REDIS_URL) as rt:
            self.assertEqual(http_json("GET", rt.base + "/info")[2]["routing_rules"], 3)
            wait_for(lambda: http_json("GET", rt.base + "/info")[2]["redis"] == "connected", what="redis")
            sub, pub = (RtClient(rt.port, "/ws?token=" + sign({"sub": u})) for u in ("sue", "pat"))
            with sub, pub:
                sub.send("Subscribe", {"topics": topics})
                self.assertEqual(sub.frame("Status", lambda d: d["status"] == "subscribed")["details"]["topics"], topics)
                sends = [("debug%s.x" % k, {"level": "high"}), ("orders%s.eu" % k, {"id": 7}),
                         ("alerts" + k, {"level": "low"}), ("alerts" + k, {"level": "high"}), ("mark" + k, "end")]
                for t, p in sends:
                    pub.send("Broadcast", {"topic": t, "payload": p})
                acks = [pub.frame("Ack")["message_id"] for _ in sends]
                self.assertEqual(len(set(acks)), 5, "a dropped or filtered broadcast is still acknowledged")
                got = self.until_mark(sub, "mark" + k)
                self.assertEqual(sorted((g["topic"], json.dumps(g["payload"])) for g in got),
                                 sorted([("orders%s.eu" % k, '{"id": 7}'), ("orders%s.all" % k, '{"id": 7}'),
                                         ("alerts" + k, '{"level": "high"}')]))
                copy = [g for g in got if g["topic"] == "orders%s.all" % k][0]
                self.assertEqual((copy["from"], copy["message_id"]), ("pat", acks[1]))

                # The same rules for what other services publish on Redis.
                wait_for(lambda: r.pubsub_numsub("rt:topic:mark" + k)[0][1] >= 1, what="the subscription on redis")
                for t, p in sends:
                    r.publish("rt:topic:" + t, json.dumps({"topic": t, "payload": p, "from": "svc",
                                                           "message_id": uuid.uuid4().hex, "timestamp": "x"}))
                got = self.until_mark(sub, "mark" + k)
                self.assertEqual(sorted(g["topic"] for g in got),
                                 sorted(["orders%s.eu" % k, "orders%s.all" % k, "alerts" + k]))
                self.assertEqual([g["payload"] for g in got if g["topic"] == "alerts" + k], [{"level": "high"}])

    def until_mark(self, c, mark):
        got = []
        while True:
            f = c.frame("Broadcast")
            self.assertIsNotNone(f, "the marker broadcast never came (got %r)" % got)
            if f["topic"] == mark:
                return got
            got.append(f)

    def tmpdir(self):
        import shutil
        import tempfile
        d = tempfile.mkdtemp(prefix="rt-rules-")
        self.addCleanup(shutil.rmtree, d, True)
        return d


class ScaleOutTest(unittest.TestCase):
    """Two instances sharing Redis."""

    def test_bus_topic_messages_are_checked_and_reprinted(self):
        """Other services publish on rt:topic:*: one UTF-8 JSON object goes
        out, printed again, and anything else is refused with a log line."""
        r = redis.Redis.from_url(REDIS_URL)
        with Realtime(REDIS_URL=REDIS_URL) as a:
            wait_for(lambda: http_json("GET", a.base + "/info")[2]["redis"] == "connected", what="a on redis")
            p = subprocess.Popen([need("node"), "-e", PRELUDE + """(async () => {
const y = await connect(%(a)s + '?token=' + tok({sub: 'quentin'}));
send(y, 'Subscribe', {topics: ['wire']}); await next(y, is('Status'));
console.error('ready');
const got = [];
for (;;) { const f = await next(y, is('Broadcast'), 8000); if (!f) break; got.push(f.data);
  if (f.data.a == 'end') break; }
console.log(JSON.stringify({got, closed: y.closed})); process.exit(0); })();""" % {"a": json.dumps(a.url)}],
                                 cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.assertEqual(p.stderr.readline().strip(), "ready")
            time.sleep(0.3)
            bad_before = metric(a.base, "realtime_bad_frames_total")
            for raw in (b'{"a":1},"type":"DirectMessage"', b'{"a":"\xff"}', b'[1]', b'{"a":', b'{"a":"x\ny"}'):
                self.assertGreaterEqual(r.publish("rt:topic:wire", raw), 1)
            self.assertGreaterEqual(r.publish("rt:topic:wire", b'{"a":"x\\ny","n":01} '), 1)
            self.assertGreaterEqual(r.publish("rt:topic:wire", b'{"a":"end"}'), 1)
            out, err = p.communicate(timeout=20)
            res = json.loads(out)
            # The 01 came out as JSON (a client's JSON.parse threw on the
            # raw text); nothing else came out, a raw newline in a string
            # included (RFC 8259 wants it escaped).
            self.assertEqual(res["got"], [{"a": "x\ny", "n": 1}, {"a": "end"}])
            self.assertIsNone(res["closed"])
            self.assertEqual(metric(a.base, "realtime_bad_frames_total") - bad_before, 5)
            self.assertIn("bus message refused", a.log())

    def test_bus_user_and_room_messages_are_checked(self):
        """rt:user:* and rt:room:* carry other instances' direct messages and
        room frames (tagged with the instance id); anyone on Redis can
        publish there too: what is not one UTF-8 JSON object (for a room, a
        RoomMessage or PresenceUpdate frame) is refused with a log line."""
        r = redis.Redis.from_url(REDIS_URL)
        with Realtime(REDIS_URL=REDIS_URL) as a:
            wait_for(lambda: http_json("GET", a.base + "/info")[2]["redis"] == "connected", what="a on redis")
            c = RtClient(a.port, "/ws?token=" + sign({"sub": "uma"}, 600))
            self.addCleanup(c.kill)
            self.assertIn("open", c.head, c.head)
            c.send("JoinRoom", {"room": "wired"})
            c.frame("Status", lambda d: d["status"] == "joined")
            wait_for(lambda: r.pubsub_numsub("rt:room:wired")[0][1] >= 1 and r.pubsub_numsub("rt:user:uma")[0][1] >= 1,
                     what="the room's and the user's channels on redis")
            c.frames()
            c.backlog.clear()
            bad_before = metric(a.base, "realtime_bad_frames_total")
            tag = b"other-instance\n"
            for ch, raw in (("rt:user:uma", b'{"a":"\xff"}'), ("rt:user:uma", b'1},"type":"Broadcast"'),
                            ("rt:room:wired", b'{"type":"RoomMessage","data":"\xff"}'),
                            ("rt:room:wired", b'{"type":"Broadcast","data":{}}'), ("rt:room:wired", b'x\n1')):
                self.assertGreaterEqual(r.publish(ch, tag + raw), 1)
            self.assertGreaterEqual(r.publish("rt:user:uma", tag + b'{"from":"x","payload":"ok"}'), 1)
            self.assertGreaterEqual(r.publish("rt:room:wired", tag + b'{"type":"RoomMessage","data":{"room":"wired",'
                                              b'"from":"x","payload":"ok"}}'), 1)
            self.assertEqual(c.frame("DirectMessage")["payload"], "ok")
            self.assertEqual(c.frame("RoomMessage")["payload"], "ok")
            time.sleep(0.3)
            self.assertEqual([f for f in c.frames() if f.get("type") in ("DirectMessage", "RoomMessage", "Broadcast")],
                             [])
            self.assertEqual(metric(a.base, "realtime_bad_frames_total") - bad_before, 5)
            self.assertIn("bus message refused", a.log())

    def two_in_a_room(self, a, b, room):
        """mia on a; walt on b; wes on both: all three in `room`. Returns the
        three clients of a and b's side, once mia heard walt join."""
        for inst in (a, b):
            wait_for(lambda: http_json("GET", inst.base + "/info")[2]["redis"] == "connected", what="redis")
        clients, chan, r, seen = {}, "rt:room:" + room, redis.Redis.from_url(REDIS_URL), set()
        for name, inst in (("mia", a), ("wes_a", a), ("wes_b", b), ("walt", b)):
            c = RtClient(inst.port, "/ws?token=" + sign({"sub": name.split("_")[0]}, 600))
            self.addCleanup(c.kill)
            self.assertIn("open", c.head, c.head)
            c.send("JoinRoom", {"room": room})
            self.assertEqual(c.frame("Status", lambda d: d["status"] == "joined"), {"status": "joined",
                                                                                  "details": {"room": room}})
            clients[name] = c
            seen.add(inst.port)
            # Each instance holding a member subscribes to the room's channel.
            wait_for(lambda: r.pubsub_numsub(chan)[0][1] >= len(seen), what="the room's subscription on redis")
        self.assertEqual(clients["mia"].frame("PresenceUpdate", lambda d: d["user_id"] == "walt")["status"], "online")
        return clients

    def presence_users(self, c, room):
        c.send("GetPresence", {"room": room})
        return sorted(u["user_id"] for u in c.frame("Presence")["users"])

    def test_killed_instance_users_go_offline(self):
        """kill -9 of an instance: within PRESENCE_TTL and a heartbeat the
        other announces its users offline to the room's members (not wes,
        who is in the room through the live instance too), and its presence
        entries, its rt:instances member and its room index are gone."""
        r = redis.Redis.from_url(REDIS_URL)
        room = "morgue-" + uuid.uuid4().hex[:8]
        key = "rt:room:%s:presence" % room
        with Realtime(REDIS_URL=REDIS_URL, PRESENCE_TTL="3s") as a, \
                Realtime(REDIS_URL=REDIS_URL, PRESENCE_TTL="3s") as b:
            bid = http_json("GET", b.base + "/info")[2]["instance_id"]
            cl = self.two_in_a_room(a, b, room)
            mia = cl["mia"]
            self.assertEqual(self.presence_users(mia, room), ["mia", "walt", "wes"])
            self.assertIsNotNone(r.zscore("rt:instances", bid))
            index = r.smembers("rt:instance:%s:rooms" % bid)
            killed = time.monotonic()
            b.kill9()
            pu = mia.frame("PresenceUpdate", lambda d: d["status"] == "offline", timeout=12)
            self.assertIsNotNone(pu, "walt announced offline after the kill")
            # PRESENCE_TTL, then a heartbeat (every TTL/3), with room for a loaded machine.
            self.assertLess(time.monotonic() - killed, 12)
            self.assertEqual(set(pu), {"room", "user_id", "status", "last_seen"})
            self.assertEqual((pu["room"], pu["user_id"]), (room, "walt"))
            self.assertRegex(pu["last_seen"], RFC3339_RE)
            self.assertIsNone(mia.frame("PresenceUpdate", lambda d: d["status"] == "offline", timeout=1.5),
                              "wes is still in the room through a")
            self.assertEqual(cl["wes_a"].frame("PresenceUpdate", lambda d: d["user_id"] == "walt"
                                               and d["status"] == "offline")["room"], room)
            self.assertEqual(self.presence_users(mia, room), ["mia", "wes"])
            self.assertEqual(sorted(f.decode().split("|", 1)[0] == bid for f in r.hkeys(key)), [False, False])
            self.assertIsNone(r.zscore("rt:instances", bid))
            self.assertEqual(index, {room.encode()}, "b's room index named the room")
            self.assertFalse(r.exists("rt:instance:%s:rooms" % bid))
            self.assertIn("dead instance's presence removed", a.log())

    def test_paused_instance_is_announced_again(self):
        """An instance stopped (SIGSTOP) past PRESENCE_TTL is taken for dead;
        once it runs again it writes its presence again and tells the room."""
        import signal
        room = "nap-" + uuid.uuid4().hex[:8]
        with Realtime(REDIS_URL=REDIS_URL, PRESENCE_TTL="3s") as a, \
                Realtime(REDIS_URL=REDIS_URL, PRESENCE_TTL="3s") as b:
            cl = self.two_in_a_room(a, b, room)
            mia = cl["mia"]
            b.proc.send_signal(signal.SIGSTOP)
            try:
                pu = mia.frame("PresenceUpdate", lambda d: d["user_id"] == "walt" and d["status"] == "offline",
                               timeout=12)
                self.assertIsNotNone(pu, "walt announced offline while b is stopped")
                self.assertEqual(self.presence_users(mia, room), ["mia", "wes"])
            finally:
                b.proc.send_signal(signal.SIGCONT)
            pu = mia.frame("PresenceUpdate", lambda d: d["user_id"] == "walt" and d["status"] == "online", timeout=8)
            self.assertIsNotNone(pu, "walt announced again once b runs")
            self.assertEqual(pu["room"], room)
            self.assertEqual(self.presence_users(mia, room), ["mia", "walt", "wes"])
            self.assertIn("taken for dead by other instances", b.log())

    def test_two_instances(self):
        r = redis.Redis.from_url(REDIS_URL)
        with Realtime(REDIS_URL=REDIS_URL, PRESENCE_TTL="3s") as a, \
                Realtime(REDIS_URL=REDIS_URL, PRESENCE_TTL="3s") as b:
            wait_for(lambda: http_json("GET", a.base + "/info")[2]["redis"] == "connected", what="a on redis")
            wait_for(lambda: http_json("GET", b.base + "/info")[2]["redis"] == "connected", what="b on redis")
            res = node("""(async () => {
const out = {};
const x = await connect(%(a)s + '?token=' + tok({sub: 'xavier'}));
const y = await connect(%(b)s + '?token=' + tok({sub: 'yolanda'}));
send(y, 'Subscribe', {topics: ['shared', 'user:yolanda']}); await next(y, is('Status'));
send(x, 'Subscribe', {topics: ['shared']}); await next(x, is('Status'));
await sleep(300);
send(x, 'Broadcast', {topic: 'shared', payload: 'across'});
out.by = (await next(y, is('Broadcast'))).data; out.bx = (await next(x, is('Broadcast'))).data;
out.dup = await next(x, is('Broadcast'), 400);
send(x, 'DirectMessage', {target_user: 'yolanda', payload: 'psst'});
out.dm = (await next(y, is('DirectMessage'))).data;
out.dm_ack = (await next(x, f => f.type == 'Error' || (f.type == 'Ack' && f.data.message_id.startsWith('direct_')))).data;
send(x, 'DirectMessage', {target_user: 'zed', payload: 1}); out.dm404 = (await next(x, is('Error'))).data;
send(x, 'JoinRoom', {room: 'hall'}); await next(x, is('Status'));
await sleep(200);
send(y, 'JoinRoom', {room: 'hall'}); await next(y, is('Status'));
out.pu = (await next(x, is('PresenceUpdate', d => d.user_id == 'yolanda'))).data;
await sleep(200);
send(y, 'RoomMessage', {room: 'hall', payload: 'hi hall'}); out.rm = (await next(x, is('RoomMessage'))).data;
send(x, 'GetPresence', {room: 'hall'}); out.presence = (await next(x, is('Presence'))).data;
console.log(JSON.stringify(out)); process.exit(0); })();""" % {"a": json.dumps(a.url), "b": json.dumps(b.url)})
            self.assertEqual((res["by"]["payload"], res["by"]["from"]), ("across", "xavier"))
            self.assertEqual(res["bx"]["message_id"], res["by"]["message_id"])
            self.assertIsNone(res["dup"], "the publisher's instance delivers once")
            self.assertEqual((res["dm"]["from"], res["dm"]["payload"]), ("xavier", "psst"))
            self.assertRegex(res["dm_ack"]["message_id"], "^direct_")
            self.assertEqual(res["dm404"]["code"], 404)
            self.assertEqual(res["pu"]["room"], "hall")
            self.assertEqual((res["rm"]["from"], res["rm"]["payload"]), ("yolanda", "hi hall"))
            self.assertEqual(sorted(u["user_id"] for u in res["presence"]["users"]), ["xavier", "yolanda"])

            # trigger.fired as the event-processor publishes it (jobs.c).
            p = subprocess.Popen([need("node"), "-e", PRELUDE + """(async () => {
const y = await connect(%(b)s + '?token=' + tok({sub: '42'}));
send(y, 'Subscribe', {topics: ['user:42']}); await next(y, is('Status'));
console.error('ready');
const f = await next(y, is('Broadcast'), 8000);
console.log(JSON.stringify(f)); process.exit(0); })();""" % {"b": json.dumps(b.url)}], cwd=HERE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.assertEqual(p.stderr.readline().strip(), "ready")
            time.sleep(0.3)
            msg = {"topic": "user:42", "payload": {"type": "trigger.fired", "trigger_id": "t-1", "event_id": "e-1",
                                                   "event_type": "NewFeedback", "agent_id": 7},
                   "from": "event-processor", "message_id": "0" * 64, "timestamp": "2026-01-01T00:00:00.000Z"}
            self.assertGreaterEqual(r.publish("rt:topic:user:42", json.dumps(msg)), 1)
            out, err = p.communicate(timeout=20)
            frame = json.loads(out)
            self.assertEqual(frame["type"], "Broadcast")
            self.assertEqual(frame["data"], msg)

            # A dead instance's presence expires: b dies with yolanda in
            # the hall; a stops listing her within the TTL.
            q = subprocess.Popen([need("node"), "-e", PRELUDE + """(async () => {
const y = await connect(%(b)s + '?token=' + tok({sub: 'wanda'}));
send(y, 'JoinRoom', {room: 'attic'}); await next(y, is('Status')); console.error('in'); await sleep(60000); })();"""
                                  % {"b": json.dumps(b.url)}], cwd=HERE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            self.assertEqual(q.stderr.readline().strip(), "in")
            presence = """(async () => {
const x = await connect(%(a)s + '?token=' + tok({sub: 'xavier'}));
send(x, 'GetPresence', {room: 'attic'}); const p = (await next(x, is('Presence'))).data;
console.log(JSON.stringify(p.users.map(u => u.user_id))); process.exit(0); })();""" % {"a": json.dumps(a.url)}
            self.assertEqual(node(presence), ["wanda"])
            b.kill9()
            q.kill()
            q.communicate()
            wait_for(lambda: node(presence) == [], timeout=15, interval=1, what="wanda's presence expired")


if __name__ == "__main__":
    unittest.main()
