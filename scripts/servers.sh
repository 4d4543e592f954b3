#!/usr/bin/env bash
# servers.sh: the project's own PostgreSQL, Redis and RabbitMQ, kept under
# ./var so that nothing depends on (or disturbs) system-wide instances.
#
#   scripts/servers.sh start   [pg|redis|rabbitmq|all]   start what is not running, wait until it answers
#   scripts/servers.sh stop    [pg|redis|rabbitmq|all]
#   scripts/servers.sh restart [pg|redis|rabbitmq|all]   pg: `pg_ctl restart -m fast` (seconds); fails on a
#                                                        server this checkout did not start (it cannot restart it)
#   scripts/servers.sh status  [pg|redis|rabbitmq|all]   exit 0 only when all named are up
#   scripts/servers.sh env                               `export` lines for the three URLs
#   scripts/servers.sh vhost NAME                        creates RabbitMQ virtual host NAME (guest may use it);
#                                                        a suite's own queues, apart from the default vhost's
#
# Ports (override with AE_PG_PORT, AE_REDIS_PORT, AE_AMQP_PORT, AE_AMQP_DIST_PORT):
#   PostgreSQL 127.0.0.1:55432  db erc8004_backend, user/password erc8004/erc8004
#              (superuser postgres/postgres; socket in var/pg/run; md5 on TCP)
#   Redis      127.0.0.1:56379  appendonly, so a restart keeps every queued job
#   RabbitMQ   127.0.0.1:55672  node rabbit_ae@localhost, distribution port 55673, guest/guest
#
# When DATABASE_URL, REDIS_URL or AMQP_URL is already set and points at
# another host or port, the matching server is not started: that one is used.
#
# Where the data lives: var/pg, var/redis, var/rabbitmq. PostgreSQL and
# RabbitMQ refuse to run as root, so as root they run as the `postgres` and
# `rabbitmq` users, which must be able to traverse every parent directory of
# the project. When one cannot (a checkout under /root, say), the server
# directories move to /tmp/ae-srv-<hash of the project path> and var/pg,
# var/redis and var/rabbitmq become symlinks to them.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
VAR=$ROOT/var

# tests/run.sh marks the processes a test suite starts with AE_TEST_RUN and
# kills them afterwards; a server (re)started from inside a test must not
# carry that mark, or it would be killed with the suite's leftovers.
unset AE_TEST_RUN

# The servers outlive this script, so they must not inherit what its caller
# holds open: `flock /tmp/bench.lock scripts/bench.sh` runs with the lock
# on fd 3, and servers that scripts/bench.sh started kept the lock (every
# benchmark waited) until they stopped. Bash keeps the script itself on a
# descriptor from 255 up, which stays.
for _fd in $(cd /proc/self/fd && echo *); do
    if ((_fd > 2 && _fd < 255)); then eval "exec $_fd>&-"; fi
done
unset _fd

PG_PORT=${AE_PG_PORT:-55432}
REDIS_PORT=${AE_REDIS_PORT:-56379}
AMQP_PORT=${AE_AMQP_PORT:-55672}
AMQP_DIST_PORT=${AE_AMQP_DIST_PORT:-55673}
# One node name per port, so that two checkouts on different ports can run
# side by side (epmd refuses a second node of the same name).
RABBIT_NODE=rabbit_ae@localhost
[[ $AMQP_PORT == 55672 ]] || RABBIT_NODE=rabbit_ae_$AMQP_PORT@localhost
RABBIT_BIN=/usr/lib/rabbitmq/bin

DB_NAME=erc8004_backend
DB_USER=erc8004
DB_PASS=erc8004

OUR_DATABASE_URL="postgres://$DB_USER:$DB_PASS@127.0.0.1:$PG_PORT/$DB_NAME"
OUR_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
OUR_AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"

PG_TIMEOUT=${AE_PG_TIMEOUT:-60}
REDIS_TIMEOUT=${AE_REDIS_TIMEOUT:-20}
RABBIT_TIMEOUT=${AE_RABBIT_TIMEOUT:-120}

log() { printf '%s\n' "$*" >&2; }
die() { log "servers: error: $*"; exit 1; }

