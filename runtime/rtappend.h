/* rtappend: appends to a run's log (SPEC 6), one at a time or by group
 * commit: the appends that arrived together run in one transaction
 * (runtime.append_run_events, database/migrations/0017), so they share one
 * commit, one WAL flush and one round trip. Each is still answered only
 * after that commit; an outcome other than appended (409, 400, 404)
 * answers its own append only; a database error in the group runs each
 * append again on its own. */
#ifndef RT_RTAPPEND_H
#define RT_RTAPPEND_H

#include "canonjson.h"
#include "rt.h"

/* At most this many appends share one transaction. */
#define RTAPPEND_GROUP_MAX 64

/* The deepest payload an append takes (canonjson_depth): what the receipt
 * can still hash inside the run's event list. */
#define RTAPPEND_PAYLOAD_MAX_DEPTH (CANONJSON_MAX_DEPTH - 8)

typedef struct rt_append rt_append;

/* Checks one append request (run id, body, publish limits). Returns the
 * append ready for the database, or NULL with the answer in `a`. `q` and
 * `a` are borrowed and must outlive the append, which rtappend_commit
 * frees. */
rt_append *rtappend_prepare(rt *r, const rt_req *q, rt_resp *a);

/* Writes v[0..n-1] (1 <= n <= RTAPPEND_GROUP_MAX) in one transaction,
 * fills each one's answer, and frees them. */
void rtappend_commit(rt *r, rt_append **v, int n);

/* Frees an append that was not committed (NULL is a no-op). */
void rtappend_free(rt_append *x);

/* --- for committing appends elsewhere than rtappend_commit (rtpipe: on
 * the server's loop, over asynchronous connections). The statements take:
 * ONE and FAST rtappend_params' five (FAST ignores the fifth); GROUP and
 * SET one JSON array from rtappend_group_json (SET with ordinals). ONE and
 * FAST answer append_run_event's row (columns from 0), GROUP and SET its
 * ordinal and then that row (from 1). FAST and SET take common appends
 * only; FAST answers no row and SET outcome 'retry' for an append they did
 * not append (unknown run, used key, projector behind): append that one
 * with ONE, which tells those apart. Their row
 * ends with one more column, the Khala message the append NOTIFYed (NULL
 * when no instance listens to the topic): RTAPPEND_FAST_NOTE and
 * RTAPPEND_SET_NOTE. */
#define RTAPPEND_FAST_NOTE 8
#define RTAPPEND_SET_NOTE 9
extern const char RTAPPEND_ONE_SQL[], RTAPPEND_GROUP_SQL[], RTAPPEND_SET_SQL[], RTAPPEND_FAST_SQL[];

/* Nonzero for an append without expected_previous_seq whose type is not
 * a state-machine one: it can be neither a conflict nor invalid. */
int rtappend_common(const rt_append *x);
/* Nonzero for a keyed append over its topic's publish rate: only
 * rtappend_commit takes it (a replay of its key answers 200, else 429). */
int rtappend_limited(const rt_append *x);
/* Nonzero when the client asked for the answer without events. */
int rtappend_minimal(const rt_append *x);
const char *rtappend_run(const rt_append *x);
const char *rtappend_key(const rt_append *x); /* NULL when none */
/* The statement parameters (borrowed from x). */
void rtappend_params(const rt_append *x, const char *p[5]);
/* Nonzero when SET can take v[0..n-1]: every append common, no two with
 * the same run and key (SET's one statement would not see the first's
 * key when it checks the second's). */
int rtappend_set_fits(rt_append **v, int n);
/* The JSON array of GROUP (with_ord 0) or SET (with_ord 1); malloc'd,
 * NULL on OOM. */
char *rtappend_group_json(rt_append **v, int n, int with_ord);
/* Answers x from row `row` of res (append_run_event's columns from `b`);
 * c reads the run back for a full answer and may be NULL when
 * rtappend_minimal(x). */
void rtappend_answer(rt *r, rt_append *x, PGconn *c, const PGresult *res, int row, int b);
/* Answers x 503: its outcome is unknown or the database is down (the
 * caller logs why, once for all the appends it fails). */
void rtappend_fail(rt_append *x);

#endif
