/* api-gateway: the ERC-8004 REST API and the platform's HTTP front door. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "gateway.h"
#include "guard.h"
#include "log.h"
#include "migrate.h"
#include "ratelimit.h"
#include "revocation.h"
#include "loginguard.h"
#include "svc.h"

#define DEV_JWT_SECRET "dev-jwt-secret-change-me"
#define DEV_INGEST_TOKEN "dev-ingest-token"
#define DEV_INTERNAL_TOKEN "dev-internal-token"

static int gateway_default_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n > 2 ? (int)(n * 4) : 8;
}

static int gateway_default_hashes(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n > 2 ? (int)(2 * n) : 4;
}

static void copy_setting(char *dst, size_t len, const char *value)
{
    snprintf(dst, len, "%s", value ? value : "");
}

void gateway_config_read(cfg *c, gateway_config *o)
{
    memset(o, 0, sizeof(*o));
    copy_setting(o->host, sizeof(o->host), cfg_str(c, "SERVER_HOST", "0.0.0.0"));
    o->port = (int)cfg_int(c, "SERVER_PORT", 8080, 0, 65535);
    /* Handlers block on PostgreSQL, so the pool needs more threads than
     * cores to keep queries in flight; measured on 2 cores, 8 threads lift
     * ingest by a third and cost the health route nothing. */
    o->threads = (int)cfg_int(c, "HTTP_THREADS", gateway_default_threads(), 1, 256);
    o->max_body = cfg_int(c, "MAX_BODY_BYTES", 1024 * 1024, 1024, 64L * 1024 * 1024);
    o->max_connections = (int)cfg_int(c, "MAX_CONNECTIONS", 10000, 1, 1000000);
    /* One address may hold this many connections; beyond, new ones are
     * closed at once. 0 turns the cap off (behind a proxy that is the only
     * peer). */
    o->max_connections_per_ip = (int)cfg_int(c, "MAX_CONNECTIONS_PER_IP", 256, 0, 1000000);
    o->header_timeout_ms = cfg_duration_ms(c, "HTTP_HEADER_TIMEOUT", 10000, 1000);
    if (o->header_timeout_ms > 3600000)
        cfg_error(c, "HTTP_HEADER_TIMEOUT", cfg_str(c, "HTTP_HEADER_TIMEOUT", ""), "a duration up to 1h (0 turns it off)");
    if (o->header_timeout_ms == 0 || o->header_timeout_ms > 3600000)
        o->header_timeout_ms = o->header_timeout_ms ? 10000 : -1;
    copy_setting(o->cors_origins, sizeof(o->cors_origins),
                 cfg_str(c, "CORS_ORIGINS", "http://localhost*,http://127.0.0.1*"));
    o->rate_limit_per_min = cfg_int(c, "RATE_LIMIT", 1000, 0, 100000000);
    /* Short, since a token is a bearer credential until it expires; a
     * revoked one is refused at once anyway (revocation.h). */
    o->access_token_ttl_s = cfg_int(c, "ACCESS_TOKEN_TTL_SECONDS", 900, 10, 86400 * 30);
    o->token_cache_ttl_ms = cfg_duration_ms(c, "TOKEN_STATE_CACHE_TTL", 60000, 1000);
    o->login_max_failures = (int)cfg_int(c, "LOGIN_MAX_FAILURES", 5, 1, 1000);
    o->login_backoff_max_ms = cfg_duration_ms(c, "LOGIN_BACKOFF_MAX", 15 * 60000, 1000);
    if (o->login_backoff_max_ms < 1000) {
        cfg_error(c, "LOGIN_BACKOFF_MAX", cfg_str(c, "LOGIN_BACKOFF_MAX", ""), "a duration of at least 1s");
        o->login_backoff_max_ms = 1000;
    }
    /* A yescrypt hash keeps a core busy for its whole run: many more at once
     * than cores only makes every login slower and takes the worker threads
     * from every other request. */
    o->login_max_hashes = (int)cfg_int(c, "LOGIN_MAX_CONCURRENT_HASHES", gateway_default_hashes(), 1, 1024);
    o->refresh_token_ttl_s = cfg_int(c, "REFRESH_TOKEN_TTL_SECONDS", 86400 * 30, 60, 86400 * 365);
    o->health_interval_ms = cfg_duration_ms(c, "HEALTH_CHECK_INTERVAL", 1000, 1);
    o->db_max_connections = (int)cfg_int(c, "DB_MAX_CONNECTIONS", 10, 1, 1000);
    o->access_log = cfg_bool(c, "ACCESS_LOG", 1);
    dbpool_conninfo_from_cfg(c, o->conninfo, sizeof(o->conninfo));
    if (migrate_default_dir(o->migrations_dir, sizeof(o->migrations_dir)) < 0)
        cfg_error(c, "MIGRATIONS_DIR", cfg_str(c, "MIGRATIONS_DIR", ""), "a readable directory of migrations");
    copy_setting(o->jwt_secret, sizeof(o->jwt_secret), cfg_secret(c, "JWT_SECRET", DEV_JWT_SECRET));
    copy_setting(o->ingest_token, sizeof(o->ingest_token), cfg_secret(c, "INGEST_TOKEN", DEV_INGEST_TOKEN));
    copy_setting(o->internal_token, sizeof(o->internal_token),
                 cfg_secret(c, "INTERNAL_TOKEN", DEV_INTERNAL_TOKEN));
    o->conn_memory = cfg_int(c, "HTTP_CONNECTION_MEMORY", 16384, 4096, 1024L * 1024);
    o->loops = (int)cfg_int(c, "HTTP_LOOPS", 0, 0, 256);
    proxy_config_read(c, &o->proxy, o->host, o->port);
    sse_config_read(c, &o->sse, o->internal_token);
    /* SSE streams leave libmicrohttpd once their headers are decided, so its
     * connection limits no longer count them: the same limits, for them. */
    o->sse.max_streams = o->max_connections;
    o->sse.max_per_ip = o->max_connections_per_ip;
}

