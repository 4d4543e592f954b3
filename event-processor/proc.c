/* proc: the processing loop of the event-processor. See
 * docs/event-processor.md for the protocol; in short, while it holds the
 * processors' advisory lock the loop works through the queue in batches,
 * each in its own transaction: take the oldest rows of event_queue
 * (DELETE ... SKIP LOCKED), match them against the trigger index, upsert
 * trigger_state, record the jobs in job_outbox, COMMIT; then push the jobs
 * to Redis and let a later transaction delete the outbox row.
 *
 * Two connections take turns so that PostgreSQL and the matching work at
 * the same time: while batch k is matched here, the other connection
 * commits batch k-1 and fetches batch k+1 (its SKIP LOCKED passes over the
 * rows batch k holds). Commits stay in batch order: batch k's COMMIT is
 * sent only once batch k-1's has succeeded, and a failure rolls both back. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "backoff.h"
#include "buf.h"
#include "dbpool.h"
#include "ep.h"
#include "event_model.h"
#include "evrow.h"
#include "fmt.h"
#include "jobs.h"
#include "jsonstr.h"
#include "log.h"
#include "pgarr.h"
#include "pusher.h"
#include "svc.h"
#include "tindex.h"

/* The outbox row's creation time in microseconds: part of its Redis batch
 * key (jobs.h). */
#define OUTBOX_USEC "(extract(epoch FROM created_at) * 1000000)::bigint"

/* Triggers reloaded one by one on trigger_changed before a whole load is
 * cheaper. */
#define MAX_CHANGED 256

/* Outbox rows pushed but not yet deleted, deleted by the next commit. */
#define MAX_PENDING_DEL PUSHER_MAX_DONE
/* The processors' session lock: one processor works through the queue at
 * a time, so each trigger's state sees the events in queue order and the
 * states cached between batches stay true. */
#define EP_LOCK_KEY "8004000002"

enum { PH_LOCK, PH_FETCH, PH_MATCH, PH_COMMIT, PH_PUSH, PH_N };
static const char *const ph_names[PH_N] = {"lock", "fetch_wait", "match", "commit_wait", "push_wait"};

static long long now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

typedef struct {
    cJSON *ev; /* the members matching reads (evrow_match_obj) */
    int row;   /* the event's row in the batch's result */
    char *json, *id_esc, *type_esc;
    size_t json_len;
    char agent[24];
    tindex_trigger *const *lists[2];
    int lens[2], nlists;
} bev;

/* What a connection in pipeline mode will answer next, in order. */
enum { Q_BEGIN, Q_FETCH, Q_DEL, Q_STATE, Q_OUTBOX, Q_COMMIT, Q_SYNC };
#define SLOT_QMAX 16

/* One of the two work connections and the batch it carries. */
typedef struct {
    PGconn *conn;
    int q[SLOT_QMAX]; /* answers awaited, oldest first */
    int qhead, qlen;
    int commit_queued;
    PGresult *rows;   /* the fetched batch (open transaction), NULL when none */
    int n;            /* its number of events */
    /* The batch whose COMMIT is queued. */
    jobs *cj;
    long long outbox_id;
    char key[128];
    int cn;
    long cmatches;
    long long t0;
} slot;

typedef struct {
    ep *app;
    pusher *P;
    PGconn *listen;
    backoff lb;
    long long listen_retry_at;
    int triggers_dirty, outbox_dirty;
    /* What trigger_changed named since the last reload (the ids, copied);
     * triggers_full: the index must be loaded whole instead (start, LISTEN
     * reconnect, a notification without an id, too many ids, a failure). */
    char *changed[MAX_CHANGED];
    int nchanged, triggers_full;
    int notified; /* new_event wake-ups read since the last fetch was sent */
    slot s[2];    /* the work connections of the session */
    int held;     /* the session holds the processors' lock */
    long long pending_del[MAX_PENDING_DEL];
    int npending;
    jobs *jobs;
    bev *evs;
    int evcap;
    /* Stateful triggers whose state is cached in the index for this
     * burst; to_load: those among them still to be read. */
    tindex_trigger **stateful;
    int nstateful, capstateful, first_unloaded;
    long long lag_at;
    int redis_failing;
    int pushed_since_fail; /* a push succeeded since the last failed one */
    /* Time spent per phase (microseconds), logged at shutdown. */
    long long ph[PH_N];
    long long batches;
    char last_err[512];
} loop;

int ep_listen_check(void *ud)
{
    ep *app = ud;

    return atomic_load(&app->listen_ok) ? 0 : -1;
}

/* Logs an error once per distinct message, so a dependency that stays down
 * does not flood the log. */
static void loop_error(loop *L, const char *what, const char *err)
{
    char a[256], b[512];

    metrics_counter_inc(L->app->m_errors);
    if (!strcmp(L->last_err, err))
        return;
    snprintf(L->last_err, sizeof(L->last_err), "%s", err);
    log_event(LOG_ERROR, what, "\"error\":\"%s\"", log_escape(b, sizeof(b), err));
    (void)a;
}

/* ------------------------------------------------------------------ */
/* LISTEN connection.                                                  */

static void listen_close(loop *L)
{
    if (L->listen)
        PQfinish(L->listen);
    L->listen = NULL;
    atomic_store(&L->app->listen_ok, 0);
}


static void changed_clear(loop *L)
{
    for (int i = 0; i < L->nchanged; i++)
        free(L->changed[i]);
    L->nchanged = 0;
}

static void want_full_reload(loop *L)
{
    changed_clear(L);
    L->triggers_full = 1;
    L->triggers_dirty = 1;
}

/* Notes a trigger_changed: the gateway's payload is the trigger's id, and
 * only that trigger is read again (see reload_triggers). */
static void trigger_changed(loop *L, const char *id)
{
    L->triggers_dirty = 1;
    if (L->triggers_full)
        return;
    if (!id || !id[0] || strlen(id) > 256 || L->nchanged == MAX_CHANGED) {
        want_full_reload(L);
        return;
    }
    for (int i = 0; i < L->nchanged; i++)
        if (!strcmp(L->changed[i], id))
            return;
    if (!(L->changed[L->nchanged] = strdup(id))) {
        want_full_reload(L);
        return;
    }
    L->nchanged++;
}

