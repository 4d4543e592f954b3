#!/bin/sh
# Installs the MCP test peer's dependencies (the official MCP SDK from npm)
# under tests/integration/peers/node_modules. Idempotent and quick when they
# are already there. Fails loudly: the MCP tests must not skip.
set -eu
cd "$(dirname "$0")"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "setup.sh: node or npm not found: install the Debian packages nodejs and npm (scripts/deps.sh does)" >&2
    exit 1
fi
if [ -f node_modules/@modelcontextprotocol/sdk/package.json ] && [ -f node_modules/.aw-installed ] &&
   [ node_modules/.aw-installed -nt package.json ]; then
    exit 0
fi
npm install --no-audit --no-fund --loglevel=error >&2
node -e "import('@modelcontextprotocol/sdk/server/mcp.js').then(() => process.exit(0), (e) => { console.error(e); process.exit(1) })"
touch node_modules/.aw-installed
