# realtime: WebSocket messaging and workflow streaming (SPEC 5).
# Built from the repository root (docker compose does it; here `make docker-test`
# builds it with podman):
#   docker build -f docker/realtime.Dockerfile -t ae/realtime .
# The runtime stage installs only the libraries the program links (ldd; checked
# by tests/integration/test_docker.py).
# libwebsockets-evlib-ev is the libev event-loop plugin libwebsockets loads at run time (ldd does not show it).
FROM debian:bookworm-slim AS build
# The same first layer in every Dockerfile here, so a builder that caches
# layers installs the toolchain once for all six images.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config \
      libmicrohttpd-dev libpq-dev libhiredis-dev librabbitmq-dev libwebsockets-dev libwebsockets-evlib-ev libev-dev \
      libcjson-dev libcurl4-openssl-dev libjwt-dev libssl-dev libcrypt-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile ./
COPY libshared libshared
COPY realtime realtime
RUN make -j"$(nproc)" bin/realtime

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      curl ca-certificates libwebsockets17 libwebsockets-evlib-ev libev4 libmicrohttpd12 libpq5 libhiredis0.14 librabbitmq4 libcjson1 libjwt0 libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin ae
COPY --from=build /src/bin/realtime /app/bin/
COPY database/migrations /app/database/migrations
ENV LOG_FORMAT=json HOST=0.0.0.0 PORT=8081
WORKDIR /app
USER ae
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8081/health"]
ENTRYPOINT ["/app/bin/realtime"]
