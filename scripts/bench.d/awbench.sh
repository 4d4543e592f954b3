# shellcheck shell=bash disable=SC2034
# awbench.sh: the action-workers delivery benchmark, over http
# (50-action-workers.sh) or https (55-action-workers-https.sh). Sourced after
# lib.sh and bench_init; the caller sets AW_NAME, AW_SCHEME (http or https) and, for https,
# AW_SSL_CONF (nginx's ssl lines) and AW_CA (the CA the workers trust), then
# calls awbench_main.
#
# Every delivery is a full job: leased from Redis, rendered, signed, POSTed,
# its action_results row written to PostgreSQL and its outcome recorded in
# Redis. Uses a private redis-server and nginx under var/bench/$AW_NAME;
# PostgreSQL: the server of BENCH_DATABASE_URL, else DATABASE_URL (var/env),
# else the local dev server, in a database of its own recreated each run
# (rows deleted by earlier runs would leave the table bloated and the
# timing drifting; each round starts from TRUNCATE).
#
# Fairness: wrk (-t2 -c64, keep-alive) and the workers (WORKER_CONCURRENCY=64)
# hit the same nginx sink (one process, no master, keep-alive) on the same
# machine. BENCH_ROUNDS rounds, each wrk then the workers, so the two
# alternate on the same machine state; the summary is the median of the
# rounds. The jobs are loaded into a staging list before the workers start
# and moved into action_jobs with one RENAME once they answer /healthz, so
# the timed span is deliveries only.
#
# Each round also gives CPU time per request of our process (the workers)
# and of the anchor's (wrk), and of the sink (nginx) under each: utime +
# stime over the measured span (lib.sh), divided by the requests made in it.
# That figure does not depend on how fast the other processes on the 2
# cores are. Bars: median deliveries/s >= 0.5 x wrk's requests/s, and the
# workers' CPU per delivery <= AW_CPU_BAR x wrk's per request (issue 9.6:
# 2 over http; a caller that sets AW_CPU_BAR empty has it reported only).
#
# Environment: BENCH_JOBS (100000 per round), BENCH_SECONDS (wrk, 5),
# BENCH_ROUNDS (3), BINDIR (bin), WORKER_THREADS (the workers' default);
# BENCH_PERF=1 records a call-graph profile of the workers' timed spans
# (perf record, var/bench/$AW_NAME/perf-N.data).

AW_RATIO_BAR=${BENCH_AW_BAR:-0.5}
AW_CPU_BAR=${BENCH_AW_CPU_BAR:-2.0}