long gateway_sse_clients(gateway *gw)
{
    return sse_clients(gw->sse);
}

static int gateway_open(gateway *gw, char *err, size_t errlen)
{
    httpd_opts ho = {0};

    gw->db = dbpool_new(gw->cfg.conninfo, gw->cfg.db_max_connections);
    gw->health = health_new(gw->cfg.health_interval_ms);
    gw->jwt = jwtauth_new(gw->cfg.jwt_secret, NULL, NULL, 30);
    gw->revocation = revocation_new(gw->cfg.conninfo, gw->cfg.token_cache_ttl_ms, "api-gateway", "gateway");
    gw->logins = loginguard_new(gw->cfg.login_max_failures, gw->cfg.login_backoff_max_ms, gw->cfg.login_max_hashes);
    gw->pgmig = gw->db ? deps_pgmig_new(gw->db, gw->cfg.migrations_dir) : NULL;
    if (!gw->db || !gw->pgmig || !gw->health || !gw->jwt || !gw->revocation || !gw->logins) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    gw->health_db = health_add(gw->health, "postgresql", deps_check_pg_migrate, gw->pgmig);
    ho.service = "api-gateway";
    ho.host = gw->cfg.host;
    ho.port = gw->cfg.port;
    ho.threads = gw->cfg.threads;
    ho.max_body = (size_t)gw->cfg.max_body;
    ho.cors_origins = gw->cfg.cors_origins;
    ho.access_log = gw->cfg.access_log;
    ho.header_timeout_ms = (int)gw->cfg.header_timeout_ms;
    ho.max_connections = gw->cfg.max_connections;
    ho.max_connections_per_ip = gw->cfg.max_connections_per_ip;
    ho.conn_memory = (size_t)gw->cfg.conn_memory;
    ho.loops = gw->cfg.loops;
    gw->http = httpd_new(&ho, err, errlen);
    if (!gw->http || gateway_health_routes(gw) < 0)
        return -1;
    if (auth_init(gw, err, errlen) < 0)
        return -1;
    if (gateway_auth_routes(gw) < 0 || gateway_trigger_routes(gw) < 0 || gateway_result_routes(gw) < 0 ||
        gateway_chain_event_routes(gw) < 0) {
        snprintf(err, errlen, "cannot register the REST routes");
        return -1;
    }
    /* RATE_LIMIT=0 turns the limiter off (benchmarks, trusted networks). */
    if (gw->cfg.rate_limit_per_min > 0) {
        gw->limiter = ratelimit_new(gw->cfg.rate_limit_per_min);
        if (!gw->limiter) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    httpd_set_hook(gw->http, guard_hook, gw);
    gw->cfg.proxy.httpd_loops = gw->cfg.loops;
    gw->proxy = proxy_new(&gw->cfg.proxy, NULL, err, errlen);
    if (!gw->proxy)
        return -1;
    if (gw->cfg.loops > 0) {
        httpd_loop_hooks lh;

        proxy_loop_hooks(gw->proxy, &lh);
        httpd_set_loop_hooks(gw->http, &lh);
    }
    httpd_set_stream_hooks(gw->http, proxy_claims, proxy_take, gw->proxy);
    proxy_set_front_guard(gw->proxy, guard_front, gw);
    httpd_set_fallback(gw->http, proxy_fallback, gw->proxy);
    gw->sse = sse_new(&gw->cfg.sse, NULL, err, errlen);
    if (!gw->sse || sse_routes(gw->sse, gw->http) < 0)
        return -1;
    /* The first check runs before listening, so the first answer is true;
     * a database that is down only makes the service report unhealthy. */
    if (health_start(gw->health) < 0) {
        snprintf(err, errlen, "cannot start the health thread");
        return -1;
    }
    return httpd_start(gw->http, err, errlen);
}

static void gateway_close(gateway *gw)
{
    sse_stop(gw->sse);
    proxy_stop(gw->proxy, 0);
    httpd_free(gw->http);
    proxy_free(gw->proxy);
    sse_free(gw->sse);
    ratelimit_free(gw->limiter);
    health_free(gw->health);
    revocation_free(gw->revocation);
    loginguard_free(gw->logins);
    jwtauth_free(gw->jwt);
    deps_pgmig_free(gw->pgmig);
    dbpool_free(gw->db);
}

int main(void)
{
    static gateway gw;
    char err[512];
    cfg *c;
    int rc = 1;

    if (svc_init() < 0)
        return 1;
    c = cfg_boot("api-gateway");
    if (!c)
        return 2;
    gateway_config_read(c, &gw.cfg);
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    if (gateway_open(&gw, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    log_event(LOG_INFO, "listening", "\"port\":%d,\"version\":\"%s\"", httpd_port(gw.http), GATEWAY_VERSION);
    while (svc_wait(1000) == 0 || !svc_stopping())
        ;
    log_info("stopping: finishing in-flight requests");
    /* Suspended connections must be resumed before the server stops: the
     * proxy answers what it still holds first. */
    sse_stop(gw.sse);
    proxy_stop(gw.proxy, 10000);
    httpd_stop(gw.http, 10000);
    rc = 0;
out:
    gateway_close(&gw);
    log_info("stopped");
    return rc;
}
