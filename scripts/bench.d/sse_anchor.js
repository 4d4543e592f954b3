// The SSE benchmark's anchor (scripts/bench.d/35-sse.sh): a plain Node.js
// http server with the gateway's two routes, streams kept in memory only:
// GET /api/v1/events/{id} (connection.established first) and
// POST /internal/v1/sse/{id} (sent to every stream of that id, 202).
'use strict';
const http = require('http');

const port = Number(process.argv[2] || 18901);
const streams = new Map();
let seq = 0;

function frame(type, data) {
  const id = ++seq;
  const env = JSON.stringify({ id: String(id), event_type: type, timestamp: new Date().toISOString(), data });
  return `id: ${id}\nevent: ${type}\ndata: ${env}\n\n`;
}

http.createServer((req, res) => {
  const m = /^\/api\/v1\/events\/([A-Za-z0-9_.-]+)$/.exec(req.url);
  if (req.method === 'GET' && m) {
    res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-cache' });
    res.write(frame('connection.established', { client_id: m[1], message: 'Connected to event stream' }));
    let set = streams.get(m[1]);
    if (!set) streams.set(m[1], (set = new Set()));
    set.add(res);
    req.on('close', () => set.delete(res));
    return;
  }
  const p = /^\/internal\/v1\/sse\/([A-Za-z0-9_.-]+)$/.exec(req.url);
  if (req.method === 'POST' && p) {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      const ev = JSON.parse(body);
      const f = frame(ev.event_type, ev.data);
      for (const s of streams.get(p[1]) || []) s.write(f);
      res.writeHead(202, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({ id: String(seq) }));
    });
    return;
  }
  res.writeHead(404);
  res.end();
}).listen(port, '127.0.0.1');
