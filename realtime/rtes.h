/* rtes: workflow executions in the realtime program (SPEC 5b), the part
 * that replaces the Rust execution service RTES.
 *
 * It owns the AMQP consumer thread (rtes_consumer), the watcher hub with
 * its Redis subscriber and PostgreSQL loader threads (rtes_hub), and the
 * routes GET /rt (WebSocket) and GET /executions/{id} (rtes_ws). See
 * docs/realtime.md. */
#ifndef RTES_H
#define RTES_H

#include "cfg.h"
#include "dbpool.h"
#include "rconn.h"
#include "wsapp.h"

typedef struct rtes rtes;

/* Reads RTES's configuration from c (RABBITMQ_QUEUE_DURABLE,
 * RABBITMQ_PREFETCH_COUNT, RTES_SKIP_AUTH, JWT_SECRET or JWT_SECRET_KEY;
 * bad values are recorded in c) and creates the parts; nothing runs yet.
 * `db` is shared (thread-safe); the Redis options and AMQP URL are copied.
 * NULL on OOM. Free with rtes_free. */
rtes *rtes_new(cfg *c, dbpool *db, const rconn_opts *redis, const char *amqp_url);

/* Registers GET /rt and GET /executions/ on app (before wsapp_start). 0 or -1. */
int rtes_mount(rtes *r, wsapp *app);

/* Starts the threads (after wsapp_start). 0 or -1. */
int rtes_start(rtes *r);

/* Nonzero while subscribed to RabbitMQ. */
int rtes_consuming(const rtes *r);

/* Stops the threads (the consumer finishes the burst in hand). Call before
 * wsapp_stop; idempotent. */
void rtes_stop(rtes *r);

/* Stops and frees. NULL is a no-op. */
void rtes_free(rtes *r);

#endif
