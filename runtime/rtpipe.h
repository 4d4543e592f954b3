/* rtpipe: appends committed from the server's loop thread over a few
 * asynchronous PostgreSQL connections (libpq in nonblocking mode, their
 * sockets watched by the loop through wsapp_io), so that an append costs
 * no hand-off to a thread and back: the loop parses the request, sends the
 * statement, and answers when the result arrives.
 *
 * Each connection commits one group at a time: what queued on it while
 * its previous group was in flight goes as the next group (at most
 * RTAPPEND_GROUP_MAX), in one statement and one transaction, so appends
 * from many clients share a commit. A run's appends always go to the same
 * connection (chosen by a hash of the run id): they keep their order, and
 * two of this process's groups never wait for each other's run locks.
 * Every append is answered only after its commit. An outcome other than
 * appended answers that append only; a group the server refused runs
 * again one append at a time; a connection that broke answers its appends
 * in flight and queued 503 (their outcome is unknown) and reconnects with
 * back-off. Only appends answered without events (Prefer: return=minimal)
 * come here: the full answer reads the run's log back, which the handler
 * threads do. */
#ifndef RT_RTPIPE_H
#define RT_RTPIPE_H

#include "rt.h"
#include "rtappend.h"
#include "wsapp.h"

/* At most this many connections. */
#define RTPIPE_CONNS_MAX 16

typedef struct rtpipe rtpipe;

/* Called on the loop once the append's answer is in its rt_resp (the
 * rtappend_prepare `a`), or, with live 0, when the pipe is freed with the
 * append unanswered (the loop has ended): then only free what ud holds. */
typedef void (*rtpipe_done_fn)(void *ud, int live);

/* Called on the loop with the Khala message (JSON text, borrowed) of each
 * append committed here whose topic some instance listens to, as soon as
 * it is committed: this instance's subscribers need not wait for its
 * NOTIFY to come back. */
typedef void (*rtpipe_message_fn)(void *ud, const char *message);

/* A pipe of `conns` (1..RTPIPE_CONNS_MAX) connections to `conninfo`
 * (copied) whose sockets `app` watches; r and app are borrowed and must
 * outlive it; on_message (may be NULL) gets each message. Does not
 * connect. NULL on OOM. */
rtpipe *rtpipe_new(rt *r, wsapp *app, const char *conninfo, int conns, rtpipe_message_fn on_message, void *ud);

/* Starts connecting (each connection on a short-lived thread, then on the
 * loop). Call before wsapp_start or on the loop. */
int rtpipe_start(rtpipe *p);

/* Nonzero when some connection is up (loop thread). */
int rtpipe_up(const rtpipe *p);

/* Takes append x (from rtappend_prepare, rtappend_minimal) and commits
 * it; fn(ud, 1) runs on the loop when it is answered, after which the
 * pipe frees x. That may happen before rtpipe_submit returns (a send that
 * fails at once): make ud ready for fn first. Returns -1 when no
 * connection is up or its queue is full (x stays the caller's, fn is not
 * called). Loop thread only. */
int rtpipe_submit(rtpipe *p, rt_append *x, rtpipe_done_fn fn, void *ud);

/* Frees the pipe after the loop ended: waits for connecting threads,
 * closes the connections, and calls fn(ud, 0) for every append not
 * answered. NULL is a no-op. */
void rtpipe_free(rtpipe *p);

#endif