static void listen_open(loop *L)
{
    char b[512];
    PGresult *res;

    if (svc_now_ms() < L->listen_retry_at)
        return;
    /* dbpool's settings: keepalives notice a vanished server. */
    L->listen = dbpool_connect(L->app->cfg.conninfo, "event-processor-listen", b, sizeof(b));
    if (!L->listen) {
        b[strcspn(b, "\n")] = '\0';
        loop_error(L, "LISTEN connection failed", b);
        listen_close(L);
        L->listen_retry_at = svc_now_ms() + backoff_next_ms(&L->lb);
        return;
    }
    res = PQexec(L->listen, "LISTEN new_event; LISTEN trigger_changed");
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        loop_error(L, "LISTEN failed", PQerrorMessage(L->listen));
        PQclear(res);
        listen_close(L);
        L->listen_retry_at = svc_now_ms() + backoff_next_ms(&L->lb);
        return;
    }
    PQclear(res);
    PQsetnonblocking(L->listen, 1);
    backoff_reset(&L->lb);
    atomic_store(&L->app->listen_ok, 1);
    L->last_err[0] = '\0';
    /* Whatever was notified while we were not listening is unknown: reload
     * the triggers and look at the queue. */
    want_full_reload(L);
    log_info("listening for new_event and trigger_changed");
}

/* Consumes what the LISTEN connection has. Returns the number of
 * notifications seen; sets triggers_dirty on trigger_changed; closes the
 * connection when it broke. */
static int listen_drain(loop *L)
{
    PGnotify *n;
    int count = 0;

    if (!L->listen)
        return 0;
    if (!PQconsumeInput(L->listen) || PQstatus(L->listen) != CONNECTION_OK) {
        loop_error(L, "LISTEN connection lost", PQerrorMessage(L->listen));
        listen_close(L);
        L->listen_retry_at = svc_now_ms() + backoff_next_ms(&L->lb);
        L->notified = 1; /* look at the queue: we may have missed wake-ups */
        return 1;
    }
    while ((n = PQnotifies(L->listen))) {
        if (!strcmp(n->relname, "trigger_changed"))
            trigger_changed(L, n->extra);
        count++;
        PQfreemem(n);
    }
    L->notified += count;
    return count;
}

/* ------------------------------------------------------------------ */
/* Batches.                                                            */

/* The plan is pinned to index lookups whatever the statistics say: the
 * queue's head is found through its primary key (= ANY of an array rather
 * than IN, which the planner may turn into a hash join over the whole,
 * mostly dead, queue), and each event by its id (a LATERAL subquery with
 * OFFSET 0 is not flattened into a join, so it cannot become a sequential
 * scan of events when their statistics are stale). The first fetch of a
 * burst waits for rows locked by anyone else (a processor that lost its
 * lock mid-batch must finish or roll back before its events are taken
 * again, in order); the later ones pass over the rows of the batch the
 * other connection holds. */
#define FETCH_SQL(lock)                                                                                       \
    "WITH q AS (DELETE FROM event_queue WHERE seq = ANY (ARRAY("                                              \
    "SELECT seq FROM event_queue ORDER BY seq LIMIT $1 " lock ")) RETURNING seq, event_id) "                  \
    "SELECT q.seq, e.* FROM q CROSS JOIN LATERAL (SELECT " EVENT_MODEL_SELECT                                 \
    " FROM events e WHERE e.id = q.event_id OFFSET 0) e ORDER BY q.seq"
static const char fetch_first_sql[] = FETCH_SQL("FOR UPDATE");
static const char fetch_next_sql[] = FETCH_SQL("FOR UPDATE SKIP LOCKED");

static void batch_key(char *out, size_t len, const char *id, const char *usec)
{
    snprintf(out, len, "ep:batch:%s:%s", id, usec);
}

static int exec_ok(PGresult *res, ExecStatusType want, char *err, size_t errlen, PGconn *conn)
{
    if (PQresultStatus(res) == want)
        return 0;
    snprintf(err, errlen, "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
    err[strcspn(err, "\n")] = '\0';
    return -1;
}

static int exec_cmd(PGconn *conn, const char *sql, char *err, size_t errlen)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) ? 0 : -1;

    if (rc < 0) {
        snprintf(err, errlen, "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        err[strcspn(err, "\n")] = '\0';
    }
    PQclear(res);
    return rc;
}

static void bev_clear(bev *b)
{
    cJSON_Delete(b->ev);
    free(b->json);
    free(b->id_esc);
    free(b->type_esc);
    memset(b, 0, sizeof(*b));
}

/* The parts of the event the jobs need, built on its first match from
 * its row in `res`. */
static int bev_prepare(bev *b, const evrow_cols *cols, const PGresult *res, jobs_event *je)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(b->ev, "id");
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(b->ev, "event_type");
    int64_t agent;

    if (!b->json) {
        b->json = evrow_json(cols, res, b->row, &b->json_len);
        b->id_esc = jsonstr_dup(cJSON_IsString(id) ? id->valuestring : "");
        b->type_esc = jsonstr_dup(cJSON_IsString(ty) ? ty->valuestring : "");
        if (event_model_get_i64(b->ev, "agent_id", &agent) == 0)
            snprintf(b->agent, sizeof(b->agent), "%lld", (long long)agent);
        else
            snprintf(b->agent, sizeof(b->agent), "null");
        if (!b->json || !b->id_esc || !b->type_esc)
            return -1;
    }
    je->id = cJSON_IsString(id) ? id->valuestring : "";
    je->id_esc = b->id_esc;
    je->json = b->json;
    je->json_len = b->json_len;
    je->type_esc = b->type_esc;
    je->agent = b->agent;
    return 0;
}

/* Caches `t`'s state for the rest of the burst (read by the next
 * load_states). */
static int stateful_add(loop *L, tindex_trigger *t)
{
    if (t->need_state)
        return 0;
    if (L->nstateful == L->capstateful) {
        int cap = L->capstateful ? L->capstateful * 2 : 16;
        tindex_trigger **p = realloc(L->stateful, (size_t)cap * sizeof(*p));

        if (!p)
            return -1;
        L->stateful = p;
        L->capstateful = cap;
    }
    t->need_state = 1;
    L->stateful[L->nstateful++] = t;
    return 0;
}

/* Forgets the cached states: at the end of a burst (another processor may
 * change them before the next), on a failure, and before the index they
 * live in is replaced. */
