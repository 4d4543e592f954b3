/* runtime: the authority for agent runs.
 *
 * Skeleton (issue 2): configuration, a checked PostgreSQL pool, GET /healthz,
 * /readyz and /metrics. The run log, projections and Khala sync arrive with
 * the runtime issue. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cfg.h"
#include "dbpool.h"
#include "deps.h"
#include "health.h"
#include "httpd.h"
#include "log.h"
#include "svc.h"

#define RUNTIME_VERSION "0.1.0"

typedef struct {
    char host[256];
    int port;
    const char *write_mode;
    char build_sha[64];
    char conninfo[2048];
    long long started_ms;
    health *health;
} runtime;

static void runtime_healthz(httpd_req *req, void *ud)
{
    runtime *rt = ud;
    cJSON *body = cJSON_CreateObject();

    cJSON_AddStringToObject(body, "status", "ok");
    cJSON_AddStringToObject(body, "service", "runtime");
    cJSON_AddStringToObject(body, "version", RUNTIME_VERSION);
    cJSON_AddStringToObject(body, "build_sha", rt->build_sha);
    cJSON_AddNumberToObject(body, "uptime_seconds", (double)((svc_now_ms() - rt->started_ms) / 1000));
    cJSON_AddStringToObject(body, "authority_write_mode", rt->write_mode);
    cJSON_AddBoolToObject(body, "database_ready", health_ok(rt->health));
    httpd_respond_json(req, 200, body);
}

static void runtime_readyz(httpd_req *req, void *ud)
{
    runtime *rt = ud;
    int ok = health_ok(rt->health);
    cJSON *body = cJSON_CreateObject();

    cJSON_AddStringToObject(body, "status", ok ? "ready" : "not_ready");
    cJSON_AddStringToObject(body, "database", ok ? "connected" : "disconnected");
    httpd_respond_json(req, ok ? 200 : 503, body);
}

/* RUNTIME_BIND_ADDR is host:port; IPv6 hosts are written [addr]:port. */
static void runtime_bind_addr(cfg *c, runtime *rt)
{
    const char *addr = cfg_str(c, "RUNTIME_BIND_ADDR", "127.0.0.1:4100");
    const char *colon = strrchr(addr, ':');
    char *end;
    long port;
    size_t hostlen;

    if (!colon)
        goto bad;
    port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535)
        goto bad;
    hostlen = (size_t)(colon - addr);
    if (hostlen >= 2 && addr[0] == '[' && addr[hostlen - 1] == ']') {
        addr++;
        hostlen -= 2;
    }
    snprintf(rt->host, sizeof(rt->host), "%.*s", (int)hostlen, addr);
    rt->port = (int)port;
    return;
bad:
    cfg_error(c, "RUNTIME_BIND_ADDR", addr, "host:port, e.g. 127.0.0.1:4100");
}

static void runtime_config(cfg *c, runtime *rt)
{
    static const char *const modes[] = {"active", "rust_active", "shadow_only", "read_only", NULL};

    runtime_bind_addr(c, rt);
    rt->write_mode = cfg_enum(c, "RUNTIME_AUTHORITY_WRITE_MODE", "active", modes);
    if (strcmp(rt->write_mode, "rust_active") == 0)
        rt->write_mode = "active";
    snprintf(rt->build_sha, sizeof(rt->build_sha), "%s", cfg_str(c, "BUILD_SHA", "dev"));
    if (!cfg_str(c, "DATABASE_URL", NULL) && cfg_str(c, "DB_URL", NULL))
        setenv("DATABASE_URL", cfg_str(c, "DB_URL", ""), 1);
    dbpool_conninfo_from_cfg(c, rt->conninfo, sizeof(rt->conninfo));
    cfg_secret(c, "RUNTIME_SYNC_TOKEN_SIGNING_KEY", "dev-runtime-sync-signing-key");
}

int main(void)
{
    static runtime rt;
    httpd_opts ho = {0};
    dbpool *db = NULL;
    httpd *http = NULL;
    char err[512];
    cfg *c;
    int rc = 1;

    if (svc_init() < 0 || !(c = cfg_boot("runtime")))
        return 2;
    runtime_config(c, &rt);
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    rt.started_ms = svc_now_ms();
    db = dbpool_new(rt.conninfo, 4);
    rt.health = health_new(2000);
    if (!db || !rt.health)
        goto out;
    health_add(rt.health, "postgresql", deps_check_pg, db);
    ho.service = "runtime";
    ho.host = rt.host;
    ho.port = rt.port;
    ho.threads = 2;
    ho.access_log = 1;
    http = httpd_new(&ho, err, sizeof(err));
    if (!http || httpd_route(http, "GET", "/healthz", runtime_healthz, &rt) < 0 ||
        httpd_route(http, "GET", "/readyz", runtime_readyz, &rt) < 0 || httpd_route_metrics(http) < 0)
        goto out;
    if (health_start(rt.health) < 0 || httpd_start(http, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    log_event(LOG_INFO, "listening", "\"port\":%d,\"authority_write_mode\":\"%s\"", httpd_port(http), rt.write_mode);
    while (!svc_stopping())
        svc_wait(1000);
    httpd_stop(http, 5000);
    rc = 0;
out:
    httpd_free(http);
    health_free(rt.health);
    dbpool_free(db);
    return rc;
}
