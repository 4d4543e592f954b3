/* pusher: the Redis pusher thread of the event-processor.
 *
 * The processing thread hands it each committed batch and goes on with the
 * next one meanwhile, so PostgreSQL, the matching and Redis work at the
 * same time. One batch in flight at most: handing over the next waits for
 * the previous push (back-pressure). The outbox ids it pushed are collected
 * by the processing thread, which deletes their rows in a later
 * transaction; a failed push leaves its row in the outbox and is reported
 * by pusher_collect, and the processing thread then flushes the outbox
 * itself after pusher_wait_idle (the Redis connection app->push is used by
 * one thread at a time). Every function is called by the processing thread
 * only. */
#ifndef AE_PUSHER_H
#define AE_PUSHER_H

#include <stddef.h>

#include "ep.h"
#include "jobs.h"

/* Outbox ids pushed and not yet collected: more are left to the next
 * outbox flush. */
#define PUSHER_MAX_DONE 64

typedef struct pusher pusher;

/* Starts the thread; it pushes with app->push to app->cfg.queue. NULL on
 * failure (out of memory or threads). */
pusher *pusher_start(ep *app);

/* Finishes the push in hand, joins the thread and frees everything. NULL
 * is a no-op. */
void pusher_stop(pusher *P);

/* Hands over the committed batch *jp (outbox row `id`, batch key `key`)
 * and puts an empty job buffer in *jp. Waits while a push is in flight. */
void pusher_submit(pusher *P, jobs **jp, const char *key, long long id);

/* Waits until no push is in flight. */
void pusher_wait_idle(pusher *P);

/* Appends the outbox ids pushed since the last call to ids[*nids..cap).
 * Returns 1 with the reason in `err` when a push failed since the last
 * call, else 0. */
int pusher_collect(pusher *P, long long *ids, int *nids, int cap, char *err, size_t errlen);

#endif