static void stateful_reset(loop *L)
{
    for (int i = 0; i < L->nstateful; i++) {
        tindex_trigger *t = L->stateful[i];

        trigger_model_state_free(t->state);
        t->state = NULL;
        t->need_state = 0;
        t->state_dirty = 0;
    }
    L->nstateful = 0;
    L->first_unloaded = 0;
}

/* Reads the states of the triggers cached since the last load. No row
 * lock is needed: the session lock keeps every other processor out, and a
 * state this burst changed is already cached (so never read while its
 * update is uncommitted). `conn` is in plain mode. */
static int load_states(loop *L, PGconn *conn, char *err, size_t errlen)
{
    buf arr;
    const char *p[1];
    PGresult *res;
    int rc = -1;

    buf_init(&arr, (size_t)1 << 30);
    if (buf_append(&arr, "{", 1) < 0)
        goto oom;
    for (int i = L->first_unloaded; i < L->nstateful; i++)
        if (pgarr_add(&arr, L->stateful[i]->id, 0) < 0)
            goto oom;
    if (buf_append(&arr, "}", 1) < 0 || arr.truncated)
        goto oom;
    p[0] = buf_str(&arr);
    res = PQexecParams(conn, "SELECT trigger_id, state_data::text FROM trigger_state WHERE trigger_id = ANY($1::text[])",
                       1, NULL, p, NULL, NULL, 0);
    if (exec_ok(res, PGRES_TUPLES_OK, err, errlen, conn) == 0) {
        for (int r = 0; r < PQntuples(res); r++) {
            tindex_trigger *t = tindex_find(L->app->index, PQgetvalue(res, r, 0));

            if (t && t->need_state) {
                cJSON *stored = cJSON_Parse(PQgetvalue(res, r, 1));

                trigger_model_state_free(t->state);
                t->state = trigger_model_state_new(t->m, stored);
                cJSON_Delete(stored);
                if (!t->state) {
                    PQclear(res);
                    goto oom;
                }
            }
        }
        L->first_unloaded = L->nstateful;
        rc = 0;
    }
    PQclear(res);
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
out:
    buf_free(&arr);
    return rc;
}

/* The states this batch changed as one JSON object {trigger_id: state},
 * or NULL in *text when none did (or on OOM: returns -1). Clears the
 * dirty marks: the text is what the batch's transaction writes. */
static int dirty_states(loop *L, char **text)
{
    buf out;
    int n = 0, rc = 0;

    *text = NULL;
    buf_init(&out, (size_t)1 << 30);
    for (int i = 0; i < L->nstateful; i++) {
        tindex_trigger *t = L->stateful[i];
        size_t sl = 0;
        char *st;

        if (!t->state_dirty || !t->state)
            continue;
        t->state_dirty = 0;
        if (rc < 0)
            continue;
        if (!(st = trigger_model_state_text(t->state, &sl)) || buf_append_all(&out, n ? ",\"" : "{\"", 2) < 0 ||
            buf_append_all(&out, t->id_esc, strlen(t->id_esc)) < 0 || buf_append_all(&out, "\":", 2) < 0 ||
            buf_append_all(&out, st, sl) < 0)
            rc = -1;
        free(st);
        n++;
    }
    if (rc == 0 && n && (buf_append_all(&out, "}", 1) < 0 || !(*text = buf_take(&out))))
        rc = -1;
    buf_free(&out);
    return rc;
}

static int ensure_evs(loop *L, int n)
{
    if (n <= L->evcap)
        return 0;
    bev *p = realloc(L->evs, (size_t)n * sizeof(*p));

    if (!p)
        return -1;
    memset(p + L->evcap, 0, (size_t)(n - L->evcap) * sizeof(*p));
    L->evs = p;
    L->evcap = n;
    return 0;
}

/* Reads whatever the other connection has sent so far, so that a large
 * result does not stall its server process on a full socket. */
static void poke(PGconn *other)
{
    if (other)
        PQconsumeInput(other);
}

/* Matches the events of `res` against the index, filling L->jobs. States
 * not cached yet are read over `conn` (plain mode). Returns the number of
 * matches or -1. */
static long match_events(loop *L, PGconn *conn, PGconn *other, PGresult *res, int n, char *err, size_t errlen)
{
    ep *app = L->app;
    long matches = 0;
    char now[32];
    int64_t now_s = (int64_t)time(NULL);
    evrow_cols cols;

    fmt_rfc3339(now, sizeof(now), NULL, 6);
    evrow_cols_init(&cols, res);
    jobs_clear(L->jobs); /* a batch's jobs are its own, whatever failed before */
    if (ensure_evs(L, n) < 0)
        goto oom;
    /* Pass 1: events and their candidate triggers; the stateful ones
     * among them need their state cached. */
    for (int i = 0; i < n; i++) {
        bev *b = &L->evs[i];
        int64_t chain, agent;
        const cJSON *reg, *ty;
        int has_agent;

        b->row = i;
        if (!(b->ev = evrow_match_obj(&cols, res, i)))
            goto oom;
        reg = cJSON_GetObjectItemCaseSensitive(b->ev, "registry");
        ty = cJSON_GetObjectItemCaseSensitive(b->ev, "event_type");
        if (event_model_get_i64(b->ev, "chain_id", &chain) < 0 || !cJSON_IsString(reg))
            continue;
        has_agent = event_model_get_i64(b->ev, "agent_id", &agent) == 0;
        b->nlists = tindex_candidates(app->index, chain, reg->valuestring, has_agent, agent, b->lists, b->lens);
        for (int l = 0; l < b->nlists; l++)
            for (int k = 0; k < b->lens[l]; k++) {
                tindex_trigger *t = b->lists[l][k];
                const char *et = trigger_model_matcher_event_type(t->m);

                if (et && (!cJSON_IsString(ty) || strcmp(et, ty->valuestring)))
                    continue;
                if (trigger_model_matcher_stateful(t->m) && stateful_add(L, t) < 0)
                    goto oom;
            }
    }
    if (L->first_unloaded < L->nstateful && load_states(L, conn, err, errlen) < 0)
        return -1;
    /* Pass 2: in queue order, so each trigger's state sees its events in
     * the order they were committed to the queue. */
    for (int i = 0; i < n; i++) {
        bev *b = &L->evs[i];
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(b->ev, "event_type");

        if ((i & 255) == 255)
            poke(other);
        for (int l = 0; l < b->nlists; l++)
            for (int k = 0; k < b->lens[l]; k++) {
                tindex_trigger *t = b->lists[l][k];
                const char *et = trigger_model_matcher_event_type(t->m);
                jobs_event je;
                int r, changed = 0;

                if (et && (!cJSON_IsString(ty) || strcmp(et, ty->valuestring)))
                    continue;
                /* A trigger without a stored state starts a fresh one; the
                 * state is changed in place (never copied per event). */
                if (trigger_model_matcher_stateful(t->m) && !t->state &&
                    !(t->state = trigger_model_state_new(t->m, NULL)))
                    goto oom;
                r = trigger_model_match(t->m, b->ev, t->state, &changed, now_s);
                if (r < 0)
                    goto oom;
                if (changed)
                    t->state_dirty = 1;
                if (r != 1)
                    continue;
                matches++;
                if (bev_prepare(b, &cols, res, &je) < 0)
                    goto oom;
                for (int a = 0; a < t->naction; a++)
                    if (jobs_add(L->jobs, t, &t->actions[a], &je, now, a == 0) < 0)
                        goto oom;
            }
    }
    for (int i = 0; i < n; i++)
        bev_clear(&L->evs[i]);
    return matches;
oom:
    for (int i = 0; i < n && i < L->evcap; i++)
        bev_clear(&L->evs[i]);
    snprintf(err, errlen, "out of memory");
    return -1;
}

