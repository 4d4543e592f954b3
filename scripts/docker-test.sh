#!/usr/bin/env bash
# docker-test.sh: `make docker-test`. Builds every image of docker/ with
# podman and starts each service from its image against the local servers.
#
# No container engine runs here, and podman's containers cannot start (crun
# may not set rlimits), so:
# 1. the base image the Dockerfiles name (debian:bookworm-slim) is made
#    once with `debootstrap --variant=minbase bookworm`, slimmed as Docker's
#    is (no docs, man pages, locales, apt lists), and `podman import`ed under
#    that tag; podman's store keeps it, so later runs reuse it;
# 2. each image is built with `podman build --pull=never --isolation=chroot`;
# 3. the migrate image runs against the servers of scripts/servers.sh (the
#    ones `make up` uses), then each service image is mounted (`podman image
#    mount`) and its program started with chroot on the host network, as the
#    image's user, with the image's environment plus the servers' URLs and a
#    free port; the image's own HEALTHCHECK command (its curl) must answer;
# 4. each image's size is printed.
#
# Environment: DOCKER_TEST_IMAGES (all six), DOCKER_TEST_MIRROR (the Debian
# mirror for debootstrap; default the host's apt source), DOCKER_TEST_REBASE=1
# makes the base image again.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
VAR=$ROOT/var/docker-test
BASE_TAG=docker.io/library/debian:bookworm-slim
# Bumped whenever make_base changes what it makes: an older base is made again.
BASE_LABEL=ae.base=minbase-slim-2
read -r -a IMAGES <<<"${DOCKER_TEST_IMAGES:-migrate api-gateway event-processor action-workers realtime runtime}"
FAILED=0
PIDS=()
# Image -> where `podman image mount` put it: each image is mounted once, by
# the main shell (image_run also runs in subshells), and unmounted at exit.
declare -A MOUNTED=()

