/* proc: the processing loop of the event-processor. See
 * docs/event-processor.md for the protocol; in short, per batch and in one
 * transaction: take the oldest rows of event_queue (DELETE ... SKIP
 * LOCKED), match them against the trigger index, upsert trigger_state,
 * record the jobs in job_outbox, COMMIT; then push the jobs to Redis and
 * let the next transaction delete the outbox row. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "backoff.h"
#include "ep.h"
#include "event_model.h"
#include "evrow.h"
#include "jobs.h"
#include "log.h"
#include "migrate.h"
#include "svc.h"
#include "tindex.h"

/* The outbox row's creation time in microseconds: part of its Redis batch
 * key (jobs.h). */
#define OUTBOX_USEC "(extract(epoch FROM created_at) * 1000000)::bigint"

/* Outbox rows pushed but not yet deleted, deleted by the next transaction. */
#define MAX_PENDING_DEL 64
/* Serialises batches of several processors on one database: the order in
 * which events reach a trigger's state must be the queue order. */
#define EP_LOCK_KEY "8004000002"

enum { PH_FETCH, PH_MATCH, PH_STATE, PH_OUTBOX, PH_COMMIT, PH_PUSH, PH_N };
static const char *const ph_names[PH_N] = {"fetch", "match", "state", "outbox", "commit", "push"};

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

/* The Redis pusher thread: the processing thread hands it each committed
 * batch and goes on with the next one meanwhile, so PostgreSQL, the
 * matching and Redis work at the same time. One batch in flight at most:
 * handing over the next waits for the previous push (back-pressure). The
 * outbox ids it pushed are collected by the processing thread, which
 * deletes their rows in its next transaction; a failed push leaves its row
 * in the outbox and sets `failed`, and the processing thread flushes the
 * outbox (after waiting for the pusher to be idle: the Redis connection is
 * used by one thread at a time). */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ep *app;
    jobs *busy;  /* the batch being pushed, NULL when idle */
    jobs *spare; /* a free job buffer for the processing thread */
    char key[128];
    long long outbox_id;
    long long done[MAX_PENDING_DEL];
    int ndone;
    int failed;
    char err[512];
    int stop, started;
    pthread_t th;
} pusher;