static void push_failed(loop *L, const char *err)
{
    loop_error(L, "cannot push jobs to Redis; they stay in the outbox", err);
    L->outbox_dirty = 1;
    L->redis_failing = 1;
    L->pushed_since_fail = 0;
}

/* Takes the outbox ids the pusher has pushed (their rows are deleted by the
 * next commit) and its failures. A push that went through after a failed
 * one ends the outage: it is logged, and the error is forgotten so that
 * the next outage is logged too, even with the same text. */
static void collect_pushed(loop *L)
{
    char perr[512];
    int before = L->npending;

    if (pusher_collect(L->P, L->pending_del, &L->npending, MAX_PENDING_DEL, perr, sizeof(perr))) {
        push_failed(L, perr);
    } else if (L->npending > before) {
        L->pushed_since_fail = 1;
        if (L->redis_failing) {
            L->redis_failing = 0;
            L->last_err[0] = '\0';
            log_info("pushing jobs to Redis again");
        }
    }
}

/* ------------------------------------------------------------------ */
/* Work connections in pipeline mode.                                 */

static void slot_seterr(slot *s, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s", PQerrorMessage(s->conn));
    err[strcspn(err, "\n")] = '\0';
}

/* Switches the connection in or out of pipeline mode (out: nothing may be
 * awaited). */
static int slot_mode(slot *s, int pipeline, char *err, size_t errlen)
{
    int on = PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF;

    if (on == pipeline)
        return 0;
    if ((pipeline ? PQenterPipelineMode(s->conn) : PQexitPipelineMode(s->conn)) != 1) {
        slot_seterr(s, err, errlen);
        return -1;
    }
    return 0;
}

static int slot_send(slot *s, int kind, const char *sql, int nparams, const char *const *params, char *err,
                     size_t errlen)
{
    if (s->qlen + 2 > SLOT_QMAX) {
        snprintf(err, errlen, "internal: pipeline queue full");
        return -1;
    }
    if (slot_mode(s, 1, err, errlen) < 0)
        return -1;
    if (!PQsendQueryParams(s->conn, sql, nparams, NULL, params, NULL, NULL, 0)) {
        slot_seterr(s, err, errlen);
        return -1;
    }
    s->q[(s->qhead + s->qlen++) % SLOT_QMAX] = kind;
    return 0;
}

static int slot_sync(slot *s, char *err, size_t errlen)
{
    if (PQpipelineSync(s->conn) != 1 || PQflush(s->conn) != 0) {
        slot_seterr(s, err, errlen);
        return -1;
    }
    s->q[(s->qhead + s->qlen++) % SLOT_QMAX] = Q_SYNC;
    return 0;
}

/* Deletes the outbox rows whose jobs the pusher has pushed ($1: their ids
 * as a bigint[] literal, from pending_ids). */
static const char delete_pushed_sql[] = "DELETE FROM job_outbox WHERE id = ANY($1::bigint[])";
#define PENDING_IDS_LEN (8 + MAX_PENDING_DEL * 22)

/* L->pending_del as an array literal in `out` (PENDING_IDS_LEN bytes). */
static const char *pending_ids(const loop *L, char out[PENDING_IDS_LEN])
{
    size_t off = 0;

    for (int i = 0; i < L->npending; i++)
        off += (size_t)snprintf(out + off, PENDING_IDS_LEN - off, "%c%lld", i ? ',' : '{', L->pending_del[i]);
    snprintf(out + off, PENDING_IDS_LEN - off, "}");
    return out;
}

/* Queues BEGIN and the fetch of the next batch. */
static int slot_send_fetch(loop *L, slot *s, int first, char *err, size_t errlen)
{
    char lim[16];
    const char *p[1] = {lim};

    snprintf(lim, sizeof(lim), "%d", L->app->cfg.batch_size);
    if (slot_send(s, Q_BEGIN, "BEGIN", 0, NULL, err, errlen) < 0 ||
        slot_send(s, Q_FETCH, first ? fetch_first_sql : fetch_next_sql, 1, p, err, errlen) < 0 ||
        slot_sync(s, err, errlen) < 0)
        return -1;
    /* A wake-up read from now on may be for an event this fetch misses. */
    L->notified = 0;
    return 0;
}

/* Queues the end of the batch `s` holds: deletion of the outbox rows
 * pushed so far, the changed states, the outbox row of L->jobs (which
 * becomes the slot's), COMMIT. */
