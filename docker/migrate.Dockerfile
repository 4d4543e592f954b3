# migrate: the one-shot job that applies database/migrations (the services wait for it).
# Built from the repository root (docker compose does it; here `make docker-test`
# builds it with podman):
#   docker build -f docker/migrate.Dockerfile -t ae/migrate .
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
COPY database/migrate_main.c database/
RUN make -j"$(nproc)" bin/migrate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      libpq5 libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin ae
COPY --from=build /src/bin/migrate /app/bin/
COPY database/migrations /app/database/migrations
ENV LOG_FORMAT=json
WORKDIR /app
USER ae
ENTRYPOINT ["/app/bin/migrate"]
