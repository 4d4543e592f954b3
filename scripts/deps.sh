#!/usr/bin/env bash
# deps.sh: installs the Debian packages the build, the local servers, the
# tests and the benchmarks need. Idempotent and fast: when dpkg already
# reports every package installed it exits without touching apt (so
# `make test` and `make up` pay only a dpkg-query on every run).
#
# Every command the build, the tests, the benchmarks and the scripts run
# comes from a package here (tests/integration/tools.py maps each command to
# its package, and test_tools.py checks that both lists agree), or from npm
# with a lock file (tests/integration/package.json, peers/package.json).
#
# Installing needs root; as another user it goes through sudo. Debian's
# maintainer scripts would start system-wide PostgreSQL, Redis, RabbitMQ,
# nginx and Prometheus on their default ports; a temporary /usr/sbin/policy-rc.d forbids
# that (and keeps nginx's postinst from failing when port 80 is taken), and
# whatever got started anyway is stopped again: the project runs servers of
# its own under ./var (scripts/servers.sh).
set -euo pipefail

PACKAGES=(
    build-essential pkg-config
    libmicrohttpd-dev libpq-dev libhiredis-dev librabbitmq-dev libwebsockets-dev libwebsockets-evlib-ev libev-dev
    libcjson-dev libcurl4-openssl-dev libjwt-dev libcmocka-dev libssl-dev libcrypt-dev
    postgresql postgresql-client redis-server redis-tools rabbitmq-server nginx-light
    wrk curl openssl iproute2 procps ca-certificates python3 python3-psycopg2 python3-redis
    clang libclang-rt-14-dev valgrind
)
# Installed without their Recommends: prometheus (for promtool, which checks
# /metrics) recommends prometheus-node-exporter, which pulls smartmontools
# and openipmi, daemons of their own. docker-compose (tests/integration/
# test_docker.py checks docker/docker-compose.yml with it) recommends
# docker.io, a container engine we neither need nor want started.
PACKAGES_NO_RECOMMENDS=(prometheus docker-compose)
# `make docker-test` only (scripts/deps.sh docker): it builds the images
# with podman on a base image made by debootstrap. Installed without their
# Recommends too.
PACKAGES_DOCKER=(podman debootstrap)
# `make lint` only (scripts/deps.sh lint).
PACKAGES_LINT=(cppcheck clang-tidy)
POLICY_RC=/usr/sbin/policy-rc.d
WANT_NODE=1

log() { printf 'deps: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Prints the packages dpkg does not report as fully installed. Node.js and
# npm (the integration tests' JWT cross-check, OpenAPI linter and MCP peer
# come from npm) are judged by their commands instead: a NodeSource nodejs
# bundles npm, and Debian's npm package would conflict with it.
missing_packages() {
    local p status
    for p in "$@"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        [[ $status == installed ]] || printf '%s\n' "$p"
    done
    if [[ $WANT_NODE -eq 1 ]] && { ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; }; then
        printf '%s\n' nodejs npm
    fi
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -- "$@"
    else
        die "need root to run: $* (not root and sudo is missing)"
    fi
}

# policy-rc.d exit code 101 means "action forbidden": invoke-rc.d then skips
# starting services from maintainer scripts. We install ours only when none
# exists, and remove only ours.
POLICY_INSTALLED=0
block_service_starts() {
    if as_root test -e "$POLICY_RC"; then
        return 0
    fi
    printf '#!/bin/sh\n# installed by scripts/deps.sh for the duration of apt-get install\nexit 101\n' |
        as_root tee "$POLICY_RC" >/dev/null
    as_root chmod 755 "$POLICY_RC"
    POLICY_INSTALLED=1
}

unblock_service_starts() {
    if [[ $POLICY_INSTALLED -eq 1 ]]; then
        as_root rm -f "$POLICY_RC"
        POLICY_INSTALLED=0
    fi
}

# Stops a system instance that a postinst may have started despite
# policy-rc.d (e.g. on a host where it already existed). These are the
# packages' own instances on default ports, never ours under ./var.
stop_system_services() {
    local svc
    for svc in postgresql redis-server rabbitmq-server nginx prometheus; do
        if [[ -x /etc/init.d/$svc ]] && as_root /etc/init.d/"$svc" status >/dev/null 2>&1; then
            log "stopping the system $svc the package started"
            as_root /etc/init.d/"$svc" stop >/dev/null 2>&1 || log "warning: could not stop system $svc"
        fi
    done
}

# Reports (does not kill) anything still listening on the packages' default
# ports, so an interfering leftover is visible.
report_default_ports() {
    local port
    command -v ss >/dev/null 2>&1 || return 0
    for port in 5432 6379 5672 25672 80; do
        if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
            log "warning: something still listens on default port $port (not ours; our servers use 55432/56379/55672)"
        fi
    done
}

# Installs the packages named after the first argument, which says whether
# their Recommends come too ("recommends" or "no-recommends").
apt_install() {
    local rec=$1
    shift
    (($# > 0)) || return 0
    local -a opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    [[ $rec == recommends ]] || opts+=(--no-install-recommends)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@"
}

install_packages() {
    local -a missing=("$@") plain=() norec=() p
    for p in "${missing[@]}"; do
        if [[ " ${PACKAGES_NO_RECOMMENDS[*]} ${PACKAGES_DOCKER[*]} " == *" $p "* ]]; then norec+=("$p"); else plain+=("$p"); fi
    done
    log "installing: ${missing[*]}"
    trap unblock_service_starts EXIT
    block_service_starts
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    apt_install recommends "${plain[@]}"
    apt_install no-recommends "${norec[@]}"
    unblock_service_starts
    trap - EXIT
    stop_system_services
    report_default_ports
}

main() {
    command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script supports Debian only"
    local -a missing wanted=("${PACKAGES[@]}" "${PACKAGES_NO_RECOMMENDS[@]}")
    case ${1:-} in
    "") ;;
    lint) wanted=("${PACKAGES_LINT[@]}") WANT_NODE=0 ;;
    docker) wanted=("${PACKAGES_DOCKER[@]}") WANT_NODE=0 ;;
    *) die "usage: scripts/deps.sh [lint|docker]" ;;
    esac
    mapfile -t missing < <(missing_packages "${wanted[@]}")
    if [[ ${#missing[@]} -eq 0 ]]; then
        return 0
    fi
    install_packages "${missing[@]}"
    mapfile -t missing < <(missing_packages "${wanted[@]}")
    [[ ${#missing[@]} -eq 0 ]] || die "still missing after apt-get install: ${missing[*]}"
    log "all packages installed"
}

main "$@"