static int slot_send_commit(loop *L, slot *s, long matches, char *err, size_t errlen)
{
    char ids[PENDING_IDS_LEN], *states = NULL;
    const char *p[3];
    jobs *tmp;
    int rc = -1;

    collect_pushed(L);
    if (L->npending) {
        p[0] = pending_ids(L, ids);
        /* A failed commit leaves them to the outbox flush that follows. */
        L->npending = 0;
        if (slot_send(s, Q_DEL, delete_pushed_sql, 1, p, err, errlen) < 0)
            goto out;
    }
    if (dirty_states(L, &states) < 0)
        goto oom;
    if (states) {
        p[0] = states;
        if (slot_send(s, Q_STATE,
                      "INSERT INTO trigger_state (trigger_id, state_data, last_updated) "
                      "SELECT key, value, now() FROM jsonb_each($1::jsonb) "
                      "ON CONFLICT (trigger_id) DO UPDATE SET state_data = EXCLUDED.state_data, "
                      "last_updated = EXCLUDED.last_updated",
                      1, p, err, errlen) < 0)
            goto out;
    }
    if (jobs_count(L->jobs)) {
        if (jobs_outbox_arrays(L->jobs, &p[0], &p[1], &p[2]) < 0)
            goto oom;
        if (slot_send(s, Q_OUTBOX,
                      "INSERT INTO job_outbox (event_ids, trigger_ids, action_ids) "
                      "VALUES ($1::text[], $2::text[], $3::int[]) RETURNING id, " OUTBOX_USEC,
                      3, p, err, errlen) < 0)
            goto out;
    }
    if (slot_send(s, Q_COMMIT, "COMMIT", 0, NULL, err, errlen) < 0 || slot_sync(s, err, errlen) < 0)
        goto out;
    tmp = s->cj;
    s->cj = L->jobs;
    L->jobs = tmp;
    jobs_clear(L->jobs);
    s->cn = s->n;
    s->cmatches = matches;
    s->outbox_id = 0;
    s->commit_queued = 1;
    PQclear(s->rows);
    s->rows = NULL;
    s->n = 0;
    rc = 0;
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
out:
    free(states);
    return rc;
}

/* Reads the answers up to the next sync point: the fetched rows, the
 * outbox row id, and whether everything succeeded. The first error is
 * reported; the answers after it are consumed (the server skips them). */
static int slot_read(slot *s, char *err, size_t errlen)
{
    int rc = 0;

    while (s->qlen) {
        int kind = s->q[s->qhead];
        PGresult *res = PQgetResult(s->conn);
        ExecStatusType st;

        /* libpq ends each query's answers with a NULL; one left over
         * from the previous answer (or a sync point) is skipped. */
        if (!res && PQstatus(s->conn) == CONNECTION_OK)
            res = PQgetResult(s->conn);
        if (!res) {
            if (!rc)
                slot_seterr(s, err, errlen);
            s->qlen = 0; /* the connection is unusable */
            return -1;
        }
        s->qhead = (s->qhead + 1) % SLOT_QMAX;
        s->qlen--;
        st = PQresultStatus(res);
        if (kind == Q_SYNC) {
            PQclear(res);
            if (st != PGRES_PIPELINE_SYNC && !rc) {
                snprintf(err, errlen, "internal: expected the end of a pipeline");
                rc = -1;
            }
            break;
        }
        if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
            if (!rc)
                exec_ok(res, PGRES_TUPLES_OK, err, errlen, s->conn);
            rc = -1;
        } else if (kind == Q_FETCH) {
            PQclear(s->rows);
            s->rows = res;
            s->n = PQntuples(res);
            res = NULL;
        } else if (kind == Q_OUTBOX) {
            s->outbox_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
            batch_key(s->key, sizeof(s->key), PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
        }
        PQclear(res);
        if ((res = PQgetResult(s->conn)) != NULL) { /* the end of this query's answers */
            PQclear(res);
            if (!rc)
                snprintf(err, errlen, "internal: more than one result for a pipelined query");
            rc = -1;
        }
    }
    return rc;
}

/* Reads the answer to the fetch queued on `s` (after its commit, if one is
 * queued before it: read that first). */
static int slot_read_fetch(loop *L, slot *s, char *err, size_t errlen)
{
    long long t = now_us();
    int rc = slot_read(s, err, errlen);

    L->ph[PH_FETCH] += now_us() - t;
    return rc;
}

/* Reads the answer to the commit queued on `s` and, when it succeeded,
 * hands its jobs to the pusher. */
static int slot_read_commit(loop *L, slot *s, char *err, size_t errlen)
{
    ep *app = L->app;
    long long t = now_us();
    int rc = slot_read(s, err, errlen);

    s->commit_queued = 0;
    L->ph[PH_COMMIT] += now_us() - t;
    if (rc < 0) {
        jobs_clear(s->cj);
        return -1;
    }
    if (s->cn)
        L->batches++;
    metrics_counter_add(app->m_processed, (uint64_t)s->cn);
    metrics_counter_add(app->m_matches, (uint64_t)s->cmatches);
    /* The batch is durable. Now its jobs go to Redis (on the pusher
     * thread); when that fails they wait in the outbox. */
    if (jobs_count(s->cj)) {
        t = now_us();
        pusher_submit(L->P, &s->cj, s->key, s->outbox_id);
        L->ph[PH_PUSH] += now_us() - t;
    }
    metrics_histogram_observe(app->m_batch, (double)(svc_now_ms() - s->t0) / 1000.0);
    return 0;
}

/* After a failure: consumes what is still awaited, leaves pipeline mode
 * and rolls back. A broken connection is left to the pool to replace. */
static void slot_abort(slot *s)
{
    char e[256];

    if (s->conn && PQstatus(s->conn) == CONNECTION_OK) {
        while (s->qlen && PQstatus(s->conn) == CONNECTION_OK)
            if (slot_read(s, e, sizeof(e)) < 0 && PQstatus(s->conn) != CONNECTION_OK)
                break;
        if (slot_mode(s, 0, e, sizeof(e)) == 0 && PQtransactionStatus(s->conn) != PQTRANS_IDLE)
            exec_cmd(s->conn, "ROLLBACK", e, sizeof(e));
    }
    s->qlen = 0;
    s->commit_queued = 0;
    PQclear(s->rows);
    s->rows = NULL;
    s->n = 0;
    jobs_clear(s->cj);
}

static const char outbox_sql[] =
    "SELECT o.id AS outbox_id, r.trigger_id AS ob_trigger_id, t.name AS ob_trigger_name, t.user_id AS ob_user_id, "
    "a.id AS ob_action_id, a.action_type AS ob_action_type, a.priority AS ob_priority, a.config::text AS ob_config, "
    EVENT_MODEL_SELECT " FROM job_outbox o "
    "CROSS JOIN LATERAL unnest(o.event_ids, o.trigger_ids, o.action_ids) WITH ORDINALITY AS r(event_id, trigger_id, "
    "action_id, ord) JOIN events e ON e.id = r.event_id JOIN triggers t ON t.id = r.trigger_id "
    "JOIN trigger_actions a ON a.id = r.action_id WHERE o.id = $1::bigint ORDER BY r.ord";

