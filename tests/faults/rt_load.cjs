// Realtime load for make faults (tests/faults/faults.py drives it over
// stdin/stdout, one JSON line per answer): N subscribers of topic `faults` on
// /ws (npm ws, the stock client), one publisher sending Broadcast at RATE/s.
// Every client reconnects (0.5 s + jitter) and subscribes again after a
// close, as a browser page would.
//
//   env: RT_URL (ws://127.0.0.1:PORT/ws), JWT_SECRET, RT_SUBSCRIBERS (1000), RT_RATE (5)
//   stdin: "ready"       -> {"ready": subscribed, "subscribers": N} once all are subscribed (or 60 s)
//          "phase TAG"   -> starts publishing {p: TAG, n} ; answers {"phase": TAG}
//          "stop N,N..." -> stops, waits 2 s for what is in flight, answers the phase's counts; the
//                           list: the n of the broadcasts faults.py published on Redis (src "redis")
//                           with success, straight to rt:topic:faults as other services do
//          "spread URL2" -> a second instance: the odd subscribers and presence-1 move to URL2
//                           (closed, they reconnect there); answers {"spread": moved}
//          "unspread"    -> URL2 is gone: whoever was on it goes back to RT_URL; {"unspread": moved}
//          "presence"    -> GetPresence of room faults-presence from presence-1 (URL2's), answers
//                           {"users": [user ids]} (or {"error": ...})
//          "quit"
// A client whose connection attempt fails (nothing listening: a killed instance) tries the other
// URL next, as a client behind a load balancer would land on the living instance. presence-0 and
// presence-1 join room faults-presence on every connect (presence across instances).
'use strict';
const path = require('path');
const nm = path.join(__dirname, '..', 'integration', 'node_modules');
const WebSocket = require(path.join(nm, 'ws'));
const jwt = require(path.join(nm, 'jsonwebtoken'));

const URLS = [process.env.RT_URL];
const SECRET = process.env.JWT_SECRET;
const N = parseInt(process.env.RT_SUBSCRIBERS || '1000', 10);
const RATE = parseFloat(process.env.RT_RATE || '5');
const TOPIC = 'faults';

let phase = null;
let inflight = [];
const out = o => process.stdout.write(JSON.stringify(o) + '\n');

const ROOM = 'faults-presence';

function client(name, onFrame, room) {
  const c = {name, ws: null, u: 0, subscribed: false, closes: 0, errors: 0, reconnects: 0, stopped: false, onFrame};
  const open = () => {
    const ws = new WebSocket(URLS[c.u] + '?token=' + jwt.sign({sub: name}, SECRET, {expiresIn: 3600}));
    let opened = false;
    c.ws = ws;
    ws.on('open', () => { opened = true; });
    ws.on('message', d => {
      let f;
      try { f = JSON.parse(d.toString()); } catch (e) { return; }
      if (f.type === 'Status' && f.data && f.data.status === 'connected') {
        c.connected = true;
        ws.send(JSON.stringify({type: 'Subscribe', data: {topics: [TOPIC]}}));
        if (room) ws.send(JSON.stringify({type: 'JoinRoom', data: {room}}));
      } else if (f.type === 'Status' && f.data && f.data.status === 'subscribed') {
        c.subscribed = true;
      } else if (f.type === 'Error') {
        c.errors++;
        if (phase) phase.errorFrames++;
      }
      c.onFrame(c, f);
    });
    ws.on('error', () => {});
    ws.on('close', () => {
      c.subscribed = false;
      c.connected = false;
      if (c === pub) inflight = [];
      c.closes++;
      if (phase) phase.closed.add(c.name);
      if (c.stopped) return;
      if (!opened && URLS.length > 1) c.u = (c.u + 1) % URLS.length;
      c.reconnects++;
      setTimeout(c.open, 500 + Math.random() * 500);
    });
  };
  c.open = open;
  return c;
}

const subs = [];
function onSub(c, f) {
  if (f.type !== 'Broadcast' || !phase || !f.data || !f.data.payload || f.data.payload.p !== phase.tag) return;
  const m = f.data.payload.src === 'redis' ? phase.gotRedis : phase.got;
  let got = m.get(c.name);
  if (!got) m.set(c.name, got = new Set());
  if (got.has(f.data.payload.n)) { if (m === phase.got) phase.duplicated++; else phase.duplicatedRedis++; }
  got.add(f.data.payload.n);
}

function onPub(c, f) {
  if (!phase) return;
  if (f.type === 'Ack') { const n = inflight.shift(); if (n !== undefined) phase.acked.push(n); }
  else if (f.type === 'Error') { inflight.shift(); phase.refused++; }
}
const pub = client('faults-publisher', onPub);
let presenceWait = null;
function onPresence(c, f) {
  if (presenceWait && (f.type === 'Presence' || f.type === 'Error')) { presenceWait(f); presenceWait = null; }
}
const presence = [client('presence-0', onPresence, ROOM), client('presence-1', onPresence, ROOM)];

