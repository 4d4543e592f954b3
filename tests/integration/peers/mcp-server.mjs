// A local MCP server for the action-workers tests, built with the official
// SDK (@modelcontextprotocol/sdk) over the Streamable HTTP transport, in
// stateful mode (Mcp-Session-Id). Tools:
//   notify {agent_id, text, ...}  records its arguments and succeeds
//   fail   {...}                  answers a tool error (isError: true)
//   slow   {ms}                   succeeds after ms milliseconds
// GET /_calls returns every tools/call seen (name, arguments, the
// Authorization header); GET /_auth the Authorization header of every
// request to /mcp (null when absent); DELETE /_calls clears both.
// POST /mcp-broken answers what the SDK answered on Node.js 18 without the
// Web Crypto global (a 400 with a JSON-RPC error and its data); POST
// /mcp-plain a 403 with a text body: servers that fail, for the tests of
// what error_message says.
// Usage: node mcp-server.mjs PORT [CERT.pem KEY.pem]  (with a certificate: https)
// Runs on Node.js 18 (Debian 12) and later: ./webcrypto.mjs comes first.
import './webcrypto.mjs';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { randomUUID } from 'node:crypto';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';

const port = Number(process.argv[2] || 18330);
const calls = [];
const auths = [];
const transports = new Map();

function buildServer(auth) {
  const server = new McpServer({ name: 'aw-test-peer', version: '1.0.0' });
  server.tool('notify', 'Records a notification.', { agent_id: z.any().optional(), text: z.string().optional() }
    , async (args, extra) => {
      calls.push({ name: 'notify', arguments: args, authorization: auth.value, session: extra.sessionId });
      return { content: [{ type: 'text', text: `notified ${args.agent_id ?? ''}` }] };
    });
  server.tool('fail', 'Always fails.', { reason: z.string().optional() }, async (args) => {
    calls.push({ name: 'fail', arguments: args, authorization: auth.value });
    return { isError: true, content: [{ type: 'text', text: `refused: ${args.reason ?? 'no reason'}` }] };
  });
  server.tool('slow', 'Succeeds after ms.', { ms: z.number().optional() }, async (args) => {
    await new Promise((r) => setTimeout(r, args.ms ?? 1000));
    calls.push({ name: 'slow', arguments: args, authorization: auth.value });
    return { content: [{ type: 'text', text: 'done' }] };
  });
  return server;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

const [certFile, keyFile] = process.argv.slice(3, 5);
const handler = async (req, res) => {
  try {
    if (req.url === '/_auth') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(auths));
      return;
    }
    if (req.url === '/_calls') {
      if (req.method === 'DELETE') { calls.length = 0; auths.length = 0; }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(calls));
      return;
    }
    if (req.url === '/mcp-broken') {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', error: { code: -32700, message: 'Parse error', data: 'ReferenceError: crypto is not defined' }, id: null }));
      return;
    }
    if (req.url === '/mcp-plain') {
      res.writeHead(403, { 'content-type': 'text/plain' });
      res.end('forbidden by\npolicy');
      return;
    }
    if (req.url.split('?')[0] !== '/mcp') {
      res.writeHead(404).end();
      return;
    }
    auths.push(req.headers['authorization'] || null);
    const raw = req.method === 'POST' ? await readBody(req) : '';
    const body = raw ? JSON.parse(raw) : undefined;
    const sid = req.headers['mcp-session-id'];
    let entry = sid ? transports.get(sid) : undefined;
    if (!entry && req.method === 'POST' && isInitializeRequest(body)) {
      const auth = { value: req.headers['authorization'] || null };
      const transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (id) => transports.set(id, { transport, auth }),
      });
      transport.onclose = () => { if (transport.sessionId) transports.delete(transport.sessionId); };
      await buildServer(auth).connect(transport);
      entry = { transport, auth };
    }
    if (!entry) {
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', error: { code: -32000, message: 'No valid session' }, id: null }));
      return;
    }
    entry.auth.value = req.headers['authorization'] || entry.auth.value;
    await entry.transport.handleRequest(req, res, body);
  } catch (e) {
    console.error(e);
    if (!res.headersSent) res.writeHead(500).end(String(e));
  }
};
const httpServer = certFile
  ? https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) }, handler)
  : http.createServer(handler);

httpServer.listen(port, '127.0.0.1', () => console.log(`mcp peer listening on ${port}${certFile ? ' (https)' : ''}`));
process.on('SIGTERM', () => process.exit(0));