/* Pushes what an earlier run left in the outbox (crash between COMMIT and
 * push, or Redis down), one row at a time, rebuilding the jobs from their
 * references; each row is pushed under its own batch key, so a row whose
 * jobs already reached Redis is skipped. Returns 0 when the outbox is
 * empty, -1 on error. */
static int flush_outbox(loop *L, PGconn *conn, char *err, size_t errlen)
{
    ep *app = L->app;

    /* The Redis connection is the pusher's while it pushes. */
    pusher_wait_idle(L->P);
    collect_pushed(L);

    for (;;) {
        PGresult *ids = PQexec(conn, "SELECT id, " OUTBOX_USEC " FROM job_outbox ORDER BY id LIMIT 1"), *res;
        char now[32], prev[1024] = "", key[128], id[32];
        const char *p[1];
        evrow_cols cols;
        int pushed;

        if (exec_ok(ids, PGRES_TUPLES_OK, err, errlen, conn) < 0) {
            PQclear(ids);
            return -1;
        }
        if (PQntuples(ids) == 0) {
            PQclear(ids);
            return 0;
        }
        snprintf(id, sizeof(id), "%s", PQgetvalue(ids, 0, 0));
        batch_key(key, sizeof(key), id, PQgetvalue(ids, 0, 1));
        PQclear(ids);
        p[0] = id;
        res = PQexecParams(conn, outbox_sql, 1, NULL, p, NULL, NULL, 0);
        if (exec_ok(res, PGRES_TUPLES_OK, err, errlen, conn) < 0) {
            PQclear(res);
            return -1;
        }
        jobs_clear(L->jobs);
        fmt_rfc3339(now, sizeof(now), NULL, 6);
        evrow_cols_init(&cols, res);
        for (int r = 0; r < PQntuples(res); r++) {
            bev b = {.row = r};
            jobs_event je;
            char pair[1024];
            int rc;

            if (!(b.ev = evrow_match_obj(&cols, res, r)) || bev_prepare(&b, &cols, res, &je) < 0) {
                bev_clear(&b);
                PQclear(res);
                snprintf(err, errlen, "out of memory");
                return -1;
            }
            /* One Broadcast per match: with the first action of each
             * (trigger, event) pair. */
            snprintf(pair, sizeof(pair), "%s|%s", PQgetvalue(res, r, 1), je.id);
            rc = jobs_add_parts(L->jobs, PQgetvalue(res, r, 1), PQgetvalue(res, r, 2), PQgetvalue(res, r, 3),
                                (int)strtol(PQgetvalue(res, r, 4), NULL, 10), PQgetvalue(res, r, 5),
                                (int)strtol(PQgetvalue(res, r, 6), NULL, 10), PQgetvalue(res, r, 7), &je, now,
                                strcmp(pair, prev) != 0);
            snprintf(prev, sizeof(prev), "%s", pair);
            bev_clear(&b);
            if (rc < 0) {
                PQclear(res);
                snprintf(err, errlen, "out of memory");
                return -1;
            }
        }
        PQclear(res);
        pushed = jobs_push(L->jobs, app->push, app->cfg.queue, key, app->cfg.seen_ttl_s, err, errlen);
        if (pushed < 0) {
            jobs_clear(L->jobs); /* the row stays; its jobs must not join the next batch's */
            return -1;
        }
        metrics_counter_add(app->m_enqueued, (uint64_t)pushed);
        log_event(LOG_INFO, "outbox flushed", "\"outbox_id\":%s,\"jobs\":%d,\"enqueued\":%d", id,
                  jobs_count(L->jobs), pushed);
        jobs_clear(L->jobs);
        res = PQexecParams(conn, "DELETE FROM job_outbox WHERE id = $1::bigint", 1, NULL, p, NULL, NULL, 0);
        if (exec_ok(res, PGRES_COMMAND_OK, err, errlen, conn) < 0) {
            PQclear(res);
            return -1;
        }
        PQclear(res);
    }
}

/* The queue's length, at most once a second while a burst runs. */
static void update_lag(loop *L, PGconn *conn, int behind)
{
    PGresult *res;

    if (!behind) {
        metrics_gauge_set(L->app->m_lag, 0);
        return;
    }
    if (svc_now_ms() < L->lag_at)
        return;
    L->lag_at = svc_now_ms() + 1000;
    res = PQexec(conn, "SELECT count(*) FROM event_queue");
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        metrics_gauge_set(L->app->m_lag, strtod(PQgetvalue(res, 0, 0), NULL));
    PQclear(res);
}

/* tindex_update's drop: a trigger about to be replaced or removed leaves
 * the burst's cached states (its state goes with it; every state change
 * is committed before a reload, so the stored row is current). */
static void stateful_forget(void *ud, tindex_trigger *t)
{
    loop *L = ud;

    if (!t->need_state)
        return;
    for (int i = 0; i < L->nstateful; i++)
        if (L->stateful[i] == t) {
            memmove(L->stateful + i, L->stateful + i + 1, (size_t)(L->nstateful - i - 1) * sizeof(*L->stateful));
            L->nstateful--;
            if (i < L->first_unloaded)
                L->first_unloaded--;
            break;
        }
    t->need_state = 0;
}

/* Brings the index up to date: only the triggers trigger_changed named
 * when that is all that is known, else everything. Other triggers, and
 * their cached states, are left alone by the former. */
