/* rtes_hub: the watchers of workflow executions, and the two threads that
 * feed them without blocking the WebSocket loop.
 *
 * Every stored event has a seq, dense per execution (1, 2, 3...: each
 * commit takes the next under the execution's row lock). Each watched
 * execution has a log on this instance: its frames, already framed for
 * WebSocket, in append-only chunks shared by reference. Frames read from
 * PostgreSQL (history) and frames published on Redis (live, by whichever
 * instance consumed them) go into the same log in seq order, so a replayed
 * frame is the same bytes as a live one. A watcher is a cursor into the log
 * (the seq it writes next, from 1): when its socket is writable it writes
 * as much as the socket takes in one system call. Hence every watcher
 * writes seqs 1, 2, 3... each once, whatever the interleaving of reads and
 * live frames. A watcher behind the log reads on its own from PostgreSQL;
 * a live frame beyond the log's end waits (bounded) until PostgreSQL fills
 * the gap.
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
 * PostgreSQL reads. Every `ping_ms` (0: never) each watcher gets a
 * WebSocket ping; one that sent nothing (no pong) for `timeout_ms` is
 * closed. NULL on OOM. Before wsapp_start. */
rtes_hub *rtes_hub_new(wsapp *app, dbpool *db, const rconn_opts *redis, int loaders, long ping_ms, long timeout_ms);

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

/* The connection's `writable` hook (wsapp_ws_handlers): writes the frames
 * due from the execution's log, as many as the socket takes. w may be
 * NULL. Returns what the hook returns. */
int rtes_hub_writable(rtes_hub *h, rtes_watch *w);

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
