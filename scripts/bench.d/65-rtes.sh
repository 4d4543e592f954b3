#!/usr/bin/env bash
# Benchmark: RTES node status messages per second, each consumed from
# RabbitMQ, stored in PostgreSQL (committed before its ack) and fanned out
# to 100 WebSocket watchers of its execution, against a plain AMQP consumer
# that only acks, on the same broker in the same run. Bar: ratio >= 0.5.
#
# Both sides drain a queue filled beforehand with the same N messages,
# through the same librabbitmq with the same prefetch (the anchor acks each
# message; ours acks each burst once it is committed):
#   anchor: tests/integration/drivers/rtes_bench consume, timed from its
#           first message to its last;
#   ours:   bin/realtime started on the full queue, timed from its launch
#           (start-up included) until every one of the 100 watchers (a C
#           client, rtes_bench watch) has all N frames; the watchers join
#           while it consumes, so they read the first part from history.
# Rounds alternate anchor and ours; the median ratio is reported. Every
# round checks that PostgreSQL holds the N events and that no watcher got a
# frame missing or repeated.
#
# Environment: BENCH_RTES_MESSAGES (30000), BENCH_RTES_PREFETCH (100),
# BENCH_RTES_ROUNDS (3), BENCH_RTES_WATCHERS (100), BINDIR (bin), O (build).
set -euo pipefail
# shellcheck source=scripts/bench.d/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_init rtes
bench_env
bench_servers DATABASE_URL REDIS_URL AMQP_URL
N=${BENCH_RTES_MESSAGES:-30000}
PREFETCH=${BENCH_RTES_PREFETCH:-100}
ROUNDS=${BENCH_RTES_ROUNDS:-3}
WATCHERS=${BENCH_RTES_WATCHERS:-100}

bench_drivers rtes_bench
DRV=$ROOT/$O/tests/drivers/rtes_bench
bench_built realtime

# A database of its own, created afresh each run (realtime migrates it).
DBURL=${DATABASE_URL%/*}/ae_bench_rtes
psql "$DATABASE_URL" -qc "DROP DATABASE IF EXISTS ae_bench_rtes WITH (FORCE)" -c "CREATE DATABASE ae_bench_rtes" >/dev/null
RURL=${REDIS_URL%/*}/9

anchor=()
ours=()
ratios=()
for r in $(seq "$ROUNDS"); do
    # The anchor.
    "$DRV" publish "$AMQP_URL" bench.plain x "$N" >/dev/null
    secs=$("$DRV" consume "$AMQP_URL" bench.plain "$N" "$PREFETCH" | awk '/^consumed/ {print $4}')
    a=$(awk -v n="$N" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    anchor+=("$a")

    # Ours.
    eid=bench-$r-$RANDOM$RANDOM
    "$DRV" publish "$AMQP_URL" workflow.node.status "$eid" "$N" >/dev/null
    port=$(free_port)
    t0=$(date +%s.%N)
    bench_spawn realtime "$WORK/realtime-$r.log" env PORT="$port" HOST=127.0.0.1 DATABASE_URL="$DBURL" \
        REDIS_URL="$RURL" AMQP_URL="$AMQP_URL" RTES_SKIP_AUTH=1 RABBITMQ_PREFETCH_COUNT="$PREFETCH" \
        LOG_LEVEL=warn MIGRATIONS_DIR="$ROOT/database/migrations" "$BINDIR/realtime"
    rt=$BENCH_LAST_PID
    wait_http "http://127.0.0.1:$port/health" 30 200 "$rt"
    line=$("$DRV" watch 127.0.0.1 "$port" "$eid" "$WATCHERS" "$N") || {
        echo "65-rtes: the watchers failed; see $WORK/realtime-$r.log" >&2
        exit 1
    }
    t1=$(awk '{print $NF}' <<<"$line")
    cpu=$(awk '{print $14 + $15}' "/proc/$rt/stat")
    bench_cleanup
    rows=$(psql "$DBURL" -tAc "SELECT count(*) FROM rtes_events WHERE execution_id = '$eid'")
    if [[ $rows != "$N" ]]; then
        echo "65-rtes: round $r stored $rows events, not $N" >&2
        exit 1
    fi
    o=$(awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
    ours+=("$o")
    ratios+=("$(ratio "$o" "$a")")
    bench_log "65-rtes: round $r: ours $o msg/s (realtime CPU $((cpu * 1000 / $(getconf CLK_TCK))) ms), plain consumer $a msg/s"
    psql "$DBURL" -qc "DELETE FROM rtes_executions WHERE execution_id = '$eid'" >/dev/null
done

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
mr=$(median "${ratios[@]}")
echo "rtes: $N node status messages consumed, stored and fanned out to $WATCHERS watchers: $(median "${ours[@]}") msg/s (median of $ROUNDS; rounds ${ours[*]})"
echo "rtes: plain AMQP consumer that only acks, same broker and prefetch $PREFETCH: $(median "${anchor[@]}") msg/s (rounds ${anchor[*]})"
if at_least "$mr" 0.5; then
    echo "rtes: median ratio $mr (rounds ${ratios[*]}; bar >= 0.5) PASS"
else
    echo "rtes: median ratio $mr (rounds ${ratios[*]}; bar >= 0.5) FAIL"
    exit 1
fi
