#include "health_http.h"

#include <stdio.h>
#include <stdlib.h>

#include "svc.h"

#define HEALTH_HTTP_MAX_ROUTES 8

typedef struct {
    health *h;
    const char *service;
    const char *version;
    long long started_ms;
} health_http_ctx;

/* Route contexts live for the whole process, like the servers they serve;
 * a fixed table avoids an allocation nobody would ever free. */
static health_http_ctx health_http_ctxs[HEALTH_HTTP_MAX_ROUTES];
static int health_http_nctx;

static void health_http_handler(httpd_req *req, void *ud)
{
    health_http_ctx *ctx = ud;
    cJSON *body = cJSON_CreateObject(), *checks;
    int ok = health_ok(ctx->h);

    if (!body) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    cJSON_AddStringToObject(body, "status", ok ? "ok" : "unhealthy");
    cJSON_AddStringToObject(body, "service", ctx->service);
    cJSON_AddStringToObject(body, "version", ctx->version);
    cJSON_AddNumberToObject(body, "uptime_seconds", (double)((svc_now_ms() - ctx->started_ms) / 1000));
    checks = cJSON_AddObjectToObject(body, "checks");
    for (int i = 0; checks && i < health_count(ctx->h); i++)
        cJSON_AddStringToObject(checks, health_check_name(ctx->h, i), health_check_ok(ctx->h, i) ? "up" : "down");
    httpd_respond_json(req, ok ? 200 : 503, body);
}

int health_http_route(httpd *srv, const char *path, health *h, const char *service, const char *version)
{
    health_http_ctx *ctx;

    if (health_http_nctx >= HEALTH_HTTP_MAX_ROUTES)
        return -1;
    ctx = &health_http_ctxs[health_http_nctx++];
    ctx->h = h;
    ctx->service = service;
    ctx->version = version;
    ctx->started_ms = svc_now_ms();
    return httpd_route(srv, "GET", path, health_http_handler, ctx);
}

httpd *health_http_serve(const char *service, const char *version, const char *host, int port, health *h,
                         health_http_extra_fn extra, void *ud, char *err, size_t errlen)
{
    httpd_opts ho = {0};
    httpd *srv;

    ho.service = service;
    ho.host = host;
    ho.port = port;
    ho.threads = 1;
    ho.access_log = 0;
    srv = httpd_new(&ho, err, errlen);
    if (!srv)
        return NULL;
    if (health_http_route(srv, "/health", h, service, version) < 0 || httpd_route_metrics(srv) < 0 ||
        (extra && extra(srv, ud) < 0)) {
        snprintf(err, errlen, "cannot register the health routes");
        goto fail;
    }
    if (health_start(h) < 0) {
        snprintf(err, errlen, "cannot start the health thread");
        goto fail;
    }
    if (httpd_start(srv, err, errlen) < 0)
        goto fail;
    return srv;
fail:
    httpd_free(srv);
    return NULL;
}
