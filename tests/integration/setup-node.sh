#!/bin/sh
# Installs the integration tests' npm packages (jsonwebtoken, @redocly/cli, ws, eventsource, amqplib)
# under tests/integration/node_modules from package-lock.json. Idempotent and
# fast when already installed: it does nothing when node_modules matches the
# lock file (npm writes node_modules/.package-lock.json on install).
set -eu
cd "$(dirname "$0")"
if ! command -v npm >/dev/null 2>&1; then
    echo "setup-node.sh: npm not found: install the Debian package npm (scripts/deps.sh does)" >&2
    exit 1
fi
stamp=node_modules/.ae-installed
if [ -f "$stamp" ] && [ -f package-lock.json ] && cmp -s package-lock.json "$stamp" \
    && [ -d node_modules/jsonwebtoken ] && [ -d node_modules/ws ] && [ -d node_modules/eventsource ] && [ -d node_modules/amqplib ] && [ -x node_modules/.bin/redocly ]; then
    exit 0
fi
if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
else
    npm install --no-audit --no-fund --loglevel=error
fi
cp package-lock.json "$stamp"
