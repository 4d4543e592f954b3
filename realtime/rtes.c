#include "rtes.h"

#include <stdlib.h>
#include <string.h>

#include "dbpool.h"
#include "jwtauth.h"
#include "log.h"
#include "migrate.h"
#include "rtes_consumer.h"
#include "rtes_hub.h"
#include "rtes_ws.h"

typedef struct {
    int durable, prefetch, skip_auth, db_conns;
    long ping_ms, timeout_ms;
    char dir[1024];
    jwtauth *jwt;
    dbpool *db;
    rtes_consumer *consumer;
    rtes_hub *hub;
    rtes_ws *ws;
} rtes;

static void rtes_free(void *state);

static void *rtes_configure(cfg *c)
{
    rtes *r = calloc(1, sizeof(*r));
    const char *secret;

    if (!r)
        return NULL;
    r->durable = cfg_bool(c, "RABBITMQ_QUEUE_DURABLE", 0);
    r->prefetch = (int)cfg_int(c, "RABBITMQ_PREFETCH_COUNT", 10, 1, 65535);
    r->skip_auth = cfg_bool(c, "RTES_SKIP_AUTH", 0);
    /* The same heartbeat as /ws (a WebSocket ping only: a text frame
     * would be taken for an execution frame by an RTES client). */
    r->ping_ms = cfg_duration_ms(c, "HEARTBEAT_INTERVAL", 30000, 1000);
    r->timeout_ms = cfg_duration_ms(c, "CLIENT_TIMEOUT", 60000, 1000);
    /* The consumer holds one while storing; the two loaders one each. */
    r->db_conns = (int)cfg_int(c, "RTES_DB_CONNECTIONS", 4, 2, 64);
    if (r->skip_auth)
        log_warn("RTES_SKIP_AUTH is set: /rt and /executions are open to everybody (development only)");
    /* The original RTES read JWT_SECRET_KEY; JWT_SECRET, the platform's
     * name, wins when both are set. */
    secret = cfg_str(c, "JWT_SECRET", NULL);
    if (!secret)
        secret = cfg_str(c, "JWT_SECRET_KEY", NULL);
    if (!secret)
        secret = cfg_secret(c, "JWT_SECRET", "dev-jwt-secret-change-me");
    if (migrate_default_dir(r->dir, sizeof(r->dir)) < 0)
        cfg_error(c, "MIGRATIONS_DIR", r->dir, "a directory of migrations");
    r->jwt = jwtauth_new(secret, NULL, NULL, 30);
    if (!r->jwt) {
        rtes_free(r);
        return NULL;
    }
    return r;
}

static int rtes_attach(void *state, rt_host *host)
{
    rtes *r = state;
    rtes_consumer_opts co;

    r->db = dbpool_new(host->conninfo, r->db_conns);
    if (!r->db)
        return -1;
    memset(&co, 0, sizeof(co));
    co.amqp_url = host->amqp_url;
    co.durable = r->durable;
    co.prefetch = r->prefetch;
    co.db = r->db;
    co.redis = host->redis;
    co.migrations_dir = r->dir;
    r->consumer = rtes_consumer_new(&co);
    r->hub = rtes_hub_new(host->app, r->db, host->redis, 2, r->ping_ms, r->timeout_ms);
    if (!r->consumer || !r->hub)
        return -1;
    r->ws = rtes_ws_new(r->hub, r->jwt, host->redis, r->skip_auth);
    if (!r->ws)
        return -1;
    return rtes_ws_mount(r->ws, host->app);
}

static int rtes_start(void *state)
{
    rtes *r = state;

    if (rtes_hub_start(r->hub) < 0)
        return -1;
    return rtes_consumer_start(r->consumer);
}

static int rtes_health(void *state, cJSON *body)
{
    rtes *r = state;
    cJSON *o = cJSON_AddObjectToObject(body, "rtes");
    int consuming = rtes_consumer_ready(r->consumer);

    if (o) {
        cJSON_AddBoolToObject(o, "consuming", consuming);
        cJSON_AddNumberToObject(o, "watchers", rtes_hub_watchers(r->hub));
    }
    if (consuming)
        return 0;
    if (!cJSON_GetObjectItem(body, "reason"))
        cJSON_AddStringToObject(body, "reason", "Not consuming workflow messages from RabbitMQ");
    return 1;
}

static void rtes_stop(void *state)
{
    rtes *r = state;

    rtes_consumer_stop(r->consumer);
    rtes_hub_stop(r->hub);
}

static void rtes_free(void *state)
{
    rtes *r = state;

    if (!r)
        return;
    rtes_consumer_free(r->consumer);
    rtes_ws_free(r->ws);
    rtes_hub_free(r->hub);
    dbpool_free(r->db);
    jwtauth_free(r->jwt);
    free(r);
}

const rt_module rtes_module = {
    .name = "rtes",
    .configure = rtes_configure,
    .attach = rtes_attach,
    .start = rtes_start,
    .health = rtes_health,
    .stop = rtes_stop,
    .free = rtes_free,
};
