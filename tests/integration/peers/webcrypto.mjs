// Node.js 18 (Debian 12's) has the Web Crypto API only as node:crypto's
// `webcrypto`, not as the global `crypto` that the MCP SDK calls (its
// transport answered every request "ReferenceError: crypto is not
// defined"). Imported first by mcp-server.mjs, so the global exists before
// the SDK's modules run. Node 20 and later already have it.
import { webcrypto } from 'node:crypto';

if (!globalThis.crypto) {
  Object.defineProperty(globalThis, 'crypto', { value: webcrypto, configurable: true, enumerable: false, writable: true });
}
