#!/usr/bin/env bash
# Benchmarks of the runtime (issue 14): appends/s to one run and over 100
# runs from 32 clients, each against pgbench single-row commits on the same
# private, durable (fsync=on) PostgreSQL cluster, and the append-to-WebSocket
# frame p99 at 1,000 appends/s. The driver is runtime_bench.py (see its
# header for the method and the environment).
set -euo pipefail

# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# A session of its own at autogroup nice -10 when it may (lib.sh), both
# sides of each ratio alike; the first line says which.
bench_session runtime "$@"
echo "runtime benchmarks: $AUTOGROUP"
ROOT=$BENCH_ROOT
bench_need wrk pgbench node
O=${O:-build}
bench_drivers rt_ws_latency
"$ROOT/tests/integration/setup-node.sh" >&2
exec /usr/bin/python3 "$ROOT/scripts/bench.d/runtime_bench.py"
