# action-workers: Telegram, webhook and MCP deliveries (SPEC 4); health and metrics on 9102.
# Built from the repository root (docker compose does it; here `make docker-test`
# builds it with podman):
#   docker build -f docker/action-workers.Dockerfile -t ae/action-workers .
# The runtime stage installs only the libraries the program links (ldd; checked
# by tests/integration/test_docker.py).
FROM debian:bookworm-slim AS build
# The same first layer in every Dockerfile here, so a builder that caches
# layers installs the toolchain once for all six images.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config \
      libmicrohttpd-dev libpq-dev libhiredis-dev librabbitmq-dev libwebsockets-dev libwebsockets-evlib-ev libev-dev \
      libcjson-dev libcurl4-openssl-dev libjwt-dev libssl-dev libcrypt-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile ./
COPY libshared libshared
COPY action-workers action-workers
RUN make -j"$(nproc)" bin/action-workers

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      curl ca-certificates libmicrohttpd12 libpq5 libhiredis0.14 librabbitmq4 libcjson1 libcurl4 libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin ae
COPY --from=build /src/bin/action-workers /app/bin/
ENV LOG_FORMAT=json METRICS_HOST=0.0.0.0 METRICS_PORT=9102
WORKDIR /app
USER ae
EXPOSE 9102
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9102/health"]
ENTRYPOINT ["/app/bin/action-workers"]
