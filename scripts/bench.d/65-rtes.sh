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
#   ours:   bin/realtime started on the full queue, timed from its
#           consumer's subscription (its log line "rtes consumer
#           subscribed": like the anchor's clock, after the connections
#           are made) until every one of the 100 watchers (a C client,
#           rtes_bench watch) has all N frames; the watchers join while it
#           consumes, so they read the first part from history. The rate
#           from its launch (process start, connections, migrations
#           check: about 0.1 to 0.3 s) is printed beside it.
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

# CPU of the servers both sides use (reaped children included, so the
# PostgreSQL backends of a finished realtime count).
PG_PID=$(listener_pid "${AE_PG_PORT:-55432}")
MQ_PID=$(listener_pid "${AE_AMQP_PORT:-5672}")
RD_PID=$(listener_pid "${AE_REDIS_PORT:-56379}")
HZ=$(getconf CLK_TCK)
# A test that restarted PostgreSQL or the broker from a niced shell leaves
# them niced: ours then waits on every store (about 10x slower), the
# anchor much less. Say so rather than report such a run silently.
SRV_NICE="nice: PostgreSQL $(ps -o ni= -p "$PG_PID" | tr -d ' '), broker $(ps -o ni= -p "$MQ_PID" | tr -d ' ')"
if [[ $SRV_NICE != "nice: PostgreSQL 0, broker 0" ]]; then
    bench_log "65-rtes: warning: servers run niced ($SRV_NICE); restart them unniced for a fair figure"
fi

anchor=()
ours=()
launch=()
ratios=()
lratios=()
a_us=()
o_us=()
for r in $(seq "$ROUNDS"); do
    # The anchor: the broker's CPU and the consumer's.
    "$DRV" publish "$AMQP_URL" bench.plain x "$N" >/dev/null
    m0=$(proc_ticks "$MQ_PID")
    cpu_run ccpu "$DRV" consume "$AMQP_URL" bench.plain "$N" "$PREFETCH" >"$WORK/consume.out"
    m1=$(proc_ticks "$MQ_PID")
    secs=$(awk '/^consumed/ {print $4}' "$WORK/consume.out")
    a=$(awk -v n="$N" -v s="$secs" 'BEGIN { printf "%.0f", n / s }')
    anchor+=("$a")
    au=$(awk -v t=$((m1 - m0)) -v hz="$HZ" -v c="$ccpu" -v n="$N" 'BEGIN { printf "%.1f", (t / hz + c) * 1e6 / n }')
    a_us+=("$au")

    # Ours: realtime, the watchers, and the broker, PostgreSQL and Redis.
    eid=bench-$r-$RANDOM$RANDOM
    "$DRV" publish "$AMQP_URL" workflow.node.status "$eid" "$N" >/dev/null
    port=$(free_port)
    s0=$(proc_ticks "$MQ_PID" "$PG_PID" "$RD_PID")
    # (The log is appended to across runs: this run's part starts here.)
    logoff=$(stat -c %s "$WORK/realtime-$r.log" 2>/dev/null || echo 0)
    t0=$(date +%s.%N)
    bench_spawn realtime "$WORK/realtime-$r.log" env PORT="$port" HOST=127.0.0.1 DATABASE_URL="$DBURL" \
        REDIS_URL="$RURL" AMQP_URL="$AMQP_URL" RTES_SKIP_AUTH=1 RABBITMQ_PREFETCH_COUNT="$PREFETCH" \
        LOG_LEVEL=info MIGRATIONS_DIR="$ROOT/database/migrations" "$BINDIR/realtime"
    rt=$BENCH_LAST_PID
    wait_http "http://127.0.0.1:$port/health" 30 200 "$rt"
    # (cpu_run keeps the command's stderr for `time`: the driver's goes to a file.)
    if ! cpu_run wcpu bash -c '"$@" 2>"$0"' "$WORK/watch.err" "$DRV" watch 127.0.0.1 "$port" "$eid" "$WATCHERS" "$N" \
        >"$WORK/watch.out"; then
        cat "$WORK/watch.err" >&2
        echo "65-rtes: the watchers failed; see $WORK/realtime-$r.log" >&2
        exit 1
    fi
    t1=$(awk '{print $NF}' "$WORK/watch.out")
    cpu=$(awk '{print $14 + $15}' "/proc/$rt/stat")
    bench_cleanup
    s1=$(proc_ticks "$MQ_PID" "$PG_PID" "$RD_PID")
    rows=$(psql "$DBURL" -tAc "SELECT count(*) FROM rtes_events WHERE execution_id = '$eid'")
    if [[ $rows != "$N" ]]; then
        echo "65-rtes: round $r stored $rows events, not $N" >&2
        exit 1
    fi
    # The subscription's time, from the log's ISO 8601 UTC stamp (ms).
    sub=$(tail -c +$((logoff + 1)) "$WORK/realtime-$r.log" | grep -m1 '"msg":"rtes consumer subscribed"' | sed -E 's/.*"ts":"([^"]+)".*/\1/')
    if [[ -z $sub ]]; then
        echo "65-rtes: round $r: no 'rtes consumer subscribed' line in $WORK/realtime-$r.log" >&2
        exit 1
    fi
    ts=$(date -u -d "$sub" +%s.%N)
    o=$(awk -v n="$N" -v a="$ts" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
    ol=$(awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }')
    ours+=("$o")
    launch+=("$ol")
    ratios+=("$(ratio "$o" "$a")")
    lratios+=("$(ratio "$ol" "$a")")
    ou=$(awk -v t=$((s1 - s0 + cpu)) -v hz="$HZ" -v c="$wcpu" -v n="$N" 'BEGIN { printf "%.1f", (t / hz + c) * 1e6 / n }')
    o_us+=("$ou")
    bench_log "65-rtes: round $r: ours $o msg/s ($ol from launch), $ou us CPU/msg (realtime $((cpu * 1000 / HZ)) ms," \
        "watchers ${wcpu} s, broker+PostgreSQL+Redis $(((s1 - s0) * 1000 / HZ)) ms);" \
        "plain consumer $a msg/s, $au us CPU/msg (broker $(((m1 - m0) * 1000 / HZ)) ms, consumer ${ccpu} s)"
    psql "$DBURL" -qc "DELETE FROM rtes_executions WHERE execution_id = '$eid'" >/dev/null
done

mr=$(median "${ratios[@]}")
echo "rtes: $N node status messages consumed, stored and fanned out to $WATCHERS watchers: $(median "${ours[@]}") msg/s from the subscription, $(median "${launch[@]}") from the launch, $(median "${o_us[@]}") us CPU/msg, all processes (median of $ROUNDS; rounds ${ours[*]}; load average $(cut -d' ' -f1 /proc/loadavg), servers' $SRV_NICE)"
echo "rtes: plain AMQP consumer that only acks, same broker and prefetch $PREFETCH: $(median "${anchor[@]}") msg/s, $(median "${a_us[@]}") us CPU/msg, broker and consumer (rounds ${anchor[*]})"
echo "rtes: timed from the launch instead: median ratio $(median "${lratios[@]}") (rounds ${lratios[*]})"
if at_least "$mr" 0.5; then
    echo "rtes: median ratio $mr (rounds ${ratios[*]}; bar >= 0.5) PASS"
else
    echo "rtes: median ratio $mr (rounds ${ratios[*]}; bar >= 0.5) FAIL"
    exit 1
fi
