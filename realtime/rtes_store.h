/* rtes_store: workflow execution history in PostgreSQL (migration 0008).
 *
 * Every function works on a connection the caller holds (from a dbpool) and
 * leaves it idle. Messages are stored as the worker wrote them (json); their
 * frames are cut from that text by rtes_msg_frame, for live frames and
 * history alike. */
#ifndef RTES_STORE_H
#define RTES_STORE_H

#include <stddef.h>

#include <libpq-fe.h>

#include "rtes_msg.h"

/* What storing one message produced. */
typedef struct {
    long long seq; /* the event's seq; 0 when none (initiated, token, redelivery) */
} rtes_stored;

enum {
    RTES_STORE_OK = 0,
    RTES_STORE_RETRY = -1, /* connection lost, server down, conflict: try the batch again later */
    RTES_STORE_DATA = -2   /* PostgreSQL refused a value: store one by one to find it */
};

/* Stores n parsed messages (node status, completion, initiated; tokens are
 * skipped) in one transaction and one round trip (pipeline mode). out[i]
 * receives message i's result (zeroed first). Returns RTES_STORE_OK once
 * committed, else RTES_STORE_RETRY or RTES_STORE_DATA with the reason in
 * err; nothing was stored then. */
int rtes_store_batch(PGconn *c, rtes_msg *const *msgs, int n, rtes_stored *out, char *err, size_t errlen);

/* Called with each event of rtes_store_events, in seq order; `frame` is
 * valid during the call. Return nonzero to stop. */
typedef int (*rtes_event_fn)(long long seq, const char *frame, size_t len, void *ud);

/* The frames of execution `eid` with after < seq <= upto (upto <= 0: no
 * bound), at most `limit`, in seq order. With wid (RTES_ID_MAX bytes), the
 * same statement reads the execution's workflow id into it ("" when the
 * execution is unknown). *count gets how many were passed to fn. 0 or -1
 * (err). */
int rtes_store_events(PGconn *c, const char *eid, long long after, long long upto, int limit, char *wid,
                      rtes_event_fn fn, void *ud, int *count, char *err, size_t errlen);

/* The GET /executions/{id} document (malloc'd JSON text the caller frees)
 * in *doc, with its workflow id in wid (RTES_ID_MAX bytes). Returns 1, 0
 * when unknown (*doc NULL), -1 on error. */
int rtes_store_document(PGconn *c, const char *eid, char **doc, char *wid, char *err, size_t errlen);

#endif
