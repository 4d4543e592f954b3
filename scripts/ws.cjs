#!/usr/bin/env node
// ws.cjs: a small WebSocket client for trying the platform by hand (the
// README's walk-through) and for tests/integration/test_story.py, on the
// repository's own npm `ws` (tests/integration/node_modules: `make test`
// or tests/integration/setup-node.sh installs it).
//
//   node scripts/ws.cjs [-H 'Name: value']... [-n COUNT] [-t SECONDS] URL [FRAME]...
//
// Sends each FRAME (JSON text) once the connection is open, then every line
// typed on standard input; prints each text frame received on a line of its
// own. Ends after COUNT frames (default: never), after SECONDS (default:
// never), or when the server closes. A refused upgrade prints the status and
// body on stderr and exits 2; a server close exits 0.
'use strict';
const path = require('path');
const readline = require('readline');

let WebSocket;
try {
  WebSocket = require(path.join(__dirname, '..', 'tests', 'integration', 'node_modules', 'ws'));
} catch (e) {
  process.stderr.write('ws.cjs: npm ws is missing: run tests/integration/setup-node.sh (or make test) first\n');
  process.exit(2);
}

const argv = process.argv.slice(2);
const headers = {};
let count = 0;
let seconds = 0;
const rest = [];
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '-H' && i + 1 < argv.length) {
    const h = argv[++i];
    const colon = h.indexOf(':');
    if (colon < 1) {
      process.stderr.write('ws.cjs: a header is "Name: value"\n');
      process.exit(2);
    }
    headers[h.slice(0, colon).trim()] = h.slice(colon + 1).trim();
  } else if (argv[i] === '-n' && i + 1 < argv.length) {
    count = Number(argv[++i]);
  } else if (argv[i] === '-t' && i + 1 < argv.length) {
    seconds = Number(argv[++i]);
  } else {
    rest.push(argv[i]);
  }
}
if (rest.length < 1) {
  process.stderr.write("usage: node scripts/ws.cjs [-H 'Name: value']... [-n COUNT] [-t SECONDS] URL [FRAME]...\n");
  process.exit(2);
}
const [url, ...frames] = rest;
let received = 0;

function finish(code) {
  // Exit only once what was printed reached a pipe.
  process.stdout.write('', () => process.exit(code));
}

const ws = new WebSocket(url, { headers });
if (seconds > 0) setTimeout(() => { ws.terminate(); finish(0); }, seconds * 1000);

ws.on('unexpected-response', (req, res) => {
  let body = '';
  res.on('data', (d) => { body += d; });
  res.on('end', () => {
    process.stderr.write('ws.cjs: upgrade refused: HTTP ' + res.statusCode + ' ' + body + '\n');
    process.exit(2);
  });
});
ws.on('open', () => {
  for (const f of frames) ws.send(f);
  if (!process.stdin.isTTY && process.stdin.readableEnded) return;
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => { if (line.trim()) ws.send(line); });
});
ws.on('message', (data, isBinary) => {
  process.stdout.write((isBinary ? '(binary ' + data.length + ' bytes)' : data.toString()) + '\n');
  if (count > 0 && ++received >= count) {
    ws.close();
    finish(0);
  }
});
ws.on('close', () => finish(0));
ws.on('error', (e) => {
  process.stderr.write('ws.cjs: ' + e.message + '\n');
  process.exit(2);
});
