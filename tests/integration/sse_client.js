// A stock SSE client (npm `eventsource`) for the gateway's SSE tests: prints
// one JSON line per event received ({type, id, data, t}) and exits after
// COUNT events, or after TIMEOUT_MS. Node 18 compatible (CommonJS).
//
//   node sse_client.js URL [COUNT] [TIMEOUT_MS] [LAST_EVENT_ID]
'use strict';
const EventSource = require('eventsource');

const [url, count = '1000000', timeoutMs = '10000', lastId] = process.argv.slice(2);
const types = ['connection.established', 'run.start', 'run.progress', 'run.complete', 'run.error', 'question',
  'node.complete', 'node.error', 'heartbeat', 'stream.reset', 'custom.thing'];
const init = lastId ? { headers: { 'Last-Event-ID': lastId } } : {};
const es = new EventSource(url, init);
let seen = 0;

function done(code) {
  es.close();
  process.exit(code);
}

for (const type of types) {
  es.addEventListener(type, (ev) => {
    process.stdout.write(JSON.stringify({ type, id: ev.lastEventId, data: JSON.parse(ev.data), t: Date.now() }) + '\n');
    if (++seen >= Number(count)) done(0);
  });
}
es.onerror = (err) => {
  process.stdout.write(JSON.stringify({ type: 'error', status: err && err.status }) + '\n');
  if (err && err.status) done(3);
};
setTimeout(() => done(2), Number(timeoutMs));
