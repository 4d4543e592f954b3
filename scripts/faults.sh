#!/usr/bin/env bash
# faults.sh: `make faults`, fault injection under load against the stack of
# `make up` (scripts/stack.sh), run beside any other stack on this machine.
# Arguments go to tests/faults/faults.py (--faults, --rate, --services...;
# --help lists them). docs/reliability.md says what is checked.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
# Debian's python3 has python3-psycopg2 and python3-redis (see tests/run.sh).
exec /usr/bin/python3 -u tests/faults/faults.py "$@"