static int reload_triggers(loop *L, PGconn *conn, char *err, size_t errlen)
{
    tindex *ix;

    if (!L->triggers_full && L->app->index) {
        if (tindex_update(L->app->index, conn, (const char *const *)L->changed, L->nchanged, stateful_forget, L, err,
                          errlen) == 0) {
            metrics_counter_add(L->app->m_reload_changed, (uint64_t)L->nchanged);
            log_event(LOG_DEBUG, "triggers updated", "\"changed\":%d,\"count\":%d", L->nchanged,
                      tindex_count(L->app->index));
            changed_clear(L);
            L->triggers_dirty = 0;
            metrics_gauge_set(L->app->m_triggers, tindex_count(L->app->index));
            return 0;
        }
        loop_error(L, "cannot update the changed triggers; loading them all", err);
        want_full_reload(L);
    }
    if (!(ix = tindex_load(conn, err, errlen)))
        return -1;
    stateful_reset(L); /* the cached states live in the old index */
    tindex_free(L->app->index);
    L->app->index = ix;
    changed_clear(L);
    L->triggers_full = 0;
    L->triggers_dirty = 0;
    metrics_counter_inc(L->app->m_reload_full);
    metrics_gauge_set(L->app->m_triggers, tindex_count(ix));
    log_event(LOG_DEBUG, "triggers loaded", "\"count\":%d", tindex_count(ix));
    return 0;
}

/* Waits for a notification, the poll interval or a stop. */
static void wait_for_work(loop *L, long timeout_ms)
{
    struct pollfd fds[2];
    int nfds = 0;

    fds[nfds].fd = L->app->wake_fd;
    fds[nfds++].events = POLLIN;
    if (L->listen && PQsocket(L->listen) >= 0) {
        fds[nfds].fd = PQsocket(L->listen);
        fds[nfds++].events = POLLIN;
    }
    if (poll(fds, (nfds_t)nfds, (int)timeout_ms) < 0 && errno != EINTR)
        svc_sleep_ms(timeout_ms);
}

/* Takes the processors' session lock on `conn`, waiting while another
 * processor holds it (its burst ends when its queue is empty). The wait is
 * asynchronous so that a stop interrupts it. Returns 1 when held, 0 when
 * stopping, -1 on error.
 *
 * With the lock, in the same round trip (a second statement, so a snapshot
 * taken once the lock is ours), whether the outbox holds a row: a clean
 * session deletes its own rows before it unlocks, so a row here was left
 * by a holder that died between its COMMIT and its push (or by our own
 * failed session, already marked). A standby taking over from a killed
 * instance must push it now: the start-up flush is the dead one's, and it
 * may never start again. */
static int leader_lock(loop *L, PGconn *conn, char *err, size_t errlen)
{
    long long t = now_us();
    int rc = -1, nres = 0;

    if (!PQsendQuery(conn, "SELECT pg_advisory_lock(" EP_LOCK_KEY "); SELECT EXISTS (SELECT 1 FROM job_outbox)")) {
        snprintf(err, errlen, "%s", PQerrorMessage(conn));
        return -1;
    }
    while (PQisBusy(conn)) {
        struct pollfd fds[2] = {{.fd = PQsocket(conn), .events = POLLIN}, {.fd = L->app->wake_fd, .events = POLLIN}};

        if (svc_stopping()) {
            PGcancel *c = PQgetCancel(conn);
            char cerr[256];

            if (c) {
                PQcancel(c, cerr, sizeof(cerr));
                PQfreeCancel(c);
            }
            rc = 0;
            break;
        }
        if (poll(fds, 2, 200) < 0 && errno != EINTR)
            break;
        if (!PQconsumeInput(conn))
            break;
        listen_drain(L);
    }
    for (PGresult *res; (res = PQgetResult(conn)) != NULL; PQclear(res)) {
        if (nres++ == 0) {
            if (rc == -1 && exec_ok(res, PGRES_TUPLES_OK, err, errlen, conn) == 0)
                rc = 1;
        } else if (rc == 1 && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
                   PQgetvalue(res, 0, 0)[0] == 't' && !L->outbox_dirty) {
            log_event(LOG_INFO, "outbox left by another processor", "\"action\":\"flushing it first\"");
            L->outbox_dirty = 1;
        }
    }
    if (rc == -1 && !err[0])
        snprintf(err, errlen, "%s", PQerrorMessage(conn));
    if (rc == 0 && PQtransactionStatus(conn) == PQTRANS_IDLE)
        exec_cmd(conn, "SELECT pg_advisory_unlock_all()", err, errlen); /* the lock may have come first */
    L->ph[PH_LOCK] += now_us() - t;
    return rc;
}

/* Works through the queue while it holds the lock (on s[0]): batch after
 * batch until a fetch comes back short, with the two slots taking turns
 * (see the top of this file). Returns 0 when the queue was drained (or a
 * stop finished the batch in hand), -1 on error; the caller aborts the
 * slots then. */
static int burst(loop *L, slot s[2], char *err, size_t errlen)
{
    ep *app = L->app;
    slot *x = &s[0], *y = &s[1], *t;

    if (L->triggers_dirty && reload_triggers(L, x->conn, err, errlen) < 0)
        return -1;
    if (L->outbox_dirty) {
        if (flush_outbox(L, x->conn, err, errlen) < 0)
            loop_error(L, "cannot flush the outbox", err); /* Redis down: jobs wait in the outbox */
        else
            L->outbox_dirty = 0;
        err[0] = '\0';
        jobs_clear(L->jobs);
    }
    if (slot_send_fetch(L, x, 1, err, errlen) < 0 || slot_read_fetch(L, x, err, errlen) < 0)
        return -1;
    for (;;) {
        /* x holds a fetched batch; y may have the previous batch's commit
         * queued. */
        int more = x->n == app->cfg.batch_size && !svc_stopping();
        long matches = 0;
        long long tm;

        if (more && L->outbox_dirty && L->pushed_since_fail) {
            /* Redis is back: end the burst after this batch, so the next
             * one starts by flushing what failed to reach it, rather than
             * after the backlog. */
            more = 0;
            L->notified = 1;
        }

        listen_drain(L);
        if (L->triggers_dirty) {
            /* The previous batch must be durable before the states are
             * read again from the new index. */
            if ((y->commit_queued && slot_read_commit(L, y, err, errlen) < 0) || slot_mode(y, 0, err, errlen) < 0 ||
                reload_triggers(L, y->conn, err, errlen) < 0)
                return -1;
        }
        if (more && slot_send_fetch(L, y, 0, err, errlen) < 0)
            return -1;
        x->t0 = svc_now_ms();
        tm = now_us();
        if (x->n > 0) {
            if (slot_mode(x, 0, err, errlen) < 0)
                return -1;
            if (more)
                update_lag(L, x->conn, 1);
            if ((matches = match_events(L, x->conn, y->conn, x->rows, x->n, err, errlen)) < 0)
                return -1;
        }
        L->ph[PH_MATCH] += now_us() - tm;
        if (y->commit_queued && slot_read_commit(L, y, err, errlen) < 0)
            return -1;
        if (slot_send_commit(L, x, matches, err, errlen) < 0)
            return -1;
        if (!more)
            return slot_read_commit(L, x, err, errlen);
        if (slot_read_fetch(L, y, err, errlen) < 0)
            return -1;
        t = x;
        x = y;
        y = t;
    }
}