# ---------------------------------------------------------------- helpers

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Our ports lie inside Linux's ephemeral range (32768-60999), so any client
# socket may happen to hold one as its local port (in TIME-WAIT for a
# minute) and make our bind fail. As root we add them to
# ip_local_reserved_ports, which only stops the kernel from handing them out
# as ephemeral ports; as another user we cannot, and wait_port_unused copes.
reserve_ports() {
    local f=/proc/sys/net/ipv4/ip_local_reserved_ports cur add="" p
    [[ $EUID -eq 0 && -w $f ]] || return 0
    cur=$(cat "$f")
    for p in "$PG_PORT" "$REDIS_PORT" "$AMQP_PORT" "$AMQP_DIST_PORT"; do
        port_reserved "$cur" "$p" || add+=",$p"
    done
    [[ -n $add ]] || return 0
    cur=${cur:+$cur}${add}
    echo "${cur#,}" >"$f" 2>/dev/null || log "warning: could not reserve ports ${add#,}"
}

# True when port $2 is in the reserved list $1 ("a,b-c,..." as the kernel
# prints it).
port_reserved() {
    awk -v list="$1" -v p="$2" 'BEGIN {
        n = split(list, parts, ",")
        for (i = 1; i <= n; i++) {
            m = split(parts[i], r, "-")
            if (m == 1 && r[1] == p) exit 0
            if (m == 2 && p >= r[1] + 0 && p <= r[2] + 0) exit 0
        }
        exit 1
    }'
}

# True when a listener could bind 127.0.0.1:$1 now. Servers set
# SO_REUSEADDR, so their own connections left in TIME-WAIT do not matter;
# only a client socket that got the port as its ephemeral port does.
port_bindable() {
    [[ -x /usr/bin/python3 ]] || return 0
    /usr/bin/python3 - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
PY
}

# Waits (up to 65 s, the TIME-WAIT period) until port $1 can be bound, so
# that the server started next does not die with "Address already in use".
wait_port_unused() {
    local port=$1 deadline=$((SECONDS + 65)) said=0
    until port_bindable "$port"; do
        if [[ $said -eq 0 ]]; then
            log "port $port is held by another socket (an ephemeral client port?); waiting up to 65s"
            said=1
        fi
        ((SECONDS < deadline)) || return 0
        sleep 1
    done
}

# Prints the last lines of the given files (those that exist), for errors.
show_tail() {
    local f
    for f in "$@"; do
        [[ -f $f ]] || continue
        log "---- last lines of $f ----"
        tail -n "${AE_TAIL_LINES:-30}" "$f" >&2 || true
    done
}

# True when the pid in file $1 is alive and its command name is $2.
pidfile_alive() {
    local pid comm
    [[ -s $1 ]] || return 1
    pid=$(head -n1 "$1" | tr -dc 0-9)
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$2"* ]]
}

pidfile_pid() { head -n1 "$1" 2>/dev/null | tr -dc 0-9; }