log() { printf 'docker-test: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Every service this run starts carries DOCKER_TEST_RUN=$MARK in its
# environment, so that none outlives the run, whatever happened to its job.
MARK="$$-$RANDOM"
marked_pids() {
    grep -lzx "DOCKER_TEST_RUN=$MARK" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
}

cleanup() {
    local pid img
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for pid in $(marked_pids); do
        log "stopping a service still running: $pid $(cat "/proc/$pid/comm" 2>/dev/null)"
        kill -KILL "$pid" 2>/dev/null || true
    done
    for img in "${!MOUNTED[@]}"; do podman image unmount "$img" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

[[ $EUID -eq 0 ]] || die "run as root: podman image mount and chroot need it"
scripts/deps.sh docker

# The host's Debian mirror (the only one this machine may reach).
mirror() {
    local m
    m=${DOCKER_TEST_MIRROR:-}
    if [[ -z $m ]]; then
        m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null |
            grep -v security | head -n1 | awk '{ print ($1 == "deb") ? $2 : $2 }')
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

make_base() {
    local root=$VAR/rootfs m
    if [[ ${DOCKER_TEST_REBASE:-0} != 1 ]] && podman image exists "$BASE_TAG" &&
        [[ $(podman image inspect --format '{{index .Config.Labels "ae.base"}}' "$BASE_TAG" 2>/dev/null) == "${BASE_LABEL#*=}" ]]; then
        log "base image $BASE_TAG is there ($(podman image inspect --format '{{.Size}}' "$BASE_TAG" | numfmt --to=iec))"
        return 0
    fi
    m=$(mirror)
    log "making $BASE_TAG with debootstrap --variant=minbase bookworm from $m (once; a minute or two)"
    rm -rf "$root"
    mkdir -p "$VAR"
    debootstrap --variant=minbase bookworm "$root" "$m" >"$VAR/debootstrap.log" 2>&1 ||
        die "debootstrap failed: see $VAR/debootstrap.log"
    # What Docker's slim images leave out, and keep out (dpkg path-exclude).
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    # Docker's debian images: apt keeps no .deb and no package caches in a
    # layer (their /etc/apt/apt.conf.d/docker-clean).
    cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    printf 'APT::Install-Recommends "false";\n' >"$root/etc/apt/apt.conf.d/docker-no-recommends"
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $m
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    tar --numeric-owner -C "$root" -c . |
        podman import --change 'CMD ["bash"]' --change "LABEL $BASE_LABEL" - "$BASE_TAG" >/dev/null
    rm -rf "$root"
    log "imported $BASE_TAG ($(podman image inspect --format '{{.Size}}' "$BASE_TAG" | numfmt --to=iec))"
}

build_image() {
    local name=$1 start=$SECONDS
    log "building ae/$name (docker/$name.Dockerfile)"
    if ! podman build --pull=never --isolation=chroot --format docker --layers \
        -f "docker/$name.Dockerfile" -t "localhost/ae/$name:test" . >"$VAR/build-$name.log" 2>&1; then
        tail -n 30 "$VAR/build-$name.log" >&2
        log "FAIL build ae/$name: see $VAR/build-$name.log"
        FAILED=$((FAILED + 1))
        return 1
    fi
    log "built ae/$name in $((SECONDS - start)) s"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# image_run IMAGE CMD...: runs CMD in the image's file system as the
# image's user, with /dev and /proc in a private mount namespace (nothing
# is left mounted when it ends).
mount_image() {
    local img=localhost/ae/$1:test
    [[ -n ${MOUNTED[$img]:-} ]] || MOUNTED[$img]=$(podman image mount "$img")
}

image_run() {
    local img=localhost/ae/$1:test mnt user uid gid
    shift
    mnt=${MOUNTED[$img]:?"$img is not mounted (mount_image)"}
    user=$(podman image inspect --format '{{.Config.User}}' "$img")
    uid=$(awk -F: -v u="$user" '$1 == u { print $3 }' "$mnt/etc/passwd")
    gid=$(awk -F: -v u="$user" '$1 == u { print $4 }' "$mnt/etc/passwd")
    [[ -n $uid && $uid != 0 ]] || die "$img: user '$user' is missing or root"
    local -a cmd=(unshare --mount --propagation private -- sh -c '
        mnt=$1; shift
        mount --rbind /dev "$mnt/dev" && mount -t proc proc "$mnt/proc" && exec chroot --userspec="$0" "$mnt" "$@"
    ' "$uid:$gid" "$mnt" "$@")
    # With IMAGE_EXEC=1 (a background job) the job's shell becomes the
    # program (unshare, sh and chroot each exec the next), so its $! is the
    # program's pid and killing it stops the service.
    if [[ ${IMAGE_EXEC:-0} == 1 ]]; then exec "${cmd[@]}"; fi
    "${cmd[@]}"
}

# The image's ENV as env(1) arguments.
image_env() {
    podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "localhost/ae/$1:test" | grep .
}

# check_libraries NAME: the image's own ldd finds every library of every
# program in /app/bin, and only realtime's and runtime's images hold
# libwebsockets.
check_libraries() {
    local name=$1 out lws
    out=$(image_run "$name" sh -c 'for p in /app/bin/*; do echo "== $p"; ldd "$p"; done' 2>&1) || true
    if grep -q 'not found' <<<"$out"; then
        grep -E '^==|not found' <<<"$out" >&2
        log "FAIL $name: a library its programs need is missing from the image"
        FAILED=$((FAILED + 1))
    fi
    lws=$(image_run "$name" sh -c 'ls /usr/lib/*/libwebsockets* 2>/dev/null' || true)
    case $name in
        realtime | runtime) [[ -n $lws ]] || { log "FAIL $name: no libwebsockets in the image"; FAILED=$((FAILED + 1)); } ;;
        *) [[ -z $lws ]] || { log "FAIL $name: the image holds libwebsockets ($lws)"; FAILED=$((FAILED + 1)); } ;;
    esac
}

run_migrate() {
    local -a env
    mapfile -t env < <(image_env migrate)
    log "migrate image: applying database/migrations"
    if image_run migrate env -i "${env[@]}" DATABASE_URL="$DATABASE_URL" /app/bin/migrate >"$VAR/run-migrate.log" 2>&1; then
        log "ok   migrate: $(tail -n1 "$VAR/run-migrate.log")"
    else
        cat "$VAR/run-migrate.log" >&2
        log "FAIL migrate"
        FAILED=$((FAILED + 1))
    fi
}

# run_service NAME: the image's program on a free port; its HEALTHCHECK
# command, with that port, must answer within 30 s.
run_service() {
    local name=$1 img=localhost/ae/$1:test port entry hc url pid i ok=0
    local -a env portenv hcmd
    port=$(free_port)
    case $name in
        api-gateway) portenv=(SERVER_HOST=127.0.0.1 SERVER_PORT=$port) ;;
        realtime) portenv=(HOST=127.0.0.1 PORT=$port) ;;
        runtime) portenv=(RUNTIME_BIND_ADDR=127.0.0.1:$port) ;;
        event-processor | action-workers) portenv=(METRICS_HOST=127.0.0.1 METRICS_PORT=$port) ;;
    esac
    mapfile -t env < <(image_env "$name")
    entry=$(podman image inspect --format '{{index .Config.Entrypoint 0}}' "$img")
    hc=$(podman image inspect --format '{{range .Config.Healthcheck.Test}}{{println .}}{{end}}' "$img")
    mapfile -t hcmd < <(grep . <<<"$hc")
    [[ ${hcmd[0]:-} == CMD ]] || die "$img: HEALTHCHECK is not an exec-form CMD: ${hcmd[*]}"
    hcmd=("${hcmd[@]:1}")
    url=${hcmd[-1]}
    hcmd[-1]=$(sed -E "s#^(http://127\.0\.0\.1:)[0-9]+#\1$port#" <<<"$url")
    IMAGE_EXEC=1 image_run "$name" env -i "${env[@]}" DOCKER_TEST_RUN="$MARK" DATABASE_URL="$DATABASE_URL" REDIS_URL="$REDIS_URL" AMQP_URL="$AMQP_URL" \
        "${SECRETS[@]}" "${portenv[@]}" "$entry" >"$VAR/run-$name.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for ((i = 0; i < 60; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        if image_run "$name" "${hcmd[@]}" >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.5
    done
    if ((ok)); then
        log "ok   $name: $entry answers ${hcmd[-1]} (the image's HEALTHCHECK, run with its curl)"
        log "     $(curl -s "${hcmd[-1]}" | head -c 300)"
    else
        tail -n 20 "$VAR/run-$name.log" >&2
        log "FAIL $name: ${hcmd[-1]} did not answer within 30 s"
        FAILED=$((FAILED + 1))
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [[ -n $(marked_pids) ]]; then
        log "FAIL $name: still running after SIGTERM: $(marked_pids | tr '\n' ' ')"
        FAILED=$((FAILED + 1))
        for pid in $(marked_pids); do kill -KILL "$pid" 2>/dev/null || true; done
    fi
}

