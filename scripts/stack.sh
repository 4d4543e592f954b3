#!/usr/bin/env bash
# stack.sh: the whole platform on this machine, for `make up`, `make down`
# and `make run`.
#
#   scripts/stack.sh up       servers, migrations, var/env, the five services in the
#                             background; returns once every health check answers 200.
#                             Idempotent: starts only what is not running (or what runs
#                             a binary that has since been rebuilt).
#   scripts/stack.sh down     stops the services (SIGTERM, then KILL), then the servers
#   scripts/stack.sh run      `up`, then follows every log in the foreground; Ctrl-C
#                             stops whatever this run started
#   scripts/stack.sh status   servers and services, with their health
#   scripts/stack.sh env      prints what `up` writes to var/env
#
# Environment: BINDIR (bin), STACK_TIMEOUT (60 s for the health checks),
# STACK_VAR (var), STACK_SERVICES (all five), STACK_PORTS (the services'
# ports in the order above; 8080 8081 4100 9101 9102): the last three let a
# test run a stack beside another.
# Everything already exported when it runs (TELEGRAM_API_BASE, ALLOWED_TARGETS,
# MY_SERVICE_URL...) reaches the services unchanged; JWT_SECRET, INGEST_TOKEN,
# INTERNAL_TOKEN and RUNTIME_SYNC_TOKEN_SIGNING_KEY default to random values
# generated once into var/secrets.
#
# The configuration the stack was started with is kept (SPEC 7): the first
# `up` records the pass-through variables (every name a service reads
# through cfg, and every *_URL) in var/stack.env; a later `up` that starts a
# service again (it crashed, or its binary was rebuilt) gives it those
# values, whatever the calling shell has, and says which ones differ there.
# `down` forgets them, so the next `up` records afresh.
#
# Files: var/log/<service>.log, var/run/<service>.pid, var/env, var/secrets,
# var/stack.env.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
VAR=${STACK_VAR:-$ROOT/var}
BINDIR=${BINDIR:-bin}
[[ $BINDIR == /* ]] || BINDIR=$ROOT/$BINDIR
SERVERS=$ROOT/scripts/servers.sh
STACK_TIMEOUT=${STACK_TIMEOUT:-60}

# A service started from inside a test suite must not carry the suite's
# mark (tests/run.sh kills marked processes when the suite ends).
unset AE_TEST_RUN

ALL_SERVICES=(api-gateway realtime runtime event-processor action-workers)
read -r -a SERVICES <<<"${STACK_SERVICES:-${ALL_SERVICES[*]}}"
read -r -a PORTS <<<"${STACK_PORTS:-8080 8081 4100 9101 9102}"
STACK_ENV=$VAR/stack.env
SECRET_NAMES=(JWT_SECRET INGEST_TOKEN INTERNAL_TOKEN RUNTIME_SYNC_TOKEN_SIGNING_KEY)
# The services' own URLs go to var/env only. They are deliberately not
# named GATEWAY_URL etc.: the gateway registers a proxied service for every
# {NAME}_URL variable it sees, so they are also kept out of the services'
# environment (see service_env).
AE_URLS=(AE_GATEWAY_URL AE_REALTIME_URL AE_RUNTIME_URL AE_EVENT_PROCESSOR_URL AE_ACTION_WORKERS_URL)

log() { printf 'stack: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- service table

service_port() {
    local i
    for i in "${!ALL_SERVICES[@]}"; do
        if [[ ${ALL_SERVICES[$i]} == "$1" ]]; then echo "${PORTS[$i]}"; fi
    done
}

health_url() {
    local port
    port=$(service_port "$1")
    case $1 in
        api-gateway) echo "http://127.0.0.1:$port/api/v1/health" ;;
        realtime | event-processor | action-workers) echo "http://127.0.0.1:$port/health" ;;
        runtime) echo "http://127.0.0.1:$port/healthz" ;;
    esac
}

# The variables that put each service on its port.
service_port_env() {
    local port
    port=$(service_port "$1")
    case $1 in
        api-gateway) echo "SERVER_PORT=$port" ;;
        realtime) echo "PORT=$port" ;;
        runtime) echo "RUNTIME_BIND_ADDR=127.0.0.1:$port" ;;
        event-processor | action-workers) echo "METRICS_PORT=$port" ;;
    esac
}

pidfile() { echo "$VAR/run/$1.pid"; }
logfile() { echo "$VAR/log/$1.log"; }

# ---------------------------------------------------------------- environment

rand_hex() {
    openssl rand -hex 32 2>/dev/null || od -An -tx1 -N32 /dev/urandom | tr -d ' \n'
}

# Development secrets: random, generated once, kept (mode 600) so that
# tokens issued before a restart stay valid after it.
ensure_secrets() {
    local f=$VAR/secrets tmp n
    mkdir -p "$VAR"
    [[ -s $f ]] && return 0
    tmp=$(mktemp "$VAR/.secrets.XXXXXX")
    for n in "${SECRET_NAMES[@]}"; do
        printf '%s=%s\n' "$n" "$(rand_hex)" >>"$tmp"
    done
    chmod 600 "$tmp"
    mv "$tmp" "$f"
}

# Exports each secret from var/secrets unless the environment already has it.
load_secrets() {
    local name value
    ensure_secrets
    while IFS='=' read -r name value; do
        [[ -n $name && -z ${!name:-} ]] || continue
        export "$name=$value"
    done <"$VAR/secrets"
}

# Everything var/env holds, as `export` lines.
env_lines() {
    "$SERVERS" env
    local n
    for n in "${SECRET_NAMES[@]}"; do
        printf 'export %s=%q\n' "$n" "${!n}"
    done
    printf 'export TELEGRAM_API_BASE=%q\n' "${TELEGRAM_API_BASE:-https://api.telegram.org}"
    printf 'export MIGRATIONS_DIR=%q\n' "$MIGRATIONS_DIR"
    printf 'export AE_GATEWAY_URL=%q\n' "http://127.0.0.1:$(service_port api-gateway)"
    printf 'export AE_REALTIME_URL=%q\n' "http://127.0.0.1:$(service_port realtime)"
    printf 'export AE_RUNTIME_URL=%q\n' "http://127.0.0.1:$(service_port runtime)"
    printf 'export AE_EVENT_PROCESSOR_URL=%q\n' "http://127.0.0.1:$(service_port event-processor)"
    printf 'export AE_ACTION_WORKERS_URL=%q\n' "http://127.0.0.1:$(service_port action-workers)"
}

# ---------------------------------------------------------------- recorded configuration

# The pass-through variables: every name the services read through a cfg
# getter (found in the sources, so a new setting is covered without a list
# to keep), and every *_URL in the environment (the gateway proxies a
# service per {NAME}_URL), less the AE_*_URL that stack.sh itself writes.
config_names() {
    {
        grep -rhoE 'cfg_[a-z0-9_]+\([a-z_>.-]+, "[A-Z][A-Z0-9_]*"' "$ROOT"/libshared/*.c "$ROOT"/*/*.c 2>/dev/null |
            sed -E 's/.*"([A-Z0-9_]+)"$/\1/'
        compgen -e | grep -E '^[A-Z][A-Z0-9_]*_URL$' || true
    } | grep -vxF -f <(printf '%s\n' "${AE_URLS[@]}") | sort -u
}

