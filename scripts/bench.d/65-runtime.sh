#!/usr/bin/env bash
# Benchmarks of the runtime (issue 14): appends/s to one run and over 100
# runs from 32 clients, each against pgbench single-row commits on the same
# private, durable (fsync=on) PostgreSQL cluster, and the append-to-WebSocket
# frame p99 at 1,000 appends/s. The driver is runtime_bench.py (see its
# header for the method and the environment).
set -euo pipefail

# The kernel shares CPU time between sessions (autogroup) before nice
# counts, so other sessions' niced builds and fuzzers take as much as this
# one: under the bench lock this benchmark runs in a session of its own at
# autogroup nice -10 when it may (as 60-realtime.sh does), both sides of
# each ratio alike, and its first line says which.
if [[ -z ${BENCH_RUNTIME_SESSION:-} && -w /proc/self/autogroup ]] && command -v setsid >/dev/null; then
    BENCH_RUNTIME_SESSION=1 exec setsid -w bash "$0" "$@"
fi
if (echo -10 >/proc/self/autogroup) 2>/dev/null; then AUTOGROUP="autogroup nice -10"; else AUTOGROUP="autogroup as found"; fi
echo "runtime benchmarks: $AUTOGROUP"
# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$BENCH_ROOT
bench_need wrk pgbench node
O=${O:-build}
bench_drivers rt_ws_latency
"$ROOT/tests/integration/setup-node.sh" >&2
exec /usr/bin/python3 "$ROOT/scripts/bench.d/runtime_bench.py"