let timer = null;
function publish() {
  if (!phase) return;
  const n = phase.sent++;
  if (!pub.connected || pub.ws.readyState !== WebSocket.OPEN) { phase.refused++; return; }
  inflight.push(n);
  pub.ws.send(JSON.stringify({type: 'Broadcast', data: {topic: TOPIC, payload: {p: phase.tag, n}}}));
}

async function start() {
  pub.open();
  for (const c of presence) c.open();
  for (let i = 0; i < N; i++) {
    const c = client('sub-' + i, onSub);
    subs.push(c);
    c.open();
    if (i % 50 === 49) await new Promise(r => setTimeout(r, 20));
  }
}

function count(acked, map) {
  let delivered = 0, missing = 0, silent = 0;
  for (const c of subs) {
    const got = map.get(c.name) || new Set();
    let miss = 0;
    for (const n of acked) { if (got.has(n)) delivered++; else miss++; }
    if (miss) { missing++; if (!phase.closed.has(c.name) && c.errors === phase.errBase.get(c.name)) silent++; }
  }
  return {delivered, missing, silent};
}

function report(redisAcked) {
  const acked = phase.acked;
  const {delivered, missing, silent} = count(acked, phase.got);
  const r = count(redisAcked, phase.gotRedis);
  return {redis: {accepted: redisAcked.length * N, delivered: r.delivered, lost: redisAcked.length * N - r.delivered,
                  duplicated: phase.duplicatedRedis, subscribers_missing: r.missing, silent: r.silent},
          phase: phase.tag, subscribers: N, sent: phase.sent, acked: acked.length, refused: phase.refused,
          accepted: acked.length * N, delivered, lost: acked.length * N - delivered, duplicated: phase.duplicated,
          subscribers_missing: missing, silent, closed: phase.closed.size, error_frames: phase.errorFrames};
}

const rl = require('readline').createInterface({input: process.stdin});
rl.on('line', async line => {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (cmd === 'ready') {
    const end = Date.now() + 60000;
    while (Date.now() < end && (subs.some(c => !c.subscribed) || !pub.subscribed || presence.some(c => !c.subscribed)))
      await new Promise(r => setTimeout(r, 100));
    out({ready: subs.filter(c => c.subscribed).length, subscribers: N});
  } else if (cmd === 'phase') {
    phase = {tag: arg, sent: 0, acked: [], refused: 0, got: new Map(), gotRedis: new Map(), duplicated: 0, duplicatedRedis: 0, closed: new Set(),
             errorFrames: 0, errBase: new Map(subs.map(c => [c.name, c.errors]))};
    inflight = [];
    timer = setInterval(publish, 1000 / RATE);
    out({phase: arg});
  } else if (cmd === 'stop') {
    clearInterval(timer);
    await new Promise(r => setTimeout(r, 2000));
    out(report(arg && arg !== '-' ? arg.split(',').map(Number) : []));
    phase = null;
  } else if (cmd === 'spread') {
    URLS[1] = arg;
    const moved = subs.filter((c, i) => i % 2).concat([presence[1]]);
    // Not subscribed from now on, so "ready" waits for their reconnects.
    for (const c of moved) { c.u = 1; c.subscribed = c.connected = false; if (c.ws) c.ws.close(); }
    out({spread: moved.length});
  } else if (cmd === 'unspread') {
    // The second instance is gone: every client back on the first.
    URLS.splice(1);
    let moved = 0;
    for (const c of subs.concat([pub], presence)) {
      if (c.u !== 1) continue;
      moved++;
      c.u = 0;
      c.subscribed = c.connected = false;
      if (c.ws && c.ws.readyState <= WebSocket.OPEN) c.ws.terminate();
    }
    out({unspread: moved});
  } else if (cmd === 'presence') {
    const c = presence[1];
    if (!c.connected) { out({error: 'presence-1 is not connected'}); return; }
    const got = await new Promise(resolve => {
      const t = setTimeout(() => { presenceWait = null; resolve(null); }, 5000);
      presenceWait = f => { clearTimeout(t); resolve(f); };
      c.ws.send(JSON.stringify({type: 'GetPresence', data: {room: ROOM}}));
    });
    if (!got) out({error: 'no answer to GetPresence'});
    else if (got.type === 'Error') out({error: got.data});
    else out({users: (got.data.users || []).map(x => x.user_id)});
  } else if (cmd === 'quit') {
    for (const c of subs.concat([pub], presence)) { c.stopped = true; if (c.ws) c.ws.terminate(); }
    process.exit(0);
  }
});
start();
