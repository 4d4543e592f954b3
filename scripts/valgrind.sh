#!/usr/bin/env bash
# valgrind.sh: one short integration run of each service under memcheck
# (tests/valgrind/services.py says what it drives and what passes). `make
# valgrind` runs it after the unit tests; it needs the programs built
# (BINDIR, default bin) and starts the local servers itself.
#
#   scripts/valgrind.sh            # logs in var/valgrind/
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
export BINDIR=${BINDIR:-bin}
scripts/servers.sh start all >/dev/null
eval "$(scripts/servers.sh env | sed 's/^export /export TEST_/')"
tests/integration/setup-node.sh >/dev/null
exec /usr/bin/python3 tests/valgrind/services.py
