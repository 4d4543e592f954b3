// Append-to-frame latency of the runtime's Khala WebSocket (issue 14,
// benchmark 3), driven by runtime_bench.py:
//
//   node runtime_ws_latency.cjs BASE_URL RUN_ID RATE SECONDS
//
// Subscribes to run:RUN_ID:events with the stock `ws` client (token minted
// by `jsonwebtoken` with the development key the benchmark's runtime uses),
// then appends RATE events per second for SECONDS over keep-alive
// connections (at most 16 in flight), each carrying its number, and records
// for every frame the time since its append was sent. Prints one JSON line:
// {rate, sent, received, p50_ms, p99_ms, max_ms, ack_p50_ms, ack_p99_ms} (ack: the
// append's HTTP answer, for telling the write path from the delivery).
'use strict';
const path = require('path');
const http = require('http');
const nm = path.join(__dirname, '..', '..', 'tests', 'integration', 'node_modules');
const WebSocket = require(path.join(nm, 'ws'));
const jwt = require(path.join(nm, 'jsonwebtoken'));

const [base, runId, rateArg, secondsArg] = process.argv.slice(2);
const rate = Number(rateArg), seconds = Number(secondsArg);
const u = new URL(base);
const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
const token = jwt.sign({ sub: 'bench', oa_user_id: 1, oa_sync_scopes: ['runtime.run_events'] },
  process.env.RUNTIME_SYNC_TOKEN_SIGNING_KEY || 'dev-sync-key',
  { algorithm: 'HS256', expiresIn: 600, issuer: 'https://openagents.com', audience: 'openagents-sync',
    jwtid: 'bench-' + Date.now() });
const sentAt = new Map();
const lat = [];
const ack = [];
let sent = 0, inflight = 0, failed = 0, done = false;

function append(n) {
  const body = JSON.stringify({ event_type: 'bench.tick', payload: { n }, idempotency_key: 'ws-' + runId + '-' + n });
  inflight++;
  const t0 = process.hrtime.bigint();
  sentAt.set(n, t0);
  const req = http.request({ host: u.hostname, port: u.port, path: '/internal/v1/runs/' + runId + '/events',
    method: 'POST', agent, headers: { 'Content-Type': 'application/json', 'Prefer': 'return=minimal',
      'Content-Length': Buffer.byteLength(body) } }, (res) => {
    res.resume();
    res.on('end', () => {
      inflight--;
      if (res.statusCode !== 200) failed++;
      ack.push(Number(process.hrtime.bigint() - t0) / 1e6);
    });
  });
  req.on('error', () => { inflight--; failed++; });
  req.end(body);
}

function finish() {
  if (done) return;
  done = true;
  lat.sort((a, b) => a - b);
  ack.sort((a, b) => a - b);
  const q = (v, p) => v.length ? v[Math.min(v.length - 1, Math.floor(p * v.length))] : NaN;
  process.stdout.write(JSON.stringify({ rate, sent, received: lat.length, failed, p50_ms: q(lat, 0.5),
    p99_ms: q(lat, 0.99), max_ms: q(lat, 1), ack_p50_ms: q(ack, 0.5), ack_p99_ms: q(ack, 0.99) }) + '\n');
  process.exit(failed ? 1 : 0);
}

const ws = new WebSocket(base.replace(/^http/, 'ws') + '/internal/v1/khala/topics/run:' + runId +
  ':events/ws?after_seq=1', { headers: { Authorization: 'Bearer ' + token } });
ws.on('error', (e) => { process.stderr.write('ws error: ' + e.message + '\n'); process.exit(2); });
ws.on('message', (data) => {
  const now = process.hrtime.bigint();
  const f = JSON.parse(data.toString());
  if (f.type === 'hello') {
    start();
    return;
  }
  if (f.type !== 'message') {
    process.stderr.write('unexpected frame: ' + data + '\n');
    process.exit(2);
  }
  const n = f.message.payload.n;
  const t0 = sentAt.get(n);
  if (t0 !== undefined) {
    lat.push(Number(now - t0) / 1e6);
    sentAt.delete(n);
  }
  if (sent > 0 && lat.length === sent && sending === false) finish();
});

let sending = true;
function start() {
  const t0 = process.hrtime.bigint();
  const total = rate * seconds;
  const tick = () => {
    const elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
    const due = Math.min(total, Math.floor(elapsed * rate));
    while (sent < due && inflight < 16) append(++sent);
    if (sent < total) {
      setTimeout(tick, 1);
    } else {
      sending = false;
      setTimeout(finish, 3000);
      if (lat.length === sent) finish();
    }
  };
  tick();
}
