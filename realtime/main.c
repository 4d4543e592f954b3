/* realtime: WebSocket messaging (/ws) and workflow-execution streaming
 * (/rt), one program on one port.
 *
 * This file is the host (see module.h): configuration, the wsapp server,
 * the dependency checks, /health and /info, and the modules' lifecycle.
 * The routes themselves live in the modules. */
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "amqpc.h"
#include "cfg.h"
#include "dbpool.h"
#include "deps.h"
#include "health.h"
#include "log.h"
#include "messaging.h"
#include "module.h"
#include "rconn.h"
#include "rtes.h"
#include "svc.h"
#include "wsapp.h"

/* The parts of the program, in start order. */
static const rt_module *const rt_modules[] = {
    &messaging_module,
    &rtes_module,
};
#define RT_NMODULES (sizeof(rt_modules) / sizeof(rt_modules[0]))

typedef struct {
    char host[256];
    int port;
    int reuse_port;
    int stop_grace_ms;
    int header_timeout_ms, message_timeout_ms;
    long message_memory_bytes;
    long send_queue_bytes;
    char conninfo[2048];
    char amqp_url[1024];
    char instance_id[128];
    rconn_opts redis;
    rt_host h;
    void *state[RT_NMODULES];
} realtime;

static void realtime_health(wsapp_req *req, void *ud)
{
    realtime *rt = ud;
    cJSON *body = cJSON_CreateObject(), *checks;
    int ok = health_ok(rt->h.health);

    cJSON_AddStringToObject(body, "status", "healthy");
    for (size_t i = 0; i < RT_NMODULES; i++)
        if (rt_modules[i]->health && rt_modules[i]->health(rt->state[i], body))
            ok = 0;
    cJSON_AddNumberToObject(body, "uptime_seconds", (double)((svc_now_ms() - rt->h.started_ms) / 1000));
    checks = cJSON_AddObjectToObject(body, "checks");
    for (int i = 0; i < health_count(rt->h.health); i++)
        cJSON_AddStringToObject(checks, health_check_name(rt->h.health, i),
                                health_check_ok(rt->h.health, i) ? "up" : "down");
    if (!ok) {
        cJSON_ReplaceItemInObject(body, "status", cJSON_CreateString("unhealthy"));
        if (!cJSON_GetObjectItem(body, "reason"))
            cJSON_AddStringToObject(body, "reason", "A dependency is down");
    }
    wsapp_respond_json(req, ok ? 200 : 503, body);
}

static void realtime_info(wsapp_req *req, void *ud)
{
    realtime *rt = ud;
    cJSON *body = cJSON_CreateObject();

    cJSON_AddStringToObject(body, "service", "realtime");
    cJSON_AddStringToObject(body, "version", RT_VERSION);
    cJSON_AddStringToObject(body, "protocol_version", "1.0");
    cJSON_AddStringToObject(body, "instance_id", rt->instance_id);
    for (size_t i = 0; i < RT_NMODULES; i++)
        if (rt_modules[i]->info)
            rt_modules[i]->info(rt->state[i], body);
    wsapp_respond_json(req, 200, body);
}

static void realtime_instance_id(realtime *rt)
{
    char host[64] = "host";
    unsigned char r[4] = {0};

    gethostname(host, sizeof(host) - 1);
    host[sizeof(host) - 1] = '\0';
    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r))
        memset(r, 0, sizeof(r));
    snprintf(rt->instance_id, sizeof(rt->instance_id), "%s-%d-%02x%02x%02x%02x", host, (int)getpid(), r[0], r[1],
             r[2], r[3]);
}

static void realtime_config(cfg *c, realtime *rt)
{
    snprintf(rt->host, sizeof(rt->host), "%s", cfg_str(c, "HOST", "0.0.0.0"));
    rt->port = (int)cfg_int(c, "PORT", 8081, 0, 65535);
    rt->reuse_port = cfg_bool(c, "REUSE_PORT", 0);
    rt->stop_grace_ms = (int)cfg_duration_ms(c, "SHUTDOWN_GRACE", 5000, 1);
    /* Slow-loris and messages that never end (libshared/wsapp.h). */
    {
        long h = cfg_duration_ms(c, "HTTP_HEADER_TIMEOUT", 10000, 1000);
        long m = cfg_duration_ms(c, "WS_MESSAGE_TIMEOUT", 30000, 1000);

        if (h <= 0 || h > 3600000)
            cfg_error(c, "HTTP_HEADER_TIMEOUT", cfg_str(c, "HTTP_HEADER_TIMEOUT", ""), "a duration from 1ms to 1h");
        if (m <= 0 || m > 3600000)
            cfg_error(c, "WS_MESSAGE_TIMEOUT", cfg_str(c, "WS_MESSAGE_TIMEOUT", ""), "a duration from 1ms to 1h");
        rt->header_timeout_ms = (int)h;
        rt->message_timeout_ms = (int)m;
    }
    /* A reader that falls this far behind is dropped (messaging's /info
     * shows the same variable). */
    rt->send_queue_bytes = cfg_int(c, "SEND_QUEUE_BYTES", 262144, 4096, 1L << 30);
    /* What every /ws client's unfinished message may hold together: 1,024
     * nearly whole 64 KiB messages at once; 10,000 would be 640 MiB. */
    rt->message_memory_bytes = cfg_int(c, "WS_MESSAGE_MEMORY_BYTES", 64L << 20, 65536, 1L << 40);
    snprintf(rt->amqp_url, sizeof(rt->amqp_url), "%s",
             cfg_str(c, "AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"));
    dbpool_conninfo_from_cfg(c, rt->conninfo, sizeof(rt->conninfo));
    rconn_opts_from_cfg(c, &rt->redis);
    rt->h.redis_configured = cfg_str(c, "REDIS_URL", NULL) != NULL || cfg_str(c, "REDIS_HOST", NULL) != NULL;
    for (size_t i = 0; i < RT_NMODULES; i++)
        rt->state[i] = rt_modules[i]->configure ? rt_modules[i]->configure(c) : NULL;
}

