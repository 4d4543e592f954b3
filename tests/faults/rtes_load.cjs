// RTES load for make faults (tests/faults/faults.py drives it over
// stdin/stdout, one JSON line per answer): node states published with the
// stock npm `amqplib` on a confirm channel, mandatory and persistent, to the
// topic exchange `workflows` with routing key workflow.node.status, as a
// workflow worker does. A message counts as accepted once the broker
// confirmed it and did not return it as unroutable (after a RabbitMQ restart
// the queues exist again only once realtime has declared them). Anything not
// accepted is published again, the same bytes (RTES stores a repeated body
// once), after a reconnect when the connection is gone.
//
//   env: AMQP_URL, RTES_RATE (10)
//   stdin: "phase TAG" -> publishes node n-000001... of execution ex-faults-TAG
//          "stop"      -> stops, republishes until all are accepted (90 s at most),
//                         answers {"accepted": [node ids], "sent", "refused", "pending"}
//          "quit"
'use strict';
const path = require('path');
const amqp = require(path.join(__dirname, '..', 'integration', 'node_modules', 'amqplib'));

const URL = process.env.AMQP_URL;
const RATE = parseFloat(process.env.RTES_RATE || '10');
const RK = 'workflow.node.status';
const out = o => process.stdout.write(JSON.stringify(o) + '\n');

let ch = null, connecting = false;
let phase = null;           // {tag, n, accepted: Set, queue: [msg], refused}
const sleep = ms => new Promise(r => setTimeout(r, ms));

async function connect() {
  if (connecting) return;
  connecting = true;
  while (!ch) {
    try {
      const conn = await amqp.connect(URL);
      conn.on('error', () => {});
      conn.on('close', () => { ch = null; });
      const c = await conn.createConfirmChannel();
      c.on('error', () => {});
      c.on('close', () => { if (ch === c) ch = null; });
      // A returned message comes back before its confirm: it was not routed.
      c.on('return', m => { if (phase) phase.returned.add(JSON.parse(m.content.toString()).node_id); });
      await c.assertExchange('workflows', 'topic', {durable: true});
      ch = c;
    } catch (e) {
      await sleep(500);
    }
  }
  connecting = false;
}

function message(tag, n) {
  return {workflow_id: 'wf-faults', execution_id: 'ex-faults-' + tag, node_id: 'n-' + String(n).padStart(6, '0'),
          node_name: 'step', status: 'success', executed_at: new Date().toISOString(), duration_ms: 1,
          output: {n}};
}

function send(m) {
  const p = phase;
  if (!ch) { p.refused++; p.queue.push(m); connect(); return; }
  p.inflight++;
  const id = m.node_id;
  p.returned.delete(id);
  try {
    ch.publish('workflows', RK, Buffer.from(JSON.stringify(m)),
               {contentType: 'application/json', persistent: true, mandatory: true}, err => {
      p.inflight--;
      if (err || p.returned.has(id)) { p.refused++; p.queue.push(m); } else p.accepted.add(id);
    });
  } catch (e) {
    p.inflight--; p.refused++; p.queue.push(m); ch = null; connect();
  }
}

let timer = null;
function tick() {
  const p = phase;
  if (!p) return;
  // What was refused goes first, then one new message per tick.
  const again = p.queue.splice(0, p.queue.length);
  for (const m of again) send(m);
  if (p.running) { p.n++; p.sent++; send(message(p.tag, p.n)); }
}

const rl = require('readline').createInterface({input: process.stdin});
rl.on('line', async line => {
  const [cmd, arg] = line.trim().split(/\s+/);
  if (cmd === 'phase') {
    phase = {tag: arg, n: 0, sent: 0, accepted: new Set(), returned: new Set(), queue: [], refused: 0, inflight: 0,
             running: true};
    await connect();
    timer = setInterval(tick, 1000 / RATE);
    out({phase: arg});
  } else if (cmd === 'stop') {
    phase.running = false;
    const end = Date.now() + 90000;
    while (Date.now() < end && (phase.queue.length || phase.inflight)) await sleep(100);
    clearInterval(timer);
    out({accepted: [...phase.accepted], sent: phase.sent, refused: phase.refused,
         pending: phase.queue.length + phase.inflight});
    phase = null;
  } else if (cmd === 'quit') {
    process.exit(0);
  }
});
connect();
