// A Khala WebSocket subscriber for test_runtime.py, on the stock `ws`
// client:
//
//   node khala_ws_client.cjs URL WANT_MESSAGES TIMEOUT_MS [HEADERS_JSON]
//
// Prints one JSON line per event: {"frame": <the frame>} for each text
// frame, {"refused": status, "body": <JSON body>} when the upgrade is
// refused, {"close": code, "reason": text} when the server closes, and
// {"timeout": true} when TIMEOUT_MS pass first. Stops after WANT_MESSAGES
// "message" frames (0: run until closed or timed out). Reads lines from
// stdin: "go" is echoed as {"ready": true} once the hello frame came (so a
// test can start writing knowing the subscriber is live).
'use strict';
const WebSocket = require('ws');

const [url, wantArg, timeoutArg, headersArg] = process.argv.slice(2);
const want = Number(wantArg);
const headers = headersArg ? JSON.parse(headersArg) : {};
let messages = 0;
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
// Exits once stdout has taken every line: a pipe takes 64 KiB at once, and
// process.exit() with more pending cut the last line (a large message).
const exit = () => process.stdout.write('', () => process.exit(0));
const ws = new WebSocket(url, { headers });
const timer = setTimeout(() => { out({ timeout: true }); exit(); }, Number(timeoutArg));

ws.on('unexpected-response', (req, res) => {
  let body = '';
  res.on('data', (d) => { body += d; });
  res.on('end', () => {
    let parsed = body;
    try { parsed = JSON.parse(body); } catch (e) { /* kept as text */ }
    out({ refused: res.statusCode, body: parsed });
    clearTimeout(timer);
    exit();
  });
});
ws.on('error', (e) => { out({ error: e.message }); clearTimeout(timer); exit(); });
ws.on('message', (data) => {
  const f = JSON.parse(data.toString());
  out({ frame: f });
  if (f.type === 'hello') out({ ready: true });
  if (f.type === 'message' && want > 0 && ++messages >= want) {
    clearTimeout(timer);
    ws.close(1000);
    setTimeout(() => exit(), 50);
  }
});
ws.on('close', (code, reason) => { out({ close: code, reason: reason.toString() }); clearTimeout(timer); exit(); });
