# runtime: built from the repository root:
#   podman build --isolation=chroot -f docker/runtime.Dockerfile -t ae/runtime .
FROM debian:12-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config \
      libmicrohttpd-dev libpq-dev libhiredis-dev librabbitmq-dev libwebsockets-dev libcjson-dev \
      libcurl4-openssl-dev libjwt-dev libssl-dev libcrypt-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" bin/runtime bin/runtime-migrate bin/runtime-smoke bin/migrate

FROM debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
      libmicrohttpd12 libpq5 libhiredis0.14 librabbitmq4 libwebsockets17 libcjson1 libcurl4 libjwt0 \
      libssl3 && rm -rf /var/lib/apt/lists/* && useradd --system --home /app ae
WORKDIR /app
COPY --from=build /src/bin/runtime /src/bin/runtime-migrate /src/bin/runtime-smoke /src/bin/migrate /app/bin/
COPY --from=build /src/database/migrations /app/database/migrations
USER ae
EXPOSE 4100
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:4100/healthz || exit 1
ENTRYPOINT ["/app/bin/runtime"]
