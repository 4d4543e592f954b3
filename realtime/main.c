/* realtime: WebSocket messaging and workflow-execution streaming.
 *
 * This is the service's skeleton (issue 2): it reads and validates its
 * configuration, keeps PostgreSQL, Redis and RabbitMQ connections checked in
 * the background, and answers GET /health, /info and /metrics. The
 * WebSocket routes (/ws, /rt) arrive with the realtime issue, which moves
 * the listener to libwebsockets. */
#include <stdio.h>
#include <string.h>

#include "amqpc.h"
#include "cfg.h"
#include "dbpool.h"
#include "deps.h"
#include "health.h"
#include "httpd.h"
#include "log.h"
#include "rconn.h"
#include "svc.h"

#define REALTIME_VERSION "0.1.0"

typedef struct {
    char host[256];
    int port;
    long max_connections;
    char conninfo[2048];
    char amqp_url[1024];
    rconn_opts redis;
    long long started_ms;
    health *health;
} realtime;

static void realtime_health(httpd_req *req, void *ud)
{
    realtime *rt = ud;
    cJSON *body = cJSON_CreateObject(), *checks;
    int ok = health_ok(rt->health);

    cJSON_AddStringToObject(body, "status", ok ? "ok" : "unhealthy");
    cJSON_AddNumberToObject(body, "active_connections", 0);
    cJSON_AddNumberToObject(body, "max_connections", (double)rt->max_connections);
    cJSON_AddNumberToObject(body, "uptime_seconds", (double)((svc_now_ms() - rt->started_ms) / 1000));
    checks = cJSON_AddObjectToObject(body, "checks");
    for (int i = 0; i < health_count(rt->health); i++)
        cJSON_AddStringToObject(checks, health_check_name(rt->health, i),
                                health_check_ok(rt->health, i) ? "up" : "down");
    httpd_respond_json(req, ok ? 200 : 503, body);
}

static void realtime_info(httpd_req *req, void *ud)
{
    cJSON *body = cJSON_CreateObject();

    (void)ud;
    cJSON_AddStringToObject(body, "service", "realtime");
    cJSON_AddStringToObject(body, "version", REALTIME_VERSION);
    cJSON_AddStringToObject(body, "protocol_version", "1.0");
    httpd_respond_json(req, 200, body);
}

static void realtime_config(cfg *c, realtime *rt)
{
    snprintf(rt->host, sizeof(rt->host), "%s", cfg_str(c, "HOST", "0.0.0.0"));
    rt->port = (int)cfg_int(c, "PORT", 8081, 0, 65535);
    rt->max_connections = cfg_int(c, "MAX_CONNECTIONS", 10000, 1, 1000000);
    snprintf(rt->amqp_url, sizeof(rt->amqp_url), "%s",
             cfg_str(c, "AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"));
    dbpool_conninfo_from_cfg(c, rt->conninfo, sizeof(rt->conninfo));
    rconn_opts_from_cfg(c, &rt->redis);
    cfg_secret(c, "JWT_SECRET", "dev-jwt-secret-change-me");
}

int main(void)
{
    static realtime rt;
    httpd_opts ho = {0};
    dbpool *db = NULL;
    rconn *redis = NULL;
    amqpc *amqp = NULL;
    httpd *http = NULL;
    char err[512];
    cfg *c;
    int rc = 1;

    if (svc_init() < 0 || !(c = cfg_boot("realtime")))
        return 2;
    realtime_config(c, &rt);
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    rt.started_ms = svc_now_ms();
    db = dbpool_new(rt.conninfo, 2);
    redis = rconn_new(&rt.redis, 2000);
    amqp = amqpc_new(rt.amqp_url, "realtime");
    rt.health = health_new(2000);
    if (!db || !redis || !amqp || !rt.health)
        goto out;
    health_add(rt.health, "postgresql", deps_check_pg, db);
    health_add(rt.health, "redis", deps_check_redis, redis);
    health_add(rt.health, "rabbitmq", deps_check_amqp, amqp);
    ho.service = "realtime";
    ho.host = rt.host;
    ho.port = rt.port;
    ho.threads = 2;
    ho.access_log = 1;
    http = httpd_new(&ho, err, sizeof(err));
    if (!http || httpd_route(http, "GET", "/health", realtime_health, &rt) < 0 ||
        httpd_route(http, "GET", "/info", realtime_info, &rt) < 0 || httpd_route_metrics(http) < 0)
        goto out;
    if (health_start(rt.health) < 0 || httpd_start(http, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    log_event(LOG_INFO, "listening", "\"port\":%d", httpd_port(http));
    while (!svc_stopping())
        svc_wait(1000);
    httpd_stop(http, 5000);
    rc = 0;
out:
    httpd_free(http);
    health_free(rt.health);
    amqpc_free(amqp);
    rconn_free(redis);
    dbpool_free(db);
    return rc;
}
