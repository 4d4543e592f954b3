#!/usr/bin/env bash
# Benchmark: action-workers REST deliveries over https per second to a local
# nginx TLS sink (`return 200`, keep-alive), at WORKER_CONCURRENCY=64,
# against wrk (-t2 -c64, keep-alive) on the same sink in the same run, in
# interleaved rounds (awbench.sh says how). Bar (issue 9.2): median ratio >=
# 0.5, as over http (50-action-workers.sh); CPU per request is reported
# beside it (BENCH_AW_CPU_BAR makes it a bar too).
#
# Every delivery is POSTed over TLS with the sink's certificate verified (a
# CA made here with openssl, given to the workers as CA_BUNDLE).
#
# Environment: BENCH_JOBS (100000 per round), BENCH_SECONDS (wrk, 5),
# BENCH_ROUNDS (3), BINDIR (bin), WORKER_THREADS (the workers' default);
# BENCH_PERF=1 records a call-graph profile of the workers' timed spans
# (perf record, var/bench/action-workers-https/perf-N.data).
set -euo pipefail
# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init action-workers-https
# shellcheck source=scripts/bench.d/awbench.sh
. "$ROOT/scripts/bench.d/awbench.sh"
bench_env
AW_NAME=action-workers-https
AW_SCHEME=https
bench_need openssl

# A CA and the sink's certificate (127.0.0.1), made afresh: nothing kept.
PKI=$WORK/pki
rm -rf "$PKI" && mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.pem" \
    -days 2 -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$PKI/sink.key" -out "$PKI/sink.csr" \
    -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >"$PKI/sink.ext"
openssl x509 -req -in "$PKI/sink.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
    -extfile "$PKI/sink.ext" -out "$PKI/sink.pem" 2>/dev/null

AW_CPU_BAR=${BENCH_AW_CPU_BAR:-}
AW_CA=$PKI/ca.pem
AW_SSL_CONF="ssl_certificate $PKI/sink.pem; ssl_certificate_key $PKI/sink.key; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:bench:1m;"
awbench_main