awbench_sink() {
    nginx_start nginx "$AW_WORK/nginx" 1 "        listen 127.0.0.1:$AW_SINK_PORT${AW_SSL_CONF:+ ssl};
        ${AW_SSL_CONF:-}
        location / { return 200 \"ok\"; }"
    AW_NGINX=$BENCH_LAST_PID
}

# One run of the workers over $JOBS jobs: sets R_N, R_SECS, R_AW_TICKS,
# R_NG_TICKS and R_ROWS.
awbench_aw_round() {
    local aw c0 c1 n0 n1 start end perfpid=""
    /usr/bin/python3 - "$AW_REDIS_PORT" "$AW_URL/hook" "$AW_JOBS" <<'PYEOF'
import json, sys, redis
port, url, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
r = redis.Redis(port=port)
r.delete("action_jobs_bench_stage")
p = r.pipeline(transaction=False)
for i in range(n):
    p.lpush("action_jobs_bench_stage", json.dumps({
        "id": "bench-%d" % i, "trigger_id": "bench-trigger", "event_id": "bench-ev-%d" % i, "action_type": "rest",
        "priority": 1, "attempt": 0, "created_at": "2024-01-01T00:00:00Z",
        "config": {"method": "POST", "url": url,
                   "body_template": "{\"agent\":{{agent_id}},\"score\":{{score}}}"},
        "event": {"id": "bench-ev-%d" % i, "agent_id": i, "score": 90, "event_type": "NewFeedback"}}))
    if i % 5000 == 4999:
        p.execute()
p.execute()
PYEOF
    psql "$AW_DBURL" -qc "TRUNCATE action_results" >/dev/null
    env DATABASE_URL="$AW_DBURL" REDIS_URL="redis://127.0.0.1:$AW_REDIS_PORT/0" WORKER_CONCURRENCY=64 \
        METRICS_PORT=$AW_METRICS_PORT METRICS_HOST=127.0.0.1 ALLOWED_TARGETS=127.0.0.1 WEBHOOK_SECRET=bench \
        ${AW_CA:+CA_BUNDLE=$AW_CA} LOG_LEVEL=warn "$BINDIR/action-workers" 2>"$AW_WORK/action-workers.log" &
    aw=$!
    wait_http "http://127.0.0.1:$AW_METRICS_PORT/healthz" 30 200 "$aw" >&2 ||
        { echo "$AW_NAME: action-workers did not start; see $AW_WORK/action-workers.log" >&2; return 1; }
    if [[ -n ${BENCH_PERF:-} ]]; then
        perf record -q -g -p "$aw" -o "$AW_WORK/perf-$1.data" 2>/dev/null &
        perfpid=$!
        sleep 0.3
    fi
    c0=$(proc_ticks "$aw")
    n0=$(proc_ticks "$AW_NGINX")
    # One Python process starts the clock, releases the jobs and polls until
    # none is left (no redis-cli forked every few milliseconds next to the
    # workload).
    read -r start end < <(/usr/bin/python3 - "$AW_REDIS_PORT" "$aw" <<'PYEOF'
import os, sys, time, redis
r = redis.Redis(port=int(sys.argv[1]))
pid = int(sys.argv[2])
left = r.register_script("return redis.call('LLEN','action_jobs') + redis.call('ZCARD','action_jobs_inflight')"
                         " + redis.call('ZCARD','action_jobs_delayed')")
start = time.time()
r.rename("action_jobs_bench_stage", "action_jobs")
while left() != 0:
    os.kill(pid, 0)
    time.sleep(0.01)
print("%.6f %.6f" % (start, time.time()))
PYEOF
    ) || { echo "$AW_NAME: action-workers died; see $AW_WORK/action-workers.log" >&2; return 1; }
    c1=$(proc_ticks "$aw")
    n1=$(proc_ticks "$AW_NGINX")
    if [[ -n $perfpid ]]; then
        kill -INT "$perfpid"
        wait "$perfpid" || true
    fi
    kill -TERM "$aw"
    wait "$aw" || true
    R_N=$AW_JOBS
    R_SECS=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.6f", b - a }')
    R_AW_TICKS=$((c1 - c0))
    R_NG_TICKS=$((n1 - n0))
    R_ROWS=$(psql "$AW_DBURL" -tAc "SELECT count(*) FROM action_results WHERE status = 'success'")
}

awbench_main() {
    local i rows_ok=1 ok=1 line
    local -a rate=() wrk=() ratios=() aw_us=() wrk_us=() ng_aw=() ng_wrk=() cpu_ratios=()
    AW_WORK=$BENCH_VAR/$AW_NAME
    AW_JOBS=${BENCH_JOBS:-100000}
    local secs=${BENCH_SECONDS:-5} rounds=${BENCH_ROUNDS:-3}
    mkdir -p "$AW_WORK"
    bench_need nginx wrk redis-server redis-cli psql curl ss
    [[ -z ${BENCH_PERF:-} ]] || bench_need perf
    bench_built action-workers migrate
    AW_SINK_PORT=$(free_port)
    AW_REDIS_PORT=$(free_port)
    AW_METRICS_PORT=$(free_port)
    AW_URL=$AW_SCHEME://127.0.0.1:$AW_SINK_PORT
    awbench_sink
    bench_spawn redis "$AW_WORK/redis.out" redis-server --port "$AW_REDIS_PORT" --bind 127.0.0.1 --save '' \
        --appendonly no --dir "$AW_WORK"
    for _ in $(seq 50); do
        redis-cli -p "$AW_REDIS_PORT" ping >/dev/null 2>&1 &&
            curl -s -o /dev/null ${AW_CA:+--cacert "$AW_CA"} "$AW_URL/" && break
        sleep 0.1
    done
    curl -sf -o /dev/null ${AW_CA:+--cacert "$AW_CA"} "$AW_URL/" ||
        { echo "$AW_NAME: the nginx sink does not answer; see $AW_WORK/nginx/error.log" >&2; exit 1; }

    local base=${BENCH_DATABASE_URL:-${DATABASE_URL:-postgresql://erc8004:erc8004@127.0.0.1:55432/erc8004_backend}}
    local db=ae_bench_${AW_NAME//-/_}
    AW_DBURL=${base%/*}/$db
    psql "$base" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
    DATABASE_URL=$AW_DBURL "$BINDIR/migrate" >"$AW_WORK/migrate.log" 2>&1 || { cat "$AW_WORK/migrate.log" >&2; exit 1; }

    for ((i = 1; i <= rounds; i++)); do
        bench_log "$AW_NAME: round $i/$rounds: wrk"
        wrk_measure "$AW_URL/" "${secs}s" 64 2 "$AW_NGINX"
        wrk+=("$M_RPS") wrk_us+=("$M_WRK_US") ng_wrk+=("$M_US")
        bench_log "$AW_NAME: round $i/$rounds: action-workers ($AW_JOBS jobs)"
        awbench_aw_round "$i"
        [[ $R_ROWS == "$R_N" ]] || rows_ok=0
        rate+=("$(awk -v n="$R_N" -v s="$R_SECS" 'BEGIN { printf "%d", n / s }')")
        aw_us+=("$(ticks_us "$R_AW_TICKS" "$R_N")") ng_aw+=("$(ticks_us "$R_NG_TICKS" "$R_N")")
        ratios+=("$(ratio "${rate[-1]}" "${wrk[-1]}")")
        cpu_ratios+=("$(ratio "${aw_us[-1]}" "${wrk_us[-1]}")")
        echo "$AW_NAME: round $i: ${rate[-1]} deliveries/s, wrk ${wrk[-1]} requests/s, ratio ${ratios[-1]}; CPU per" \
            "request: workers ${aw_us[-1]} us, wrk ${wrk_us[-1]} us (${cpu_ratios[-1]}x); nginx ${ng_aw[-1]} us under" \
            "the workers, ${ng_wrk[-1]} us under wrk"
    done
    local r cr
    r=$(median "${ratios[@]}")
    cr=$(median "${cpu_ratios[@]}")
    at_least "$r" "$AW_RATIO_BAR" || ok=0
    if [[ -n $AW_CPU_BAR ]]; then awk -v r="$cr" -v b="$AW_CPU_BAR" 'BEGIN { exit !(r + 0 <= b + 0) }' || ok=0; fi
    ((rows_ok)) || ok=0
    line=$(printf '%s: median of %d rounds: %s REST deliveries/s (concurrency 64, %s) against wrk'"'"'s %s requests/s on the same nginx sink; ratio %s (bar >= %s); CPU per request: workers %s us, wrk %s us, CPU ratio %s (bar <= %s); nginx %s us per delivery, %s us per wrk request' \
        "$AW_NAME" "$rounds" "$(median "${rate[@]}")" "$( ((rows_ok)) && echo "every job a success row" || echo "MISSING success rows")" \
        "$(median "${wrk[@]}")" "$r" "$AW_RATIO_BAR" "$(median "${aw_us[@]}")" "$(median "${wrk_us[@]}")" "$cr" \
        "${AW_CPU_BAR:-none}" "$(median "${ng_aw[@]}")" "$(median "${ng_wrk[@]}")")
    if ((ok)); then echo "$line PASS"; else echo "$line FAIL"; return 1; fi
}
