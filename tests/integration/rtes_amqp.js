// rtes_amqp.js: publishes workflow messages with the stock npm `amqplib`
// client, the way the workers do, and waits for the broker's confirms.
//
//   node rtes_amqp.js AMQP_URL < lines
//
// Each input line is JSON {"rk": routing key, "body": object or string,
// "exchange"?: "workflows" (default) or "" (the default exchange),
// "persistent"?: bool}, or {"op": "delete", "queue": name}. A string body is sent as is (for malformed
// messages). Prints "published N" when every message is confirmed.
'use strict';
const amqp = require('amqplib');
const readline = require('readline');

async function main() {
  const url = process.argv[2];
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  await ch.assertExchange('workflows', 'topic', { durable: true });
  const rl = readline.createInterface({ input: process.stdin });
  let n = 0;
  for await (const line of rl) {
    if (!line.trim()) continue;
    const m = JSON.parse(line);
    if (m.op === 'delete') {
      await ch.deleteQueue(m.queue);
      continue;
    }
    const body = typeof m.body === 'string' ? Buffer.from(m.body, 'utf8') : Buffer.from(JSON.stringify(m.body));
    const ex = m.exchange === undefined ? 'workflows' : m.exchange;
    const ok = ch.publish(ex, m.rk, body, { contentType: 'application/json', persistent: !!m.persistent });
    n++;
    if (!ok) await new Promise((r) => ch.once('drain', r));
  }
  await ch.waitForConfirms();
  console.log('published ' + n);
  await ch.close();
  await conn.close();
}

main().catch((e) => {
  console.error('rtes_amqp: ' + (e && e.stack ? e.stack : e));
  process.exit(1);
});
