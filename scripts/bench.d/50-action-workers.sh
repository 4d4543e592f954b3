#!/usr/bin/env bash
# Benchmark: action-workers REST deliveries per second to a local keep-alive
# nginx sink (`return 200`) at WORKER_CONCURRENCY=64, against wrk (-t2 -c64)
# on the same sink in the same run, in interleaved rounds (awbench.sh says
# how). Bars: median ratio >= 0.5, and the workers' CPU per delivery <= 2 x
# wrk's per request.
#
# Environment: BENCH_JOBS (200000 per round: steady state), BENCH_SECONDS
# (wrk, 5), BENCH_ROUNDS (3), BINDIR (bin), WORKER_THREADS, BENCH_PERF=1.
set -euo pipefail
# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init action-workers
# shellcheck source=scripts/bench.d/awbench.sh
. "$ROOT/scripts/bench.d/awbench.sh"
bench_env
export BENCH_JOBS=${BENCH_JOBS:-200000}
AW_NAME=action-workers
AW_SCHEME=http
awbench_main