# Prints NAME=VALUE (NUL-terminated) for each pass-through variable this
# process has in its environment.
config_now() {
    local n
    declare -A exported=()
    while read -r n; do exported[$n]=1; done < <(compgen -e)
    while read -r n; do
        if [[ -n ${exported[$n]:-} ]]; then printf '%s=%s\0' "$n" "${!n}"; fi
    done < <(config_names)
}

# Writes the pass-through variables set now to var/stack.env.
record_config() {
    local tmp kv
    mkdir -p "$VAR"
    tmp=$(mktemp "$VAR/.stack.env.XXXXXX")
    {
        echo "# The pass-through configuration of the stack's first \`up\` (scripts/stack.sh); \`down\` removes it."
        while IFS= read -r -d '' kv; do
            printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
        done < <(config_now)
    } >"$tmp"
    chmod 600 "$tmp"
    mv "$tmp" "$STACK_ENV"
}

# Puts this shell's pass-through variables back to what var/stack.env
# recorded (set, or unset when they were not set then), after naming the
# ones that differ. The values are not printed: some are secrets.
apply_recorded_config() {
    local kv n
    local -a differ=()
    declare -A now=() rec=()
    while IFS= read -r -d '' kv; do now[${kv%%=*}]=${kv#*=}; done < <(config_now)
    # The file holds only `export NAME=%q` lines: read in a subshell with
    # everything else unset, it gives back exactly the recorded values.
    while IFS= read -r -d '' kv; do rec[${kv%%=*}]=${kv#*=}; done < <(
        for n in "${!now[@]}"; do unset "$n"; done
        # shellcheck disable=SC1090
        . "$STACK_ENV"
        config_now
    )
    for n in "${!now[@]}" "${!rec[@]}"; do
        if [[ -n ${now[$n]+set} && -n ${rec[$n]+set} && ${now[$n]} == "${rec[$n]}" ]]; then continue; fi
        [[ " ${differ[*]} " == *" $n "* ]] || differ+=("$n")
    done
    for n in "${!now[@]}"; do [[ -n ${rec[$n]+set} ]] || unset "$n"; done
    for n in "${!rec[@]}"; do export "$n=${rec[$n]}"; done
    if ((${#differ[@]} > 0)); then
        log "this environment differs from the one the stack was started with in: $(printf '%s\n' "${differ[@]}" | sort | tr '\n' ' ')"
        log "services started now get the recorded values (${STACK_ENV#"$ROOT"/}); \`make down\` first to start afresh with these"
    fi
}

# Loads the URLs and secrets into this shell's environment.
load_env() {
    eval "$("$SERVERS" env)"
    load_secrets
    # Explicit, so that bin/migrate and every service read the same
    # directory whatever BINDIR is (and var/env says which one).
    export MIGRATIONS_DIR=${MIGRATIONS_DIR:-$ROOT/database/migrations}
    export LOG_FORMAT=${LOG_FORMAT:-json}
}

write_env_file() {
    local tmp
    tmp=$(mktemp "$VAR/.env.XXXXXX")
    {
        echo "# Written by scripts/stack.sh up: . var/env"
        env_lines
    } >"$tmp"
    chmod 600 "$tmp"
    mv "$tmp" "$VAR/env"
}

# ---------------------------------------------------------------- processes

# Prints the pid of our running instance of service $1; fails when there is
# none (no pidfile, a dead pid, or a pid reused by another program).
service_pid() {
    local f pid argv0
    f=$(pidfile "$1")
    [[ -s $f ]] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    argv0=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n1)
    [[ ${argv0##*/} == "$1" ]] || return 1
    echo "$pid"
}

# True when the running process's binary was replaced (by `make`) since it
# started: /proc shows the old inode as "(deleted)".
binary_rebuilt() {
    [[ $(readlink "/proc/$1/exe" 2>/dev/null) == *" (deleted)" ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

http_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

start_service() {
    local name=$1 bin=$BINDIR/$1 pid port log
    [[ -x $bin ]] || die "$bin is not built (run make)"
    if pid=$(service_pid "$name"); then
        if ! binary_rebuilt "$pid"; then
            log "$name: already running (pid $pid)"
            return 0
        fi
        log "$name: binary rebuilt since start; restarting"
        stop_service "$name"
    fi
    port=$(service_port "$name")
    port_open "$port" && die "$name: port $port is already in use by another process"
    log=$(logfile "$name")
    # setsid: services outlive this script and do not see the terminal's
    # Ctrl-C (run stops them with SIGTERM). The working directory is the
    # project root, whose .env the services read. The AE_*_URL variables
    # are dropped (see AE_URLS).
    (
        cd "$ROOT"
        exec env "${AE_URLS[@]/#/-u}" "$(service_port_env "$name")" setsid "$bin"
    ) </dev/null >>"$log" 2>&1 &
    echo $! >"$(pidfile "$name")"
    STARTED_SERVICES+=("$name")
    log "$name: started (pid $!, log ${log#"$ROOT"/})"
}

stop_service() {
    local name=$1 pid i
    if ! pid=$(service_pid "$name"); then
        rm -f "$(pidfile "$name")"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    # SIGTERM lets a service finish in-flight work (bounded); 15 s covers it.
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name: still running 15 s after SIGTERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$name")"
    log "$name: stopped"
}

show_log_tail() {
    local f
    f=$(logfile "$1")
    log "---- last lines of ${f#"$ROOT"/} ----"
    tail -n 40 "$f" >&2 2>/dev/null || true
}

# Waits until every service answers 200 on its health route. A service that
# exits, or is not healthy within STACK_TIMEOUT, fails `up` with its log.
wait_healthy() {
    local -a pending=("${SERVICES[@]}")
    local -a still
    local deadline=$((SECONDS + STACK_TIMEOUT)) name code
    declare -A last=()
    while ((${#pending[@]} > 0)); do
        still=()
        for name in "${pending[@]}"; do
            # Just started, the pid may still be the subshell on its way to
            # exec the service: alive is enough here.
            if ! kill -0 "$(tr -dc 0-9 <"$(pidfile "$name")")" 2>/dev/null; then
                show_log_tail "$name"
                die "$name exited during start-up"
            fi
            code=$(http_status "$(health_url "$name")")
            last[$name]=$code
            [[ $code == 200 ]] || still+=("$name")
        done
        pending=("${still[@]}")
        ((${#pending[@]} > 0)) || break
        if ((SECONDS >= deadline)); then
            for name in "${pending[@]}"; do
                show_log_tail "$name"
                log "$name: $(health_url "$name") answered ${last[$name]:-nothing} (want 200)"
            done
            die "not healthy within ${STACK_TIMEOUT}s: ${pending[*]}"
        fi
        sleep 0.25
    done
}

# ---------------------------------------------------------------- commands

STARTED_SERVICES=()

cmd_up() {
    local name
    mkdir -p "$VAR/log" "$VAR/run"
    if [[ -f $STACK_ENV ]]; then apply_recorded_config; else record_config; fi
    "$SERVERS" start all >/dev/null
    load_env
    [[ -x $BINDIR/migrate ]] || die "$BINDIR/migrate is not built (run make)"
    "$BINDIR/migrate" || die "migrations failed"
    write_env_file
    for name in "${SERVICES[@]}"; do
        start_service "$name"
    done
    wait_healthy
    log "all services healthy; environment in var/env (. var/env)"
    local url
    for name in "${SERVICES[@]}"; do
        url=$(health_url "$name")
        printf '  %-16s %s\n' "$name" "$url"
    done
}

cmd_down_services() {
    local i
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
        stop_service "${SERVICES[$i]}"
    done
}

cmd_down() {
    cmd_down_services
    rm -f "$STACK_ENV"
    "$SERVERS" stop all
}

cmd_status() {
    local rc=0 name pid code
    "$SERVERS" status all || rc=3
    for name in "${SERVICES[@]}"; do
        if pid=$(service_pid "$name"); then
            code=$(http_status "$(health_url "$name")")
            log "$name: running (pid $pid), $(health_url "$name") -> $code"
            [[ $code == 200 ]] || rc=3
        else
            log "$name: stopped"
            rc=3
        fi
    done
    return "$rc"
}

# Which servers are up before `run` starts anything, so Ctrl-C stops only
# what this run started.
servers_up_before() {
    local s
    for s in pg redis rabbitmq; do
        if "$SERVERS" status "$s" >/dev/null 2>&1; then printf '%s\n' "$s"; fi
    done
}

RUN_TAIL=""
RUN_SERVERS_BEFORE=()
run_cleanup() {
    trap - INT TERM
    local s i
    local -a stop=()
    [[ -n $RUN_TAIL ]] && kill "$RUN_TAIL" 2>/dev/null
    log "stopping what this run started"
    for ((i = ${#STARTED_SERVICES[@]} - 1; i >= 0; i--)); do
        stop_service "${STARTED_SERVICES[$i]}"
    done
    for s in pg redis rabbitmq; do
        printf '%s\n' "${RUN_SERVERS_BEFORE[@]}" | grep -qx "$s" || stop+=("$s")
    done
    if ((${#stop[@]} > 0)); then "$SERVERS" stop "${stop[@]}"; fi
    exit 130
}

cmd_run() {
    local -a logs=()
    local name
    mapfile -t RUN_SERVERS_BEFORE < <(servers_up_before)
    trap run_cleanup INT TERM
    cmd_up
    for name in "${SERVICES[@]}"; do logs+=("$(logfile "$name")"); done
    log "following the logs; Ctrl-C stops what this run started"
    tail -n 20 -F "${logs[@]}" &
    RUN_TAIL=$!
    # `wait` returns when a signal arrives, so the trap runs promptly.
    while true; do wait "$RUN_TAIL" || true; sleep 1; done
}

cmd_env() {
    load_env
    env_lines
}

usage() {
    log "usage: $0 {up|down|run|status|env}"
    exit 2
}

main() {
    case ${1:-} in
        up) cmd_up ;;
        down) cmd_down ;;
        run) cmd_run ;;
        status) cmd_status ;;
        env) cmd_env ;;
        *) usage ;;
    esac
}

main "$@"