# Waits up to $1 seconds for pid $2 to exit.
wait_pid_gone() {
    local deadline=$((SECONDS + $1))
    while kill -0 "$2" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# True when URL $1 is unset/empty or names 127.0.0.1/localhost on port $2:
# then the server is ours to run. Anything else "points elsewhere".
url_is_ours() {
    local url=$1 port=$2 hostport host p
    [[ -z $url ]] && return 0
    hostport=${url#*://}
    hostport=${hostport##*@}
    hostport=${hostport%%/*}
    hostport=${hostport%%\?*}
    host=${hostport%:*}
    p=${hostport##*:}
    [[ $hostport == *:* ]] || p=""
    [[ $host == 127.0.0.1 || $host == localhost || $host == "[::1]" ]] && [[ $p == "$port" ]]
}

# The server directories must be reachable by the users the servers run as
# (see the header). Prints the directory that holds pg/, redis/, rabbitmq/.
SRV=""
server_root() {
    mkdir -p "$VAR"
    if [[ $EUID -ne 0 ]]; then
        SRV=$VAR
    elif runuser -u postgres -- test -x "$VAR" 2>/dev/null &&
        runuser -u rabbitmq -- test -x "$VAR" 2>/dev/null; then
        SRV=$VAR
    else
        SRV=/tmp/ae-srv-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)
        mkdir -p "$SRV"
        chmod 755 "$SRV"
        link_fallback
    fi
}

# In fallback mode, var/<name> points at the real directory so that the
# layout stays discoverable from the project.
link_fallback() {
    local d
    for d in pg redis rabbitmq; do
        mkdir -p "$SRV/$d"
        if [[ ! -e $VAR/$d || -L $VAR/$d ]]; then
            ln -sfn "$SRV/$d" "$VAR/$d"
        fi
    done
}

# Runs a command as the given system user when we are root (PostgreSQL and
# RabbitMQ refuse root), else as ourselves. From /, because the service
# user may not be allowed into the current directory.
as_user() {
    local user=$1
    shift
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u "$user" -- "$@")
    else
        "$@"
    fi
}

# Gives a directory tree to a service user (no-op unless root).
own() {
    local user=$1
    shift
    [[ $EUID -eq 0 ]] || return 0
    chown -R "$user:" "$@"
}

# Serializes start/stop/restart between concurrent invocations (two
# terminals, a test suite and `make up`), so initdb never runs twice.
take_lock() {
    mkdir -p "$VAR"
    exec 9>"$VAR/.servers.lock"
    flock -w 600 9 || die "another servers.sh holds $VAR/.servers.lock"
}

# ---------------------------------------------------------------- PostgreSQL

pg_paths() {
    local bin
    PG_BINDIR=${PG_BINDIR:-}
    if [[ -z $PG_BINDIR ]]; then
        bin=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
        PG_BINDIR=${bin:-/usr/lib/postgresql/15/bin}
    fi
    [[ -x $PG_BINDIR/pg_ctl ]] || die "PostgreSQL server binaries not found in $PG_BINDIR (run scripts/deps.sh or set PG_BINDIR)"
    PG_DIR=$SRV/pg
    PGDATA_DIR=$PG_DIR/data
    PG_LOG=$PG_DIR/postgresql.log
    PG_SOCK=$PG_DIR/run
    # A Unix socket path is limited to 107 bytes; deep checkouts get a short one.
    if ((${#PG_SOCK} + 20 > 100)); then
        PG_SOCK=/tmp/ae-pgsock-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)
    fi
    PG_USER_OS=postgres
    [[ $EUID -eq 0 ]] || PG_USER_OS=$(id -un)
}

pg() { as_user "$PG_USER_OS" "$PG_BINDIR/$1" "${@:2}"; }

pg_ours_running() {
    [[ -f $PGDATA_DIR/PG_VERSION ]] || return 1
    pg pg_ctl -D "$PGDATA_DIR" status >/dev/null 2>&1
}

pg_init() {
    [[ -f $PGDATA_DIR/PG_VERSION ]] && return 0
    log "pg: initdb in $PGDATA_DIR"
    mkdir -p "$PG_DIR"
    own "$PG_USER_OS" "$PG_DIR"
    # C locale: deterministic sorting in tests and no dependency on
    # generated locales; UTF8 for the JSON and text we store.
    if ! pg initdb -D "$PGDATA_DIR" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=md5 >"$PG_DIR/initdb.log" 2>&1; then
        show_tail "$PG_DIR/initdb.log"
        die "initdb failed"
    fi
    # Settings that depend on this checkout's paths are rewritten on every
    # start into ae.conf; postgresql.conf only includes it.
    printf "\ninclude_if_exists = 'ae.conf'\n" | as_user "$PG_USER_OS" tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null
}

pg_write_conf() {
    mkdir -p "$PG_SOCK"
    own "$PG_USER_OS" "$PG_SOCK"
    as_user "$PG_USER_OS" tee "$PGDATA_DIR/ae.conf" >/dev/null <<EOF
# Written by scripts/servers.sh on every start; edits are lost.
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_SOCK'
# Integration tests run several services with a pool of 10 each.
max_connections = 300
# Development data: survives any process crash (the kernel has the WAL);
# only an OS crash could lose the last commits. Keeps tests fast on 2 cores.
fsync = off
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
EOF
}

# Creates the application role and database when missing. Idempotent, runs
# on every start (a few milliseconds).
pg_bootstrap() {
    local out
    if ! out=$(pg psql -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAtX 2>&1 <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
        CREATE ROLE $DB_USER LOGIN CREATEDB PASSWORD '$DB_PASS';
    END IF;
    -- DROP DATABASE ... WITH (FORCE) must also end an autovacuum worker
    -- that happens to be in the database; without this role it fails
    -- with "must be a member of the role whose process is being terminated".
    IF NOT pg_has_role('$DB_USER', 'pg_signal_backend', 'MEMBER') THEN
        GRANT pg_signal_backend TO $DB_USER;
    END IF;
    IF (SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'postgres') THEN
        ALTER ROLE postgres PASSWORD 'postgres';
    END IF;
END
\$\$;
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')
\gexec
SQL
    ); then
        log "$out"
        die "pg: could not create role $DB_USER / database $DB_NAME"
    fi
}

pg_ready() { "$PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; }

pg_start() {
    if ! url_is_ours "${DATABASE_URL:-}" "$PG_PORT"; then
        log "pg: DATABASE_URL points elsewhere; not starting our own"
        return 0
    fi
    if pg_ours_running; then
        log "pg: already running (port $PG_PORT)"
        pg_bootstrap
        return 0
    fi
    if port_open "$PG_PORT"; then
        pg_use_foreign
        return 0
    fi
    pg_init
    pg_write_conf
    wait_port_unused "$PG_PORT"
    rm -f "$PG_SOCK/.s.PGSQL.$PG_PORT.lock" 2>/dev/null || true
    touch "$PG_LOG"
    own "$PG_USER_OS" "$PG_LOG"
    # 9>&-: the server must not inherit the lock, or it would hold it forever.
    if ! pg pg_ctl -D "$PGDATA_DIR" -l "$PG_LOG" -w -t "$PG_TIMEOUT" start >/dev/null 2>&1 9>&- || ! pg_ready; then
        show_tail "$PG_LOG"
        die "pg: did not start within ${PG_TIMEOUT}s (port $PG_PORT)"
    fi
    pg_bootstrap
    log "pg: started (port $PG_PORT, data $PGDATA_DIR)"
}

# Another PostgreSQL (another checkout's, say) already serves the port: use
# it when our credentials work, because two cannot share the port.
pg_use_foreign() {
    if PGPASSWORD=$DB_PASS PGCONNECT_TIMEOUT=5 "$PG_BINDIR/psql" -h 127.0.0.1 -p "$PG_PORT" \
        -U "$DB_USER" -d "$DB_NAME" -qAtX -c 'select 1' >/dev/null 2>&1; then
        log "pg: port $PG_PORT is served by a PostgreSQL this checkout did not start; using it"
    else
        die "pg: port $PG_PORT is taken by something that is not a usable PostgreSQL (not ours: $PGDATA_DIR)"
    fi
}

pg_stop() {
    if ! pg_ours_running; then
        log "pg: not running"
        return 0
    fi
    pg pg_ctl -D "$PGDATA_DIR" -m fast -w -t "$PG_TIMEOUT" stop >/dev/null ||
        die "pg: pg_ctl stop failed"
    log "pg: stopped"
}

# Fast restart for tests that exercise reconnection: in-flight sessions are
# disconnected (-m fast) and the server is back in about a second.
pg_restart() {
    if ! pg_ours_running; then
        pg_start
        return 0
    fi
    pg_write_conf
    if ! pg pg_ctl -D "$PGDATA_DIR" -l "$PG_LOG" -m fast -w -t "$PG_TIMEOUT" restart >/dev/null 2>&1 9>&- || ! pg_ready; then
        show_tail "$PG_LOG"
        die "pg: restart failed"
    fi
    log "pg: restarted (port $PG_PORT)"
}

pg_status() {
    if ! url_is_ours "${DATABASE_URL:-}" "$PG_PORT"; then
        log "pg: external (DATABASE_URL points elsewhere)"
        return 0
    fi
    if pg_ours_running; then
        log "pg: running (pid $(pidfile_pid "$PGDATA_DIR/postmaster.pid"), port $PG_PORT, data $PGDATA_DIR)"
        return 0
    fi
    if port_open "$PG_PORT"; then
        log "pg: port $PG_PORT served by a PostgreSQL this checkout did not start (up, not ours)"
        return 0
    fi
    log "pg: stopped"
    return 3
}

# ---------------------------------------------------------------- Redis

redis_paths() {
    REDIS_DIR=$SRV/redis
    REDIS_PID=$REDIS_DIR/redis.pid
    REDIS_LOG=$REDIS_DIR/redis.log
}

redis_ours_running() { pidfile_alive "$REDIS_PID" redis-server; }

redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_write_conf() {
    mkdir -p "$REDIS_DIR"
    cat >"$REDIS_DIR/redis.conf" <<EOF
# Written by scripts/servers.sh on every start; edits are lost.
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
pidfile $REDIS_PID
logfile $REDIS_LOG
dir $REDIS_DIR
# The append-only file is the persistence: every acknowledged write reaches
# the kernel before the reply, so a restart (even kill -9) loses no job.
appendonly yes
appendfsync everysec
# No RDB snapshots: nothing to fail in the background, no MISCONF errors.
save ""
stop-writes-on-bgsave-error no
EOF
}

redis_start() {
    if ! url_is_ours "${REDIS_URL:-}" "$REDIS_PORT"; then
        log "redis: REDIS_URL points elsewhere; not starting our own"
        return 0
    fi
    if redis_ours_running; then
        log "redis: already running (port $REDIS_PORT)"
        return 0
    fi
    if port_open "$REDIS_PORT"; then
        redis_ping || die "redis: port $REDIS_PORT is taken by something that is not Redis"
        log "redis: port $REDIS_PORT is served by a Redis this checkout did not start; using it"
        return 0
    fi
    redis_write_conf
    wait_port_unused "$REDIS_PORT"
    rm -f "$REDIS_PID"
    redis-server "$REDIS_DIR/redis.conf" >>"$REDIS_LOG" 2>&1 9>&- || {
        show_tail "$REDIS_LOG"
        die "redis: redis-server failed to start"
    }
    local deadline=$((SECONDS + REDIS_TIMEOUT))
    until redis_ping; do
        if ((SECONDS >= deadline)); then
            show_tail "$REDIS_LOG"
            die "redis: no PONG within ${REDIS_TIMEOUT}s (port $REDIS_PORT)"
        fi
        sleep 0.1
    done
    log "redis: started (port $REDIS_PORT, data $REDIS_DIR)"
}

redis_stop() {
    local pid
    if ! redis_ours_running; then
        log "redis: not running"
        return 0
    fi
    pid=$(pidfile_pid "$REDIS_PID")
    # SHUTDOWN flushes the append-only file before exiting.
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone 30 "$pid"; then
        log "redis: still running after 30s; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    log "redis: stopped"
}

redis_status() {
    if ! url_is_ours "${REDIS_URL:-}" "$REDIS_PORT"; then
        log "redis: external (REDIS_URL points elsewhere)"
        return 0
    fi
    if redis_ours_running; then
        log "redis: running (pid $(pidfile_pid "$REDIS_PID"), port $REDIS_PORT, data $REDIS_DIR)"
        return 0
    fi
    if port_open "$REDIS_PORT"; then
        log "redis: port $REDIS_PORT served by a Redis this checkout did not start (up, not ours)"
        return 0
    fi
    log "redis: stopped"
    return 3
}

# ---------------------------------------------------------------- RabbitMQ

rabbit_paths() {
    RABBIT_DIR=$SRV/rabbitmq
    RABBIT_PID=$RABBIT_DIR/rabbitmq.pid
    RABBIT_STARTUP_LOG=$RABBIT_DIR/startup.log
    RABBIT_USER_OS=rabbitmq
    RABBIT_RUNAS=(runuser -u rabbitmq --)
    if [[ $EUID -ne 0 ]]; then
        RABBIT_USER_OS=$(id -un)
        RABBIT_RUNAS=()
    fi
    # One environment for the server and the CLI tools: the same node name
    # and the same HOME, hence the same Erlang cookie, so rabbitmqctl and
    # rabbitmq-diagnostics can talk to the node. RABBITMQ_CONF_ENV_FILE
    # points at our (empty) file so /etc/rabbitmq/rabbitmq-env.conf cannot
    # change ports or names. The distribution port is explicit because the
    # default (AMQP port + 20000) would be out of range.
    RABBIT_ENV=(
        "HOME=$RABBIT_DIR/home"
        "RABBITMQ_NODENAME=$RABBIT_NODE"
        "RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
        "RABBITMQ_NODE_PORT=$AMQP_PORT"
        "RABBITMQ_DIST_PORT=$AMQP_DIST_PORT"
        "RABBITMQ_CONF_ENV_FILE=$RABBIT_DIR/rabbitmq-env.conf"
        "RABBITMQ_CONFIG_FILE=$RABBIT_DIR/rabbitmq.conf"
        "RABBITMQ_ADVANCED_CONFIG_FILE=$RABBIT_DIR/advanced.config"
        "RABBITMQ_ENABLED_PLUGINS_FILE=$RABBIT_DIR/enabled_plugins"
        "RABBITMQ_MNESIA_BASE=$RABBIT_DIR/mnesia"
        "RABBITMQ_LOG_BASE=$RABBIT_DIR/log"
        "RABBITMQ_PID_FILE=$RABBIT_PID"
        "ERL_CRASH_DUMP=$RABBIT_DIR/log/erl_crash.dump"
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
    )
}

# Runs a RabbitMQ CLI tool against our node; `timeout` bounds it because a
# CLI that cannot reach epmd may hang.
rabbit() {
    local secs=$1 tool=$2
    shift 2
    (cd / && timeout "$secs" "${RABBIT_RUNAS[@]}" env "${RABBIT_ENV[@]}" "$RABBIT_BIN/$tool" "$@")
}

rabbit_ours_running() { pidfile_alive "$RABBIT_PID" beam; }

rabbit_prepare() {
    mkdir -p "$RABBIT_DIR"/{home,mnesia,log}
    : >"$RABBIT_DIR/rabbitmq-env.conf"
    # No plugins: the node boots faster and the AMQP port is all we need.
    printf '[].\n' >"$RABBIT_DIR/enabled_plugins"
    cat >"$RABBIT_DIR/rabbitmq.conf" <<EOF
# Written by scripts/servers.sh on every start; edits are lost.
# guest/guest may connect from loopback only (RabbitMQ's default, stated).
loopback_users.guest = true
log.file.level = info
log.console = false
EOF
    # RabbitMQ creates its feature-flags file, cookie and Mnesia files as its
    # own user; anything root-owned here makes it die at boot.
    own "$RABBIT_USER_OS" "$RABBIT_DIR"
}

rabbit_launch() {
    [[ -x $RABBIT_BIN/rabbitmq-server ]] || die "RabbitMQ not found in $RABBIT_BIN (run scripts/deps.sh)"
    rabbit_prepare
    wait_port_unused "$AMQP_PORT"
    wait_port_unused "$AMQP_DIST_PORT"
    rm -f "$RABBIT_PID"
    # setsid: the node must outlive this script and ignore the terminal's
    # Ctrl-C (stack.sh run stops it explicitly).
    (cd "$RABBIT_DIR" && exec setsid "${RABBIT_RUNAS[@]}" env "${RABBIT_ENV[@]}" "$RABBIT_BIN/rabbitmq-server") \
        </dev/null >>"$RABBIT_STARTUP_LOG" 2>&1 9>&- &
    RABBIT_LAUNCHER=$!
}

rabbit_wait() {
    local deadline=$((SECONDS + RABBIT_TIMEOUT))
    until port_open "$AMQP_PORT" && rabbit_ours_running; do
        if ! kill -0 "$RABBIT_LAUNCHER" 2>/dev/null; then
            show_tail "$RABBIT_STARTUP_LOG" "$RABBIT_DIR/log/$RABBIT_NODE.log"
            die "rabbitmq: the node exited during start-up"
        fi
        if ((SECONDS >= deadline)); then
            show_tail "$RABBIT_STARTUP_LOG" "$RABBIT_DIR/log/$RABBIT_NODE.log"
            die "rabbitmq: AMQP port $AMQP_PORT not open within ${RABBIT_TIMEOUT}s"
        fi
        sleep 0.25
    done
    # The listener opens near the end of boot; await_startup confirms that
    # the node finished booting (and that the CLI tools reach it).
    if ! rabbit $((RABBIT_TIMEOUT + 10)) rabbitmqctl -q await_startup --timeout "$RABBIT_TIMEOUT" >/dev/null 2>&1; then
        show_tail "$RABBIT_STARTUP_LOG" "$RABBIT_DIR/log/$RABBIT_NODE.log"
        die "rabbitmq: rabbitmqctl await_startup failed"
    fi
    log "rabbitmq: started (port $AMQP_PORT, node $RABBIT_NODE, data $RABBIT_DIR)"
}

# Returns 0 when a launch is under way (rabbit_wait must follow).
rabbit_start_begin() {
    RABBIT_LAUNCHER=""
    if ! url_is_ours "${AMQP_URL:-}" "$AMQP_PORT"; then
        log "rabbitmq: AMQP_URL points elsewhere; not starting our own"
        return 1
    fi
    if rabbit_ours_running; then
        log "rabbitmq: already running (port $AMQP_PORT)"
        return 1
    fi
    if port_open "$AMQP_PORT"; then
        log "rabbitmq: port $AMQP_PORT is served by something this checkout did not start; using it"
        return 1
    fi
    rabbit_launch
}

rabbit_stop() {
    local pid
    if ! rabbit_ours_running; then
        log "rabbitmq: not running"
        return 0
    fi
    pid=$(pidfile_pid "$RABBIT_PID")
    # `shutdown` returns once the Erlang VM has exited.
    rabbit 90 rabbitmqctl -q shutdown >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone 30 "$pid"; then
        log "rabbitmq: still running after 30s; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    log "rabbitmq: stopped"
}

rabbit_status() {
    if ! url_is_ours "${AMQP_URL:-}" "$AMQP_PORT"; then
        log "rabbitmq: external (AMQP_URL points elsewhere)"
        return 0
    fi
    if rabbit_ours_running; then
        if port_open "$AMQP_PORT"; then
            log "rabbitmq: running (pid $(pidfile_pid "$RABBIT_PID"), port $AMQP_PORT, node $RABBIT_NODE, data $RABBIT_DIR)"
            return 0
        fi
        log "rabbitmq: booting (pid $(pidfile_pid "$RABBIT_PID"), port $AMQP_PORT not open yet)"
        return 3
    fi
    if port_open "$AMQP_PORT"; then
        log "rabbitmq: port $AMQP_PORT served by something this checkout did not start (up, not ours)"
        return 0
    fi
    log "rabbitmq: stopped"
    return 3
}

# ---------------------------------------------------------------- commands

print_env() {
    printf 'export DATABASE_URL=%q\n' "${DATABASE_URL:-$OUR_DATABASE_URL}"
    printf 'export REDIS_URL=%q\n' "${REDIS_URL:-$OUR_REDIS_URL}"
    printf 'export AMQP_URL=%q\n' "${AMQP_URL:-$OUR_AMQP_URL}"
}

print_urls() {
    printf 'DATABASE_URL=%s\n' "${DATABASE_URL:-$OUR_DATABASE_URL}"
    printf 'REDIS_URL=%s\n' "${REDIS_URL:-$OUR_REDIS_URL}"
    printf 'AMQP_URL=%s\n' "${AMQP_URL:-$OUR_AMQP_URL}"
}

# Expands "all" and aliases into TARGETS (each name once, in start order).
TARGETS=()
targets() {
    local t n
    [[ $# -eq 0 ]] && set -- all
    for t in "$@"; do
        case $t in
            all) n="pg redis rabbitmq" ;;
            pg | postgres | postgresql) n=pg ;;
            redis) n=redis ;;
            rabbitmq | rabbit | amqp) n=rabbitmq ;;
            *) die "unknown server '$t' (pg, redis, rabbitmq, all)" ;;
        esac
        for n in $n; do
            has "$n" "${TARGETS[@]}" || TARGETS+=("$n")
        done
    done
}

has() {
    local want=$1 t
    shift
    for t in "$@"; do [[ $t == "$want" ]] && return 0; done
    return 1
}

cmd_start() {
    local -a ts=("$@")
    local launched=1
    take_lock
    # RabbitMQ takes the longest to boot: launch it first, start the
    # others meanwhile, then wait for it.
    if has rabbitmq "${ts[@]}"; then
        rabbit_start_begin && launched=0
    fi
    if has pg "${ts[@]}"; then pg_start; fi
    if has redis "${ts[@]}"; then redis_start; fi
    if [[ $launched -eq 0 ]]; then rabbit_wait; fi
    print_urls
}

cmd_stop() {
    local -a ts=("$@")
    take_lock
    if has rabbitmq "${ts[@]}"; then rabbit_stop; fi
    if has redis "${ts[@]}"; then redis_stop; fi
    if has pg "${ts[@]}"; then pg_stop; fi
}

# A restart must take the server down and up again: the tests that restart
# one check that its clients notice and reconnect. A server on the port
# that this checkout did not start (another worktree's, a dead clone's) was
# "using it" to start and "not running" to stop, so restart did nothing and
# exited 0, and those tests passed without any restart (RTES's consumer
# never lost the broker). Refuse instead.
restart_refuse_foreign() {
    local name=$1 port=$2 ours=$3 url=$4
    url_is_ours "$url" "$port" || die "$name: cannot restart a server this checkout does not run (its URL points elsewhere)"
    if ! "$ours" && port_open "$port"; then
        die "$name: cannot restart: port $port is served by something this checkout did not start (stop it, or give this checkout ports of its own: AE_PG_PORT, AE_REDIS_PORT, AE_AMQP_PORT)"
    fi
}

cmd_restart() {
    local -a ts=("$@")
    local launched=1
    take_lock
    if has rabbitmq "${ts[@]}"; then restart_refuse_foreign rabbitmq "$AMQP_PORT" rabbit_ours_running "${AMQP_URL:-}"; fi
    if has pg "${ts[@]}"; then restart_refuse_foreign pg "$PG_PORT" pg_ours_running "${DATABASE_URL:-}"; fi
    if has redis "${ts[@]}"; then restart_refuse_foreign redis "$REDIS_PORT" redis_ours_running "${REDIS_URL:-}"; fi
    if has rabbitmq "${ts[@]}"; then
        rabbit_stop
        rabbit_start_begin && launched=0
    fi
    if has pg "${ts[@]}"; then pg_restart; fi
    if has redis "${ts[@]}"; then
        redis_stop
        redis_start
    fi
    if [[ $launched -eq 0 ]]; then rabbit_wait; fi
}

# A virtual host of our RabbitMQ for guest: queues declared there (durable
# ones, say) never meet the same names in the default vhost.
cmd_vhost() {
    local name=$1
    [[ $name =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "vhost: a name of letters, digits, _ . - (got '$name')"
    url_is_ours "${AMQP_URL:-}" "$AMQP_PORT" || die "vhost: AMQP_URL points elsewhere"
    rabbit_status >/dev/null 2>&1 || die "vhost: rabbitmq is not running (servers.sh start rabbitmq)"
    if ! rabbit 60 rabbitmqctl -q list_vhosts name 2>/dev/null | grep -qx "$name"; then
        rabbit 60 rabbitmqctl -q add_vhost "$name" >/dev/null || die "vhost: add_vhost $name failed"
    fi
    rabbit 60 rabbitmqctl -q set_permissions -p "$name" guest '.*' '.*' '.*' >/dev/null ||
        die "vhost: set_permissions on $name failed"
}

cmd_status() {
    local rc=0 t
    for t in "$@"; do
        case $t in
            pg) pg_status || rc=3 ;;
            redis) redis_status || rc=3 ;;
            rabbitmq) rabbit_status || rc=3 ;;
        esac
    done
    return "$rc"
}

usage() {
    log "usage: $0 {start|stop|restart|status} [pg|redis|rabbitmq|all]"
    log "       $0 env     # export lines for DATABASE_URL, REDIS_URL, AMQP_URL"
    log "       $0 vhost NAME"
    exit 2
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || usage
    shift
    if [[ $cmd == env ]]; then
        print_env
        return 0
    fi
    if [[ $cmd == vhost ]]; then
        [[ $# -eq 1 ]] || usage
        server_root
        rabbit_paths
        cmd_vhost "$1"
        return 0
    fi
    targets "$@"
    local -a ts=("${TARGETS[@]}")
    server_root
    reserve_ports
    pg_paths
    redis_paths
    rabbit_paths
    case $cmd in
        start) cmd_start "${ts[@]}" ;;
        stop) cmd_stop "${ts[@]}" ;;
        restart) cmd_restart "${ts[@]}" ;;
        status) cmd_status "${ts[@]}" ;;
        *) usage ;;
    esac
}

main "$@"
