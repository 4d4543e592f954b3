/* rtes_hub: the watchers of workflow executions, and the two threads that
 * feed them without blocking the WebSocket loop.
 *
 * Every stored event has a seq, dense per execution (1, 2, 3...: each
 * commit takes the next under the execution's row lock). A watcher sends
 * seqs in order, from 1, with no gap and no repeat: it tracks `next`, the
 * seq it must send next. History and live frames are the same events:
 *
 *  - the loader threads read events with seq >= next from PostgreSQL, in
 *    chunks (flow-controlled by the connection's send queue);
 *  - the subscriber thread takes every frame published on Redis
 *    (PSUBSCRIBE rtes:exec:*, by whichever instance consumed it). A frame
 *    with seq == next is sent at once; one ahead of next waits (bounded);
 *    one below next was already sent and is dropped.
 *
 * So a frame published while the history loads is sent once, from whichever
 * path reaches the watcher first, and a frame missed on Redis (a gap that
 * stays open, a Redis restart) is read from PostgreSQL. Results of both
 * threads reach the loop through wsapp_post.
 *
 * Every function here runs on the wsapp loop thread unless it says
 * otherwise. */
#ifndef RTES_HUB_H
#define RTES_HUB_H

#include "dbpool.h"
#include "rconn.h"
#include "rtes_msg.h"
#include "wsapp.h"

typedef struct rtes_hub rtes_hub;
typedef struct rtes_watch rtes_watch;

/* Creates the hub for `app` (threads not started) and its timer. `db` is
 * shared; Redis options are copied; `loaders` threads (>= 1) serve
 * PostgreSQL reads; `send_queue` is wsapp's send_queue_bytes (a watcher
 * waits at a quarter of it, at most 64 KiB). NULL on OOM. Before
 * wsapp_start. */
rtes_hub *rtes_hub_new(wsapp *app, dbpool *db, const rconn_opts *redis, int loaders, size_t send_queue);

/* Starts the subscriber and loader threads. After wsapp_start. 0 or -1. */
int rtes_hub_start(rtes_hub *h);

/* Stops and joins the threads and frees the timer: after the loop ended
 * (wsapp_stop), before wsapp_free. Idempotent. */
void rtes_hub_stop(rtes_hub *h);

/* Frees (after wsapp_free). NULL is a no-op. */
void rtes_hub_free(rtes_hub *h);

/* Starts watching execution eid on connection c: history, then live. When
 * `wid` is not empty, the execution must belong to that workflow (else the
 * connection is closed with 1008). Returns the watch (the hub's; pass it to
 * rtes_hub_unwatch when the connection closes), or NULL on OOM. */
rtes_watch *rtes_hub_watch(rtes_hub *h, wsapp_conn *c, const char *eid, const char *wid);

/* The connection is gone. */
void rtes_hub_unwatch(rtes_hub *h, rtes_watch *w);

/* Who asks for a document, for the access rule (see rtes_ws). */
typedef struct {
    int skip_auth;               /* RTES_SKIP_AUTH */
    char user_id[RTES_ID_MAX];   /* from a verified Bearer JWT; "" when none */
} rtes_asker;

/* Answers GET /executions/{eid} for req (deferred here): the loader reads
 * the document and applies the access rule with the execution's real
 * workflow (404, then 401/403), then the answer is sent from the loop. */
void rtes_hub_document(rtes_hub *h, wsapp_req *req, const char *eid, const rtes_asker *who);

/* Open watches (for /health and tests). */
int rtes_hub_watchers(const rtes_hub *h);

#endif