typedef struct {
    ep *app;
    pusher *P;
    PGconn *listen;
    backoff lb;
    long long listen_retry_at;
    int triggers_dirty, outbox_dirty;
    long long pending_del[MAX_PENDING_DEL];
    int npending;
    jobs *jobs;
    bev *evs;
    int evcap;
    tindex_trigger **stateful; /* candidates needing state in this batch */
    int nstateful, capstateful;
    long long lag_at;
    int redis_failing;
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

int ep_db_check(void *ud)
{
    ep *app = ud;
    char err[512];
    int applied = 0;

    if (!atomic_load(&app->migrated)) {
        PGconn *conn = dbpool_acquire(app->db, 2000);
        int rc;

        if (!conn)
            return -1;
        rc = migrate_run(conn, app->cfg.migrations_dir, &applied, err, sizeof(err));
        dbpool_release(app->db, conn);
        if (rc < 0) {
            log_error("migrations failed: %s", err);
            return -1;
        }
        if (applied)
            log_event(LOG_INFO, "migrations applied", "\"count\":%d", applied);
        atomic_store(&app->migrated, 1);
    }
    return dbpool_ping(app->db, 2000);
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

static void listen_open(loop *L)
{
    const char *keys[] = {"dbname", "application_name", "connect_timeout", NULL};
    const char *vals[] = {L->app->cfg.conninfo, "event-processor-listen", "5", NULL};
    PGresult *res;

    if (svc_now_ms() < L->listen_retry_at)
        return;
    L->listen = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(L->listen) != CONNECTION_OK) {
        char b[512];

        snprintf(b, sizeof(b), "%s", PQerrorMessage(L->listen));
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
    L->triggers_dirty = 1;
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
        return 1; /* look at the queue: we may have missed wake-ups */
    }
    while ((n = PQnotifies(L->listen))) {
        if (!strcmp(n->relname, "trigger_changed"))
            L->triggers_dirty = 1;
        count++;
        PQfreemem(n);
    }
    return count;
}

/* ------------------------------------------------------------------ */
/* Pusher thread.                                                      */

static void *pusher_main(void *arg)
{
    pusher *P = arg;
    ep *app = P->app;

    pthread_mutex_lock(&P->mu);
    for (;;) {
        jobs *j;
        char key[128], err[512];
        long long id;
        int pushed;

        while (!P->busy && !P->stop)
            pthread_cond_wait(&P->cv, &P->mu);
        if (!P->busy)
            break;
        j = P->busy;
        id = P->outbox_id;
        snprintf(key, sizeof(key), "%s", P->key);
        pthread_mutex_unlock(&P->mu);
        pushed = jobs_push(j, app->push, app->cfg.queue, key, app->cfg.seen_ttl_s, err, sizeof(err));
        if (pushed >= 0)
            metrics_counter_add(app->m_enqueued, (uint64_t)pushed);
        jobs_clear(j);
        pthread_mutex_lock(&P->mu);
        if (pushed < 0) {
            P->failed = 1;
            snprintf(P->err, sizeof(P->err), "%s", err);
        } else if (P->ndone < MAX_PENDING_DEL) {
            P->done[P->ndone++] = id;
        } /* else: the row stays and a later outbox flush deletes it */
        P->spare = j;
        P->busy = NULL;
        pthread_cond_broadcast(&P->cv);
    }
    pthread_mutex_unlock(&P->mu);
    return NULL;
}

/* Hands the committed batch `*jp` (outbox row `id`, batch key `key`) to
 * the pusher and puts a free buffer in *jp. */
static void pusher_submit(pusher *P, jobs **jp, const char *key, long long id)
{
    pthread_mutex_lock(&P->mu);
    while (P->busy)
        pthread_cond_wait(&P->cv, &P->mu);
    P->busy = *jp;
    P->outbox_id = id;
    snprintf(P->key, sizeof(P->key), "%s", key);
    *jp = P->spare;
    P->spare = NULL;
    pthread_cond_broadcast(&P->cv);
    pthread_mutex_unlock(&P->mu);
}

/* Waits until no push is in flight. */
static void pusher_wait_idle(pusher *P)
{
    pthread_mutex_lock(&P->mu);
    while (P->busy)
        pthread_cond_wait(&P->cv, &P->mu);
    pthread_mutex_unlock(&P->mu);
}

/* Moves the pushed outbox ids into L's deletion list and reports a failed
 * push. Returns 1 when a push failed since the last call. */
static int pusher_collect(pusher *P, long long *ids, int *nids, int cap, char *err, size_t errlen)
{
    int failed;

    pthread_mutex_lock(&P->mu);
    while (P->ndone && *nids < cap)
        ids[(*nids)++] = P->done[--P->ndone];
    failed = P->failed;
    if (failed)
        snprintf(err, errlen, "%s", P->err);
    P->failed = 0;
    pthread_mutex_unlock(&P->mu);
    return failed;
}

/* ------------------------------------------------------------------ */
/* Batches.                                                            */

/* The plan is pinned to index lookups whatever the statistics say: the
 * queue's head is found through its primary key (= ANY of an array rather
 * than IN, which the planner may turn into a hash join over the whole,
 * mostly dead, queue), and each event by its id (a LATERAL subquery with
 * OFFSET 0 is not flattened into a join, so it cannot become a sequential
 * scan of events when their statistics are stale). */
static const char fetch_sql[] =
    "WITH q AS (DELETE FROM event_queue WHERE seq = ANY (ARRAY("
    "SELECT seq FROM event_queue ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED)) RETURNING seq, event_id) "
    "SELECT q.seq, e.* FROM q CROSS JOIN LATERAL (SELECT " EVENT_MODEL_SELECT
    " FROM events e WHERE e.id = q.event_id OFFSET 0) e ORDER BY q.seq";

static void batch_key(char *buf, size_t len, const char *id, const char *usec)
{
    snprintf(buf, len, "ep:batch:%s:%s", id, usec);
}

static int exec_ok(PGresult *res, ExecStatusType want, char *err, size_t errlen, PGconn *conn)
{
    if (PQresultStatus(res) == want)
        return 0;
    snprintf(err, errlen, "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
    err[strcspn(err, "\n")] = '\0';
    return -1;
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
        b->id_esc = tindex_json_escape(cJSON_IsString(id) ? id->valuestring : "");
        b->type_esc = tindex_json_escape(cJSON_IsString(ty) ? ty->valuestring : "");
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

static void stateful_reset(loop *L)
{
    for (int i = 0; i < L->nstateful; i++) {
        tindex_trigger *t = L->stateful[i];

        cJSON_Delete(t->state);
        t->state = NULL;
        t->need_state = 0;
        t->state_dirty = 0;
    }
    L->nstateful = 0;
}

/* Appends `s` quoted as a PostgreSQL array element. */
static int arr_add(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t need = strlen(s) * 2 + 4;

    if (*len + need + 2 > *cap) {
        size_t nc = *cap ? *cap : 256;
        char *p;

        while (nc < *len + need + 2)
            nc *= 2;
        if (!(p = realloc(*buf, nc)))
            return -1;
        *buf = p;
        *cap = nc;
    }
    if (*len == 0)
        (*buf)[(*len)++] = '{';
    else
        (*buf)[(*len)++] = ',';
    (*buf)[(*len)++] = '"';
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            (*buf)[(*len)++] = '\\';
        (*buf)[(*len)++] = *s;
    }
    (*buf)[(*len)++] = '"';
    (*buf)[*len] = '\0';
    return 0;
}

/* Loads state_data of the stateful candidates, locking their rows. */
static int load_states(loop *L, PGconn *conn, char *err, size_t errlen)
{
    char *arr = NULL;
    size_t len = 0, cap = 0;
    const char *p[1];
    PGresult *res;
    int rc = -1;

    for (int i = 0; i < L->nstateful; i++)
        if (arr_add(&arr, &len, &cap, L->stateful[i]->id) < 0) {
            snprintf(err, errlen, "out of memory");
            goto out;
        }
    arr[len++] = '}';
    arr[len] = '\0';
    p[0] = arr;
    res = PQexecParams(conn,
                       "SELECT trigger_id, state_data::text FROM trigger_state WHERE trigger_id = ANY($1::text[]) "
                       "ORDER BY trigger_id FOR UPDATE",
                       1, NULL, p, NULL, NULL, 0);
    if (exec_ok(res, PGRES_TUPLES_OK, err, errlen, conn) == 0) {
        for (int r = 0; r < PQntuples(res); r++) {
            tindex_trigger *t = tindex_find(L->app->index, PQgetvalue(res, r, 0));

            if (t && t->need_state) {
                cJSON_Delete(t->state);
                t->state = cJSON_Parse(PQgetvalue(res, r, 1));
            }
        }
        rc = 0;
    }
    PQclear(res);
out:
    free(arr);
    return rc;
}

static int save_states(loop *L, PGconn *conn, char *err, size_t errlen)
{
    cJSON *all = cJSON_CreateObject();
    char *text = NULL;
    const char *p[1];
    PGresult *res;
    int rc = -1, n = 0;

    if (!all)
        goto oom;
    for (int i = 0; i < L->nstateful; i++) {
        tindex_trigger *t = L->stateful[i];

        if (t->state_dirty && t->state) {
            cJSON_AddItemReferenceToObject(all, t->id, t->state);
            n++;
        }
    }
    if (!n) {
        cJSON_Delete(all);
        return 0;
    }
    if (!(text = cJSON_PrintUnformatted(all)))
        goto oom;
    p[0] = text;
    res = PQexecParams(conn,
                       "INSERT INTO trigger_state (trigger_id, state_data, last_updated) "
                       "SELECT key, value, now() FROM jsonb_each($1::jsonb) "
                       "ON CONFLICT (trigger_id) DO UPDATE SET state_data = EXCLUDED.state_data, "
                       "last_updated = EXCLUDED.last_updated",
                       1, NULL, p, NULL, NULL, 0);
    rc = exec_ok(res, PGRES_COMMAND_OK, err, errlen, conn);
    PQclear(res);
    cJSON_Delete(all);
    free(text);
    return rc;
oom:
    cJSON_Delete(all);
    snprintf(err, errlen, "out of memory");
    return -1;
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

/* Matches the events of `res` against the index, filling L->jobs. Returns
 * the number of matches or -1. */
static long match_events(loop *L, PGconn *conn, PGresult *res, int n, char *err, size_t errlen)
{
    ep *app = L->app;
    long matches = 0;
    char now[32];
    int64_t now_s = (int64_t)time(NULL);
    evrow_cols cols;

    jobs_now_rfc3339(now);
    evrow_cols_init(&cols, res);
    if (ensure_evs(L, n) < 0)
        goto oom;
    /* Pass 1: events and their candidate triggers; the stateful ones
     * among them need their state loaded. */
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
    if (L->nstateful && load_states(L, conn, err, errlen) < 0)
        return -1;
    /* Pass 2: in queue order, so each trigger's state sees its events in
     * the order they were committed to the queue. */
    for (int i = 0; i < n; i++) {
        bev *b = &L->evs[i];
        const cJSON *ty = cJSON_GetObjectItemCaseSensitive(b->ev, "event_type");

        for (int l = 0; l < b->nlists; l++)
            for (int k = 0; k < b->lens[l]; k++) {
                tindex_trigger *t = b->lists[l][k];
                const char *et = trigger_model_matcher_event_type(t->m);
                cJSON *st = NULL;
                jobs_event je;
                int r;

                if (et && (!cJSON_IsString(ty) || strcmp(et, ty->valuestring)))
                    continue;
                r = trigger_model_match(t->m, b->ev, t->state, &st, now_s);
                if (r < 0)
                    goto oom;
                if (st) {
                    cJSON_Delete(t->state);
                    t->state = st;
                    t->state_dirty = 1;
                }
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
    return matches;
oom:
    snprintf(err, errlen, "out of memory");
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

static void push_failed(loop *L, const char *err)
{
    loop_error(L, "cannot push jobs to Redis; they stay in the outbox", err);
    L->outbox_dirty = 1;
    L->redis_failing = 1;
}

/* Takes the outbox ids the pusher has pushed (their rows are deleted by the
 * next transaction) and its failures. */
static void collect_pushed(loop *L)
{
    char perr[512];
    int before = L->npending;

    if (pusher_collect(L->P, L->pending_del, &L->npending, MAX_PENDING_DEL, perr, sizeof(perr)))
        push_failed(L, perr);
    else if (L->npending > before && L->redis_failing && !L->outbox_dirty) {
        L->redis_failing = 0;
        L->last_err[0] = '\0';
    }
}

/* BEGIN plus the deletion of the outbox rows already pushed. */
static int begin_batch(loop *L, PGconn *conn, char *err, size_t errlen)
{
    char sql[256 + MAX_PENDING_DEL * 24];
    size_t off;

    /* synchronous_commit stays on: the Redis push after COMMIT is guarded
     * by the outbox row's id, so the row (and the consumed queue rows) must
     * be durable before its jobs are visible (docs/event-processor.md). */
    off = (size_t)snprintf(sql, sizeof(sql), "BEGIN; SELECT pg_advisory_xact_lock(" EP_LOCK_KEY ")");
    if (L->npending) {
        off += (size_t)snprintf(sql + off, sizeof(sql) - off, "; DELETE FROM job_outbox WHERE id IN (");
        for (int i = 0; i < L->npending && off < sizeof(sql); i++)
            off += (size_t)snprintf(sql + off, sizeof(sql) - off, "%s%lld", i ? "," : "", L->pending_del[i]);
        snprintf(sql + off, sizeof(sql) - off, ")");
    }
    return exec_cmd(conn, sql, err, errlen);
}

/* One batch. Returns the number of events taken (>= 0) or -1. */
static int run_batch(loop *L, PGconn *conn, char *err, size_t errlen)
{
    ep *app = L->app;
    char lim[16], key[128];
    const char *p[3];
    PGresult *res = NULL;
    long long t0 = svc_now_ms(), outbox_id = 0;
    long matches = 0;
    int n = 0, had_pending;
    long long tp = now_us(), tq;

    collect_pushed(L);
    had_pending = L->npending;

    jobs_clear(L->jobs);
    if (begin_batch(L, conn, err, errlen) < 0)
        goto fail;
    snprintf(lim, sizeof(lim), "%d", app->cfg.batch_size);
    p[0] = lim;
    res = PQexecParams(conn, fetch_sql, 1, NULL, p, NULL, NULL, 0);
    if (exec_ok(res, PGRES_TUPLES_OK, err, errlen, conn) < 0)
        goto fail;
    n = PQntuples(res);
    L->ph[PH_FETCH] += (tq = now_us()) - tp;
    tp = tq;
    if (n > 0) {
        if ((matches = match_events(L, conn, res, n, err, errlen)) < 0)
            goto fail;
        L->ph[PH_MATCH] += (tq = now_us()) - tp;
        tp = tq;
        if (save_states(L, conn, err, errlen) < 0)
            goto fail;
        L->ph[PH_STATE] += (tq = now_us()) - tp;
        tp = tq;
        if (jobs_count(L->jobs)) {
            PGresult *r2;

            if (jobs_outbox_arrays(L->jobs, &p[0], &p[1], &p[2]) < 0) {
                snprintf(err, errlen, "out of memory");
                goto fail;
            }
            r2 = PQexecParams(conn,
                              "INSERT INTO job_outbox (event_ids, trigger_ids, action_ids) "
                              "VALUES ($1::text[], $2::text[], $3::int[]) "
                              "RETURNING id, " OUTBOX_USEC,
                              3, NULL, p, NULL, NULL, 0);
            if (exec_ok(r2, PGRES_TUPLES_OK, err, errlen, conn) < 0) {
                PQclear(r2);
                goto fail;
            }
            outbox_id = strtoll(PQgetvalue(r2, 0, 0), NULL, 10);
            batch_key(key, sizeof(key), PQgetvalue(r2, 0, 0), PQgetvalue(r2, 0, 1));
            PQclear(r2);
        }
        L->ph[PH_OUTBOX] += (tq = now_us()) - tp;
        tp = tq;
    } else if (!had_pending) {
        /* Nothing taken and nothing to delete: no need to commit. */
        PQclear(res);
        exec_cmd(conn, "ROLLBACK", err, errlen);
        return 0;
    }
    if (exec_cmd(conn, "COMMIT", err, errlen) < 0)
        goto fail;
    PQclear(res);
    res = NULL;
    L->ph[PH_COMMIT] += (tq = now_us()) - tp;
    tp = tq;
    L->batches++;
    for (int i = 0; i < n; i++)
        bev_clear(&L->evs[i]);
    stateful_reset(L);
    L->npending = 0;
    metrics_counter_add(app->m_processed, (uint64_t)n);
    metrics_counter_add(app->m_matches, (uint64_t)matches);
    /* The batch is durable. Now the jobs go to Redis (on the pusher
     * thread); when that fails they wait in the outbox. */
    if (jobs_count(L->jobs))
        pusher_submit(L->P, &L->jobs, key, outbox_id);
    L->ph[PH_PUSH] += now_us() - tp;
    metrics_histogram_observe(app->m_batch, (double)(svc_now_ms() - t0) / 1000.0);
    return n;
fail:
    PQclear(res);
    for (int i = 0; i < n && i < L->evcap; i++)
        bev_clear(&L->evs[i]);
    stateful_reset(L);
    jobs_clear(L->jobs);
    if (PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) != PQTRANS_IDLE) {
        char e2[256];

        exec_cmd(conn, "ROLLBACK", e2, sizeof(e2));
    }
    return -1;
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
        jobs_now_rfc3339(now);
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
        if (pushed < 0)
            return -1;
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

static int reload_triggers(loop *L, PGconn *conn, char *err, size_t errlen)
{
    tindex *ix = tindex_load(conn, err, errlen);

    if (!ix)
        return -1;
    tindex_free(L->app->index);
    L->app->index = ix;
    L->triggers_dirty = 0;
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

void *ep_run(void *arg)
{
    ep *app = arg;
    loop L;
    backoff db_backoff;
    char err[1024];

    static pusher P;

    memset(&L, 0, sizeof(L));
    L.app = app;
    L.P = &P;
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.cv, NULL);
    P.app = app;
    L.triggers_dirty = 1;
    L.outbox_dirty = 1;
    backoff_init(&L.lb, 100, 5000);
    backoff_init(&db_backoff, 100, 5000);
    if (!(L.jobs = jobs_new()) || !(P.spare = jobs_new()) || pthread_create(&P.th, NULL, pusher_main, &P) != 0) {
        log_error("cannot start: out of memory or threads");
        jobs_free(L.jobs);
        jobs_free(P.spare);
        svc_request_stop();
        return NULL;
    }
    while (!svc_stopping()) {
        PGconn *conn;
        int n = 0, failed = 0;

        if (!atomic_load(&app->migrated)) {
            svc_sleep_ms(100);
            continue;
        }
        if (!L.listen)
            listen_open(&L);
        listen_drain(&L);
        if (!(conn = dbpool_acquire(app->db, 2000))) {
            svc_sleep_ms(backoff_next_ms(&db_backoff));
            continue;
        }
        if (L.triggers_dirty && reload_triggers(&L, conn, err, sizeof(err)) < 0) {
            loop_error(&L, "cannot load triggers", err);
            failed = 1;
        }
        if (!failed && L.outbox_dirty) {
            if (flush_outbox(&L, conn, err, sizeof(err)) < 0) {
                loop_error(&L, "cannot flush the outbox", err);
                /* Redis down: keep matching (jobs wait in the outbox). */
            } else {
                L.outbox_dirty = 0;
            }
        }
        while (!failed && !svc_stopping()) {
            n = run_batch(&L, conn, err, sizeof(err));
            if (n < 0) {
                loop_error(&L, "batch failed", err);
                L.triggers_dirty = 1; /* e.g. a trigger deleted under us */
                failed = 1;
                break;
            }
            if (n < app->cfg.batch_size)
                break;
            update_lag(&L, conn, 1);
            /* A trigger change notified meanwhile applies from the next
             * batch on. */
            listen_drain(&L);
            if (L.triggers_dirty && reload_triggers(&L, conn, err, sizeof(err)) < 0) {
                loop_error(&L, "cannot load triggers", err);
                failed = 1;
            }
        }
        if (!failed) {
            update_lag(&L, conn, 0);
            /* Idle: delete pushed outbox rows now rather than with the next
             * batch (which this is, if events arrived meanwhile). */
            pusher_wait_idle(&P);
            collect_pushed(&L);
            if (L.npending && !svc_stopping()) {
                n = run_batch(&L, conn, err, sizeof(err));
                if (n < 0) {
                    loop_error(&L, "batch failed", err);
                    failed = 1;
                } else if (n > 0) {
                    dbpool_release(app->db, conn);
                    continue;
                }
            }
        }
        dbpool_release(app->db, conn);
        if (failed) {
            svc_sleep_ms(backoff_next_ms(&db_backoff));
            continue;
        }
        backoff_reset(&db_backoff);
        if (svc_stopping())
            break;
        if (listen_drain(&L) > 0 || L.triggers_dirty)
            continue;
        wait_for_work(&L, L.listen ? app->cfg.poll_ms : (app->cfg.poll_ms < 200 ? app->cfg.poll_ms : 200));
    }
    /* Finish the push in hand; its outbox row is deleted at the next
     * start (the flush finds its batch key and skips it). */
    pthread_mutex_lock(&P.mu);
    P.stop = 1;
    pthread_cond_broadcast(&P.cv);
    pthread_mutex_unlock(&P.mu);
    pthread_join(P.th, NULL);
    jobs_free(P.spare);
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
    jobs_free(L.jobs);
    return NULL;
}
