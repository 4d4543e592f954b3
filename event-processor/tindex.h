/* tindex: the in-memory index of enabled triggers, by (chain_id, registry)
 * and, for triggers with an agent_id_equals condition, by agent as well, so
 * an event only meets the triggers that can match it. Built whole from
 * PostgreSQL at start and after a LISTEN reconnect; on trigger_changed
 * (whose payload is the trigger's id) only the triggers named are read
 * again and replaced, so one user's writes cost the loop one trigger each,
 * not a reload of everyone's. Not thread-safe: owned by the processing
 * thread. */
#ifndef AE_TINDEX_H
#define AE_TINDEX_H

#include <stdint.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#include "trigger_model.h"

typedef struct {
    int id;               /* trigger_actions.id */
    char id_text[16];
    const char *type;     /* telegram|rest|mcp (static) */
    int priority;
    char *config_json;    /* config as JSON text */
} tindex_action;

typedef struct {
    char *id, *user_id, *name;
    char *id_esc, *user_esc, *name_esc; /* JSON-escaped (no quotes) */
    trigger_model_matcher *m;
    int naction;
    tindex_action *actions;
    /* Per-batch scratch owned by the processing loop. */
    trigger_model_state *state; /* cached for the burst; NULL until needed */
    int need_state;   /* candidate in this batch (stateful only) */
    int state_dirty;
    /* The index's own. */
    char *ix_key_;
    int ix_pos_;
} tindex_trigger;

typedef struct tindex tindex;

/* Loads every enabled trigger with its conditions and actions over `conn`.
 * Returns a new index (free with tindex_free) or NULL with the reason in
 * `err`. */
tindex *tindex_load(PGconn *conn, char *err, size_t errlen);

/* Reads the triggers `ids` (n of them) again over `conn` and replaces
 * them in the index: one that no longer exists, is disabled or never
 * matches leaves it, a new one enters. `drop(ud, t)`, when given, is
 * called for each trigger about to be replaced or removed (and freed with
 * its state), before it goes. Returns 0, or -1 with the reason in `err`:
 * the index is unchanged when the read failed, but may be partly updated
 * after an OOM, so the caller then loads it whole. */
int tindex_update(tindex *ix, PGconn *conn, const char *const *ids, int n, void (*drop)(void *, tindex_trigger *),
                  void *ud, char *err, size_t errlen);

/* Frees the index. NULL is a no-op. */
void tindex_free(tindex *ix);

/* Number of triggers indexed. */
int tindex_count(const tindex *ix);

/* The triggers an event of (chain_id, registry, agent_id) may match: up to
 * two lists (triggers without an agent condition, and those for this
 * agent; has_agent 0 skips the second). Each list is an array of trigger
 * pointers with its length; lists stay valid until tindex_free. Returns the
 * number of lists stored in lists/lens (0..2). */
int tindex_candidates(const tindex *ix, int64_t chain_id, const char *registry, int has_agent, int64_t agent_id,
                      tindex_trigger *const **lists, int *lens);

/* Looks a trigger up by id (NULL when absent). */
tindex_trigger *tindex_find(const tindex *ix, const char *id);

#endif
