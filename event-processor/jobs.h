/* jobs: the action jobs of one batch, their JSON (SPEC 3), the outbox
 * references that make them durable, and the push to Redis.
 *
 * Job JSON: {id, trigger_id, event_id, action_type, action_id, priority,
 * config, event, created_at, attempt:0, trigger_name, user_id}. The id is
 * the hex SHA-256 of "trigger_id|event_id|action_id", so the same match
 * always yields the same id.
 *
 * Push protocol: a batch (one job_outbox row) is pushed entirely or not at
 * all, guarded by one key per batch, `ep:batch:{outbox id}:{outbox
 * created_at in microseconds}`:
 *
 *   WATCH key; EXISTS key; PUBSUB NUMPAT; PUBSUB NUMSUB ch...
 *                                     -> 1: already pushed, UNWATCH, done
 *   MULTI; LPUSH queue j1 j2 ...; RPUSH queue p1 p2 ...; PUBLISH ch msg ...;
 *   SET key 1 EX ttl; EXEC            -> nil: another pusher won, done
 *
 * Ordinary jobs (priority <= 1) are LPUSHed in batch order, jobs of priority
 * > 1 RPUSHed after them in ascending priority (stable), so consumers that
 * pop from the right take the highest priority first and the others in
 * order. One PUBLISH of the match's realtime Broadcast per match whose
 * channel has a subscriber (all of them when a pattern subscription
 * exists): nobody would receive the others. The
 * transaction is atomic, and WATCH makes two pushers of the same batch (a
 * replay racing the original) exclusive, so a batch's jobs reach Redis once
 * however often its outbox row is replayed within the key's ttl. The
 * created_at part keeps a recreated database, whose outbox ids start again
 * at 1, from meeting the keys of the old one. Not thread-safe. */
#ifndef AE_JOBS_H
#define AE_JOBS_H

#include <stddef.h>

#include "rconn.h"
#include "tindex.h"

typedef struct jobs jobs;

/* An event as the jobs need it. All strings are borrowed for the call. */
typedef struct {
    const char *id;        /* events.id */
    const char *id_esc;    /* JSON-escaped */
    const char *json;      /* the event object as JSON text */
    size_t json_len;       /* strlen(json) */
    const char *type_esc;  /* event_type, JSON-escaped ("" when null) */
    const char *agent;     /* agent_id as JSON ("null" when null) */
} jobs_event;

/* NULL on OOM. Free with jobs_free (NULL is a no-op). */
jobs *jobs_new(void);
void jobs_free(jobs *j);

/* Forgets every job (keeps the memory). */
void jobs_clear(jobs *j);

/* Number of jobs held. */
int jobs_count(const jobs *j);

/* Adds the job of action `a` of trigger `t` for `ev`; `publish` nonzero
 * attaches the match's Broadcast (one per match: give it with the first
 * action). `now` is the RFC 3339 creation time. Returns 0 or -1 (OOM). */
int jobs_add(jobs *j, const tindex_trigger *t, const tindex_action *a, const jobs_event *ev, const char *now,
             int publish);

/* Adds a job from its parts (outbox replay): the same as jobs_add with the
 * trigger and action given as values. */
int jobs_add_parts(jobs *j, const char *trigger_id, const char *trigger_name, const char *user_id, int action_id,
                   const char *action_type, int priority, const char *config_json, const jobs_event *ev,
                   const char *now, int publish);

/* The outbox references of the jobs held, as PostgreSQL array literals
 * (text[], text[], int[]) in job order. Pointers stay valid until the next
 * change to `j`. Returns 0 or -1 (OOM). */
int jobs_outbox_arrays(jobs *j, const char **event_ids, const char **trigger_ids, const char **action_ids);

/* Pushes every job held to list `queue` as the batch `batch_key` with the
 * protocol above (`ttl_s`: the key's lifetime). Returns the number of jobs
 * newly enqueued (0 when the batch was already pushed), or -1 with the
 * reason in `err` (Redis down or refusing: nothing is lost, the outbox
 * still holds them). */
int jobs_push(jobs *j, rconn *r, const char *queue, const char *batch_key, long ttl_s, char *err, size_t errlen);

#endif
