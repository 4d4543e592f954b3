/* rtes_consumer: the AMQP side of RTES, on a thread of its own.
 *
 * It declares the topic exchange `workflows` (durable), the queues
 * workflow.node.status, workflow.completion and workflow.worker.initiated
 * bound with their own names as routing keys, and execution.token (reached
 * through the default exchange), with the durability of
 * RABBITMQ_QUEUE_DURABLE; sets the prefetch; and consumes all four on one
 * channel, once the database migrations are applied (so nothing is taken
 * before its tables exist). Messages are taken in bursts: every message already delivered
 * (up to the prefetch of all four queues) is parsed, the good ones stored
 * in one PostgreSQL transaction (tokens in Redis), and only then
 * acknowledged, with one multiple ack. A message that is not JSON or lacks
 * a required field is rejected without requeue, with one log line naming
 * the queue and the reason; so is one PostgreSQL refuses for its data.
 * While PostgreSQL or Redis is down the burst is kept and retried with
 * back-off (the broker holds the rest: nothing is acknowledged). A lost
 * broker is reconnected with back-off; the messages it had not seen acked
 * are delivered again and recognised by their digest, so each is stored
 * once.
 *
 * After the commit each new event's frame is published on Redis channel
 * rtes:exec:<execution_id> as "<seq>\n<workflow_id>\n<frame>", which every
 * realtime instance (this one included) receives (rtes_hub). */
#ifndef RTES_CONSUMER_H
#define RTES_CONSUMER_H

#include "dbpool.h"
#include "rconn.h"

typedef struct rtes_consumer rtes_consumer;

typedef struct {
    const char *amqp_url;   /* copied */
    int durable;            /* RABBITMQ_QUEUE_DURABLE */
    int prefetch;           /* RABBITMQ_PREFETCH_COUNT, per queue */
    dbpool *db;             /* shared, thread-safe; one connection is held while storing */
    const rconn_opts *redis; /* copied; the thread opens its own connection */
    const char *migrations_dir; /* applied before the first subscription; copied */
} rtes_consumer_opts;

/* Creates the consumer (no thread yet). NULL on OOM or a bad URL. Free
 * with rtes_consumer_free. */
rtes_consumer *rtes_consumer_new(const rtes_consumer_opts *o);

/* Starts the thread. 0 or -1. */
int rtes_consumer_start(rtes_consumer *c);

/* Asks the thread to stop after the burst in hand and joins it (bounded by
 * the retry of that burst: a stop request ends the retries; what was not
 * acknowledged is delivered again later). Idempotent. */
void rtes_consumer_stop(rtes_consumer *c);

/* Stops and frees. NULL is a no-op. */
void rtes_consumer_free(rtes_consumer *c);

/* Nonzero while subscribed to the queues (for the health route). */
int rtes_consumer_ready(const rtes_consumer *c);

#endif
