/* ep: the event-processor's shared state (SPEC 3; docs/event-processor.md).
 *
 * One processing thread owns the two PostgreSQL work connections (from
 * the pool, for the length of a burst), the LISTEN connection and the
 * trigger index; the pusher thread owns the Redis push connection between
 * a hand-over and the end of its push (pusher.h). The main thread only
 * waits for signals, and the health thread only runs the checks on its own
 * connections. */
#ifndef AE_EP_H
#define AE_EP_H

#include <stdatomic.h>
#include <stdint.h>

#include "dbpool.h"
#include "deps.h"
#include "health.h"
#include "httpd.h"
#include "metrics.h"
#include "rconn.h"

#define EP_VERSION "0.1.0"

typedef struct {
    char conninfo[2048];
    char migrations_dir[1024];
    char metrics_host[256];
    int metrics_port;
    long poll_ms;         /* POLL_INTERVAL_MS */
    int batch_size;       /* BATCH_SIZE */
    char queue[128];      /* ACTION_QUEUE: the Redis list */
    long seen_ttl_s;      /* BATCH_KEY_TTL_SECONDS: life of ep:batch:* keys */
    rconn_opts redis;
} ep_config;

typedef struct tindex tindex;

typedef struct {
    ep_config cfg;
    dbpool *db;
    health *health;
    rconn *health_rconn;
    rconn *push;
    httpd *http;
    int health_listen;
    atomic_int listen_ok;   /* the LISTEN connection is up */
    deps_pgmig *pgmig;      /* the database check; says when migrations are applied */
    int wake_fd;            /* eventfd: the main thread wakes the loop at stop */
    tindex *index;
    /* Metrics (cached series). */
    metrics_counter *m_processed, *m_matches, *m_enqueued, *m_errors;
    metrics_counter *m_reload_full, *m_reload_changed; /* trigger index loads: whole, per changed trigger */
    metrics_gauge *m_lag, *m_triggers;
    metrics_histogram *m_batch;
} ep;

/* The processing loop (thread entry); `arg` is the ep. Returns NULL. */
void *ep_run(void *arg);

/* Health check of the LISTEN connection (reads ep.listen_ok). */
int ep_listen_check(void *ud);


#endif
