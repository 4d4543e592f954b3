/* rtappend: appends to a run's log (SPEC 6), one at a time or by group
 * commit: the appends that arrived together run in one transaction
 * (runtime.append_run_events, database/migrations/0017), so they share one
 * commit, one WAL flush and one round trip. Each is still answered only
 * after that commit; an outcome other than appended (409, 400, 404)
 * answers its own append only; a database error in the group runs each
 * append again on its own. */
#ifndef RT_RTAPPEND_H
#define RT_RTAPPEND_H

#include "rt.h"

/* At most this many appends share one transaction. */
#define RTAPPEND_GROUP_MAX 64

typedef struct rt_append rt_append;

/* Checks one append request (run id, body, publish limits). Returns the
 * append ready for the database, or NULL with the answer in `a`. `q` and
 * `a` are borrowed and must outlive the append, which rtappend_commit
 * frees. */
rt_append *rtappend_prepare(rt *r, const rt_req *q, rt_resp *a);

/* Writes v[0..n-1] (1 <= n <= RTAPPEND_GROUP_MAX) in one transaction,
 * fills each one's answer, and frees them. */
void rtappend_commit(rt *r, rt_append **v, int n);

#endif
