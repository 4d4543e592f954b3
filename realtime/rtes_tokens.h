/* rtes_tokens: the execution tokens of SPEC 5b in Redis and the access
 * rule built on them.
 *
 * A token {execution_id?, workflow_id, iat, exp, user_id} is a member (its
 * JSON) of the sorted sets user_id_<uid> and execution_id_<eid>, or, when it
 * names no execution (it covers the whole workflow), workflow_id_<wid>; the
 * score is exp. Members whose exp has passed are removed whenever a set is
 * written or read, and each key expires with its last token.
 *
 * Every function takes an rconn owned by the calling thread. */
#ifndef RTES_TOKENS_H
#define RTES_TOKENS_H

#include <stddef.h>

#include "rconn.h"
#include "rtes_msg.h"

/* Stores token message m (kind RTES_TOKEN) at time `now` (unix seconds). A
 * token already expired is not stored (returns 0). 0 or -1 (err). */
int rtes_tokens_add(rconn *r, const rtes_msg *m, long long now, char *err, size_t errlen);

/* Whether user uid holds a live token for execution eid of workflow wid:
 * one naming the execution (of that workflow when wid is not empty), or a
 * workflow-wide one for wid. 1 yes, 0 no, -1 Redis failed (err). */
int rtes_tokens_user_grants(rconn *r, const char *uid, const char *eid, const char *wid, long long now,
                            char *err, size_t errlen);

/* Whether the execution itself has a live token (of workflow wid when not
 * empty), or, when wid is not empty, the workflow has a workflow-wide one.
 * 1, 0 or -1. */
int rtes_tokens_execution_live(rconn *r, const char *eid, const char *wid, long long now, char *err,
                               size_t errlen);

#endif