main() {
    local name
    mkdir -p "$VAR"
    make_base
    for name in "${IMAGES[@]}"; do build_image "$name" || true; done

    scripts/servers.sh start all
    eval "$(scripts/servers.sh env)"
    SECRETS=()
    for name in JWT_SECRET INGEST_TOKEN INTERNAL_TOKEN RUNTIME_SYNC_TOKEN_SIGNING_KEY; do
        SECRETS+=("$name=docker-test-$(openssl rand -hex 24)")
    done
    SECRETS+=(APP_ENV=production)

    for name in "${IMAGES[@]}"; do
        podman image exists "localhost/ae/$name:test" || continue
        mount_image "$name"
        check_libraries "$name"
        if [[ $name == migrate ]]; then run_migrate; else run_service "$name"; fi
    done

    echo
    echo "image sizes:"
    for name in "${IMAGES[@]}"; do
        if podman image exists "localhost/ae/$name:test"; then
            printf '  %-20s %s\n' "ae/$name" "$(podman image inspect --format '{{.Size}}' "localhost/ae/$name:test" | numfmt --to=iec --format='%.1f')"
        fi
    done
    printf '  %-20s %s\n' "(base)" "$(podman image inspect --format '{{.Size}}' "$BASE_TAG" | numfmt --to=iec --format='%.1f')"
    if ((FAILED > 0)); then
        log "$FAILED failure(s)"
        exit 1
    fi
    log "every image built and every service answered its health check"
}

main "$@"
