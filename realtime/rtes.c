#include "rtes.h"

#include <stdlib.h>
#include <string.h>

#include "jwtauth.h"
#include "log.h"
#include "migrate.h"
#include "rtes_consumer.h"
#include "rtes_hub.h"
#include "rtes_ws.h"

struct rtes {
    dbpool *db;
    rconn_opts redis;
    jwtauth *jwt;
    rtes_consumer *consumer;
    rtes_hub *hub;
    rtes_ws *ws;
    char *amqp_url;
    int durable, prefetch, skip_auth;
};

rtes *rtes_new(cfg *c, dbpool *db, const rconn_opts *redis, const char *amqp_url)
{
    rtes *r = calloc(1, sizeof(*r));
    const char *secret;
    rtes_consumer_opts co;
    char dir[1024];

    if (!r)
        return NULL;
    r->db = db;
    r->redis = *redis;
    r->durable = cfg_bool(c, "RABBITMQ_QUEUE_DURABLE", 0);
    r->prefetch = (int)cfg_int(c, "RABBITMQ_PREFETCH_COUNT", 10, 1, 65535);
    r->skip_auth = cfg_bool(c, "RTES_SKIP_AUTH", 0);
    if (r->skip_auth)
        log_warn("RTES_SKIP_AUTH is set: /rt and /executions are open to everybody (development only)");
    /* The original RTES read JWT_SECRET_KEY; JWT_SECRET, the platform's
     * name, wins when both are set. */
    secret = cfg_str(c, "JWT_SECRET", NULL);
    if (!secret)
        secret = cfg_str(c, "JWT_SECRET_KEY", NULL);
    if (!secret)
        secret = cfg_secret(c, "JWT_SECRET", "dev-jwt-secret-change-me");
    r->amqp_url = strdup(amqp_url ? amqp_url : "");
    r->jwt = jwtauth_new(secret, NULL, NULL, 30);
    if (!r->amqp_url || !r->jwt)
        goto fail;
    memset(&co, 0, sizeof(co));
    co.amqp_url = r->amqp_url;
    co.durable = r->durable;
    co.prefetch = r->prefetch;
    co.db = db;
    co.redis = &r->redis;
    if (migrate_default_dir(dir, sizeof(dir)) < 0)
        log_warn("the migrations directory %s is missing (MIGRATIONS_DIR)", dir);
    co.migrations_dir = dir;
    r->consumer = rtes_consumer_new(&co);
    if (!r->consumer)
        goto fail;
    return r;
fail:
    rtes_free(r);
    return NULL;
}

int rtes_mount(rtes *r, wsapp *app)
{
    r->hub = rtes_hub_new(app, r->db, &r->redis, 2);
    if (!r->hub)
        return -1;
    r->ws = rtes_ws_new(r->hub, r->jwt, &r->redis, r->skip_auth);
    if (!r->ws)
        return -1;
    return rtes_ws_mount(r->ws, app);
}

int rtes_start(rtes *r)
{
    if (r->hub && rtes_hub_start(r->hub) < 0)
        return -1;
    return rtes_consumer_start(r->consumer);
}

int rtes_consuming(const rtes *r)
{
    return r && rtes_consumer_ready(r->consumer);
}

void rtes_stop(rtes *r)
{
    if (!r)
        return;
    rtes_consumer_stop(r->consumer);
    rtes_hub_stop(r->hub);
}

void rtes_free(rtes *r)
{
    if (!r)
        return;
    rtes_stop(r);
    rtes_consumer_free(r->consumer);
    rtes_ws_free(r->ws);
    rtes_hub_free(r->hub);
    jwtauth_free(r->jwt);
    free(r->amqp_url);
    free(r);
}