int main(void)
{
    static realtime rt;
    wsapp_opts wo = {0};
    dbpool *db = NULL;
    rconn *redis = NULL;
    amqpc *amqp = NULL;
    char err[512];
    size_t started = 0;
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
    realtime_instance_id(&rt);
    rt.h.started_ms = svc_now_ms();
    rt.h.instance_id = rt.instance_id;
    rt.h.redis = &rt.redis;
    rt.h.conninfo = rt.conninfo;
    rt.h.amqp_url = rt.amqp_url;
    rt.h.metrics = metrics_default();
    db = dbpool_new(rt.conninfo, 1);
    redis = rconn_new(&rt.redis, 2000);
    amqp = amqpc_new(rt.amqp_url, "realtime");
    rt.h.health = health_new(2000);
    if (!db || !redis || !amqp || !rt.h.health)
        goto out;
    /* The execution streams (issue 13) need PostgreSQL and RabbitMQ;
     * messaging needs Redis only when it is configured (scale-out). */
    health_add(rt.h.health, "postgresql", deps_check_pg, db);
    if (rt.h.redis_configured)
        health_add(rt.h.health, "redis", deps_check_redis, redis);
    health_add(rt.h.health, "rabbitmq", deps_check_amqp, amqp);
    wo.service = "realtime";
    wo.host = rt.host;
    wo.port = rt.port;
    wo.reuse_port = rt.reuse_port;
    wo.access_log = 1;
    wo.max_connections = 19000;
    wo.send_queue_bytes = (size_t)rt.send_queue_bytes;
    wo.header_timeout_ms = rt.header_timeout_ms;
    wo.message_timeout_ms = rt.message_timeout_ms;
    wo.message_memory_bytes = (size_t)rt.message_memory_bytes;
    wo.metrics = rt.h.metrics;
    rt.h.app = wsapp_new(&wo, err, sizeof(err));
    if (!rt.h.app || wsapp_route(rt.h.app, "GET", "/health", realtime_health, &rt) < 0 ||
        wsapp_route(rt.h.app, "GET", "/info", realtime_info, &rt) < 0 || wsapp_route_metrics(rt.h.app) < 0) {
        log_error("cannot set up the server: %s", rt.h.app ? "route table full" : err);
        goto out;
    }
    for (size_t i = 0; i < RT_NMODULES; i++) {
        if (rt_modules[i]->configure && !rt.state[i]) {
            log_error("%s: out of memory", rt_modules[i]->name);
            goto out;
        }
        if (rt_modules[i]->attach && rt_modules[i]->attach(rt.state[i], &rt.h) < 0) {
            log_error("%s: cannot attach", rt_modules[i]->name);
            goto out;
        }
    }
    if (health_start(rt.h.health) < 0 || wsapp_start(rt.h.app, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    for (; started < RT_NMODULES; started++)
        if (rt_modules[started]->start && rt_modules[started]->start(rt.state[started]) < 0) {
            log_error("%s: cannot start", rt_modules[started]->name);
            goto out;
        }
    log_event(LOG_INFO, "listening", "\"port\":%d,\"instance_id\":\"%s\"", wsapp_port(rt.h.app), rt.instance_id);
    while (!svc_stopping())
        svc_wait(1000);
    rc = 0;
out:
    wsapp_stop(rt.h.app, rt.stop_grace_ms);
    while (started > 0) {
        started--;
        if (rt_modules[started]->stop)
            rt_modules[started]->stop(rt.state[started]);
    }
    /* Connections still open are closed here, their close hooks run:
     * the modules are freed after. */
    wsapp_free(rt.h.app);
    for (size_t i = RT_NMODULES; i > 0; i--)
        if (rt_modules[i - 1]->free && rt.state[i - 1])
            rt_modules[i - 1]->free(rt.state[i - 1]);
    health_free(rt.h.health);
    amqpc_free(amqp);
    rconn_free(redis);
    dbpool_free(db);
    return rc;
}