/* A session: the two work connections and the lock, held from the first
 * burst until the queue has been quiet for SESSION_IDLE_MS (a lock and
 * two connections per burst would cost two round trips per event when
 * events come one at a time). */
#define SESSION_IDLE_MS 50

static int session_open(loop *L)
{
    ep *app = L->app;
    char err[1024] = "";
    int locked;

    for (int i = 0; i < 2; i++)
        if (!L->s[i].conn && !(L->s[i].conn = dbpool_acquire(app->db, 2000))) {
            dbpool_errstr(app->db, err, sizeof(err));
            loop_error(L, "no database connection", err);
            return -1;
        }
    if ((locked = leader_lock(L, L->s[0].conn, err, sizeof(err))) < 0)
        loop_error(L, "cannot take the processors' lock", err);
    L->held = locked > 0;
    return locked;
}

/* Ends the session: `clean` after a successful burst (the pushed outbox
 * rows are deleted first), else after a failure. */
static void session_close(loop *L, int clean)
{
    ep *app = L->app;
    char err[1024];

    for (int i = 0; i < 2; i++)
        if (L->s[i].conn)
            slot_abort(&L->s[i]);
    /* The cached states are true only while the lock is held. */
    stateful_reset(L);
    if (clean && L->held) {
        pusher_wait_idle(L->P);
        collect_pushed(L);
        if (L->npending) {
            char ids[PENDING_IDS_LEN];
            const char *p[1] = {pending_ids(L, ids)};
            PGresult *res = PQexecParams(L->s[0].conn, delete_pushed_sql, 1, NULL, p, NULL, NULL, 0);

            if (exec_ok(res, PGRES_COMMAND_OK, err, sizeof(err), L->s[0].conn) == 0)
                L->npending = 0;
            PQclear(res);
        }
        update_lag(L, L->s[0].conn, 0);
    }
    if (L->held && L->s[0].conn && PQstatus(L->s[0].conn) == CONNECTION_OK)
        exec_cmd(L->s[0].conn, "SELECT pg_advisory_unlock(" EP_LOCK_KEY ")", err, sizeof(err));
    L->held = 0;
    for (int i = 0; i < 2; i++) {
        dbpool_release(app->db, L->s[i].conn);
        L->s[i].conn = NULL;
    }
}

/* One burst in the open session. Returns 0 or -1 (logged; the session is
 * closed). */
static int session_burst(loop *L)
{
    char err[1024] = "";

    if (burst(L, L->s, err, sizeof(err)) < 0) {
        loop_error(L, "batch failed", err);
        want_full_reload(L); /* e.g. a trigger deleted under us */
        L->outbox_dirty = 1;   /* the outbox rows to delete were not */
        session_close(L, 0);
        return -1;
    }
    /* Back in plain mode, outside any transaction, between bursts. */
    for (int i = 0; i < 2; i++)
        slot_abort(&L->s[i]);
    return 0;
}

void *ep_run(void *arg)
{
    ep *app = arg;
    loop L;
    backoff db_backoff;

    memset(&L, 0, sizeof(L));
    L.app = app;
    want_full_reload(&L);
    L.outbox_dirty = 1;
    backoff_init(&L.lb, 100, 5000);
    backoff_init(&db_backoff, 100, 5000);
    if (!(L.jobs = jobs_new()) || !(L.s[0].cj = jobs_new()) || !(L.s[1].cj = jobs_new()) ||
        !(L.P = pusher_start(app))) {
        log_error("cannot start: out of memory or threads");
        jobs_free(L.jobs);
        jobs_free(L.s[0].cj);
        jobs_free(L.s[1].cj);
        svc_request_stop();
        return NULL;
    }
    while (!svc_stopping()) {
        if (!deps_pgmig_done(app->pgmig)) {
            svc_sleep_ms(100);
            continue;
        }
        if (!L.listen)
            listen_open(&L);
        listen_drain(&L);
        L.notified = 0;
        if (!L.held) {
            int rc = session_open(&L);

            if (rc <= 0) {
                session_close(&L, 0);
                if (rc < 0)
                    svc_sleep_ms(backoff_next_ms(&db_backoff));
                continue;
            }
        }
        if (session_burst(&L) < 0) {
            svc_sleep_ms(backoff_next_ms(&db_backoff));
            continue;
        }
        backoff_reset(&db_backoff);
        if (svc_stopping())
            break;
        /* Events may have arrived while the last batch committed. */
        if (listen_drain(&L) > 0 || L.notified || L.triggers_dirty)
            continue;
        wait_for_work(&L, SESSION_IDLE_MS);
        if (listen_drain(&L) > 0 || L.notified || L.triggers_dirty)
            continue;
        /* Quiet: let other processors in, then sleep until woken. */
        session_close(&L, 1);
        wait_for_work(&L, L.listen ? app->cfg.poll_ms : (app->cfg.poll_ms < 200 ? app->cfg.poll_ms : 200));
    }
    if (L.held)
        session_close(&L, 1);
    /* The pusher finishes the push in hand; its outbox row is deleted at
     * the next start (the flush finds its batch key and skips it). */
    pusher_stop(L.P);
    listen_close(&L);
    {
        char b[256];
        size_t off = 0;

        for (int i = 0; i < PH_N; i++)
            off += (size_t)snprintf(b + off, sizeof(b) - off, "%s\"%s_ms\":%lld", i ? "," : "", ph_names[i],
                                    L.ph[i] / 1000);
        log_event(LOG_INFO, "phase totals", "%s,\"batches\":%lld", b, L.batches);
    }
    for (int i = 0; i < L.evcap; i++)
        bev_clear(&L.evs[i]);
    free(L.evs);
    free(L.stateful);
    changed_clear(&L);
    jobs_free(L.jobs);
    jobs_free(L.s[0].cj);
    jobs_free(L.s[1].cj);
    return NULL;
}
