// rtes_watch.js: N watchers of one execution on GET /rt, with the stock
// npm `ws` client.
//
//   node rtes_watch.js URL N EXPECT [BEARER] [SETTLE_MS=400] [TIMEOUT_MS=60000] [RAW]
//
// Opens N WebSockets at once; each collects text frames until it holds
// EXPECT of them, then waits SETTLE_MS more (a frame repeated or extra
// would arrive then) and closes. Prints one JSON line: a list, per watcher,
// of {http: status when the handshake was refused, frames: [parsed...],
// close: code when the server closed first, error; with RAW=raw also raw:
// [the text of each frame as received]}. Prints "open N" on stderr once
// every handshake has been answered.
'use strict';
const WebSocket = require('ws');

const [url, nArg, expectArg, bearer, settleArg, timeoutArg, rawArg] = process.argv.slice(2);
const raw = rawArg === 'raw';
const n = parseInt(nArg, 10);
const expect = parseInt(expectArg, 10);
const settle = parseInt(settleArg || '400', 10);
const timeout = parseInt(timeoutArg || '60000', 10);
const out = [];
let answered = 0;
let done = 0;

function finish() {
  if (++done === n) {
    // A pipe takes the output asynchronously: exit once it is written.
    process.stdout.write(JSON.stringify(out) + '\n', () => process.exit(0));
  }
}

function handshake() {
  if (++answered === n) console.error('open ' + n);
}

for (let i = 0; i < n; i++) {
  const r = raw ? { frames: [], raw: [] } : { frames: [] };
  out.push(r);
  const headers = bearer ? { Authorization: 'Bearer ' + bearer } : {};
  const ws = new WebSocket(url, { headers });
  let ended = false;
  const end = () => {
    if (ended) return;
    ended = true;
    try { ws.terminate(); } catch (e) { /* gone */ }
    finish();
  };
  ws.on('open', handshake);
  ws.on('unexpected-response', (req, res) => {
    r.http = res.statusCode;
    let body = '';
    res.on('data', (d) => { body += d; });
    res.on('end', () => { r.body = body; handshake(); end(); });
  });
  ws.on('message', (d, isBinary) => {
    if (isBinary) { r.binary = (r.binary || 0) + 1; return; }
    if (raw) r.raw.push(String(d));
    r.frames.push(JSON.parse(String(d)));
    if (r.frames.length === expect) setTimeout(end, settle);
  });
  ws.on('close', (code) => { if (!ended) { r.close = code; end(); } });
  ws.on('error', (e) => { r.error = e.message; });
  if (expect === 0) ws.on('open', () => setTimeout(end, settle));
  setTimeout(end, timeout);
}
