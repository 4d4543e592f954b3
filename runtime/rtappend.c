/* rtappend: appends, one at a time or by group commit (see rtappend.h).
 * A group is one call of runtime.append_run_events; a single append one
 * call of runtime.append_run_event, whose row the group's rows repeat
 * after their `ord` column. */
#include "rtappend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fmt.h"
#include "log.h"
#include "svc.h"

const char RTAPPEND_ONE_SQL[] = "SELECT * FROM runtime.append_run_event($1, $2, $3::jsonb, $4, $5)";
const char RTAPPEND_GROUP_SQL[] = "SELECT * FROM runtime.append_run_events($1::jsonb)";
const char RTAPPEND_SET_SQL[] = "SELECT * FROM runtime.append_run_events_set($1::jsonb)";
/* append_run_event's row for a replay of key $2 on run $1, or no row. */
static const char RTAPPEND_REPLAYED_SQL[] =
    "SELECT 'replayed', r.last_seq, r.status, NULL, r.worker_id, r.metadata::text, runtime.ts(r.created_at), "
    "runtime.ts(r.updated_at) FROM runtime.runs r WHERE r.id = $1 AND EXISTS "
    "(SELECT 1 FROM runtime.run_events e WHERE e.run_id = $1 AND e.idempotency_key = $2)";

/* The common append in one statement: the UPDATE of the run row takes
 * its lock and its next sequence in one step (no SELECT ... FOR UPDATE
 * first), and the event goes in with that sequence. The key probe runs
 * on the statement's snapshot: a writer of the same key that commits
 * while this one waits for the run's lock is caught by the unique index
 * (an error, and the caller appends again through append_run_event). The
 * answer is a row only when it appended; no row (an unknown run, a key
 * already used, a run whose projector is behind its log) sends the append
 * through append_run_event, which tells those apart (and records the
 * drift). The answer's run columns come from the UPDATE's RETURNING: the
 * statement reads nothing twice, and a replay, rare, pays the second
 * statement. */
const char RTAPPEND_FAST_SQL[] =
    "WITH u AS (UPDATE runtime.runs x SET last_seq = x.last_seq + 1, event_count = x.event_count + 1, "
    "updated_at = now(), projected_seq = x.last_seq + 1, projected_event_type = $2, projected_at = now() "
    "WHERE x.id = $1 AND x.last_seq = x.projected_seq AND ($4::text IS NULL OR NOT EXISTS "
    "(SELECT 1 FROM runtime.run_events e WHERE e.run_id = $1 AND e.idempotency_key = $4)) "
    "RETURNING x.last_seq, x.status, x.worker_id, x.metadata, x.created_at, x.updated_at), "
    "i AS (INSERT INTO runtime.run_events (run_id, seq, event_type, payload, idempotency_key, recorded_at) "
    "SELECT $1, u.last_seq, $2, $3::jsonb, $4, u.updated_at FROM u RETURNING seq, payload) "
    "SELECT 'appended', i.seq, u.status, NULL, u.worker_id, u.metadata::text, runtime.ts(u.created_at), "
    "runtime.ts(u.updated_at), "
    "(SELECT runtime.khala_notify_message('run:' || $1 || ':events', i.seq, $2, i.payload, u.updated_at) "
    "WHERE EXISTS (SELECT 1 FROM runtime.khala_listeners l WHERE l.topic = 'run:' || $1 || ':events')) "
    "FROM u, i";

struct rt_append {
    const rt_req *q;
    rt_resp *a;
    cJSON *body;        /* owns the strings below but payload_text */
    const char *id, *type, *key;
    char *payload_text; /* canonical text of the payload ({} when absent) */
    char exp_text[FMT_I64_MAX];
    int has_expected;
    rt *r;
    char topic[64];     /* its Khala topic */
    long long rate_ms;  /* when its publish was counted (0: not counted, or settled by its outcome) */
    long retry_ms;      /* limited: the rate window's rest */
    int limited;        /* over the topic's publish rate, with a key that may be a replay */
};

/* Where append_run_event's row (outcome, seq, status, message, worker_id,
 * metadata, created_at, updated_at) holds the run's fields. */
static const rt_run_cols append_cols = {4, 2, 5, 1, 6, 7};

/* Prefer: return=minimal (RFC 7240) answers the run without its events:
 * the full answer grows with the log, which a client appending thousands
 * of events to one run may not want back each time. */
static int wants_minimal(const rt_req *q)
{
    const char *v = q->header(q, "Prefer");

    return v && strstr(v, "return=minimal") != NULL;
}

rt_append *rtappend_prepare(rt *r, const rt_req *q, rt_resp *a)
{
    rt_append *x = calloc(1, sizeof(*x));
    cJSON *type, *payload, *key, *expected;
    int pub;

    if (!x) {
        rt_error(a, 500, "internal", "out of memory");
        return NULL;
    }
    x->r = r;
    x->q = q;
    x->a = a;
    if (rt_writes_frozen(r, a) < 0 || rt_run_id_param(q, a, &x->id) < 0 || rt_body_object(q, &x->body, 0, a) < 0)
        goto fail;
    type = cJSON_GetObjectItemCaseSensitive(x->body, "event_type");
    payload = cJSON_GetObjectItemCaseSensitive(x->body, "payload");
    key = cJSON_GetObjectItemCaseSensitive(x->body, "idempotency_key");
    expected = cJSON_GetObjectItemCaseSensitive(x->body, "expected_previous_seq");
    if (!cJSON_IsString(type) || !type->valuestring[0] || strlen(type->valuestring) > 256) {
        rt_error(a, 400, "invalid_request", "event_type must be a non-empty string (at most 256 bytes)");
        goto fail;
    }
    if (key && !cJSON_IsNull(key) && (!cJSON_IsString(key) || strlen(key->valuestring) > 512)) {
        rt_error(a, 400, "invalid_request", "idempotency_key must be a string (at most 512 bytes)");
        goto fail;
    }
    if (expected && !cJSON_IsNull(expected) &&
        (!cJSON_IsNumber(expected) || expected->valuedouble < 0 || expected->valuedouble > 9e15 ||
         expected->valuedouble != (double)(long long)expected->valuedouble)) {
        rt_error(a, 400, "invalid_request", "expected_previous_seq must be a non-negative integer");
        goto fail;
    }
    /* The receipt hashes the payload inside the run's event list (2
     * levels down), canonically, and canonjson writes no deeper than
     * CANONJSON_MAX_DEPTH: a deeper payload was stored and then made the
     * run's receipt and replay answer 500 for good. */
    if (payload && canonjson_depth(payload) > RTAPPEND_PAYLOAD_MAX_DEPTH) {
        rt_error(a, 400, "invalid_request", "payload nests too deep");
        cJSON_AddNumberToObject(a->json, "max_depth", RTAPPEND_PAYLOAD_MAX_DEPTH);
        goto fail;
    }
    if (strcmp(type->valuestring, "run.finished") == 0 &&
        !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(payload, "status"))) {
        rt_error(a, 400, "invalid_request", "run.finished requires payload.status");
        goto fail;
    }
    x->payload_text = payload && !cJSON_IsNull(payload) ? cJSON_PrintUnformatted(payload) : strdup("{}");
    if (!x->payload_text) {
        rt_error(a, 500, "internal", "out of memory");
        goto fail;
    }
    snprintf(x->topic, sizeof(x->topic), "run:%s:events", x->id);
    rt_topic_canonical(x->topic);
    x->key = cJSON_IsString(key) ? key->valuestring : NULL;
    if ((pub = rt_publish_check(r, x->topic, strlen(x->payload_text), a, &x->rate_ms, &x->retry_ms)) > 0)
        goto fail;
    if (pub < 0 && !x->key) {
        rt_publish_refused(r, x->topic, x->retry_ms, a);
        goto fail;
    }
    x->limited = pub < 0;
    x->type = type->valuestring;
    if ((x->has_expected = cJSON_IsNumber(expected)))
        fmt_i64(x->exp_text, (long long)expected->valuedouble);
    return x;
fail:
    cJSON_Delete(x->body);
    free(x->payload_text);
    free(x);
    return NULL;
}

void rtappend_free(rt_append *x)
{
    if (!x)
        return;
    /* Freed with no outcome (refused 503, dropped, its connection broke):
     * its count goes back. One whose statement committed before the break
     * is then not counted, which a limit can afford. */
    if (x->rate_ms)
        rt_publish_give(x->r, x->topic, x->rate_ms);
    cJSON_Delete(x->body);
    free(x->payload_text);
    free(x);
}

int rtappend_common(const rt_append *x)
{
    return !x->has_expected && strcmp(x->type, "run.started") != 0 && strcmp(x->type, "run.cancel_requested") != 0 &&
           strcmp(x->type, "run.finished") != 0;
}

int rtappend_limited(const rt_append *x)
{
    return x->limited;
}

int rtappend_minimal(const rt_append *x)
{
    return wants_minimal(x->q);
}

const char *rtappend_run(const rt_append *x)
{
    return x->id;
}

const char *rtappend_key(const rt_append *x)
{
    return x->key;
}

void rtappend_params(const rt_append *x, const char *p[5])
{
    p[0] = x->id;
    p[1] = x->type;
    p[2] = x->payload_text;
    p[3] = x->key;
    p[4] = x->has_expected ? x->exp_text : NULL;
}

void rtappend_fail(rt_append *x)
{
    rt_db_unavailable(x->a);
}

void rtappend_answer(rt *r, rt_append *x, PGconn *c, const PGresult *res, int row, int b)
{
    const char *outcome = PQgetvalue(res, row, b);

    if (x->rate_ms && strcmp(outcome, "appended") != 0)
        rt_publish_give(r, x->topic, x->rate_ms);
    x->rate_ms = 0;
    if (strcmp(outcome, "appended") == 0 || strcmp(outcome, "replayed") == 0) {
        if (outcome[0] == 'a') {
            rt_count_append(r, x->type);
            metrics_counter_inc(r->published);
        } else {
            metrics_counter_inc(r->replays);
        }
        if (wants_minimal(x->q))
            rt_answer_minimal(x->a, 200, x->id, res, row, b, &append_cols);
        else
            rt_answer_run(x->a, c, x->id, 200);
    } else if (strcmp(outcome, "not_found") == 0) {
        rt_error(x->a, 404, "not_found", "run not found");
    } else if (strcmp(outcome, "conflict") == 0) {
        metrics_counter_inc(r->conflicts);
        rt_error(x->a, 409, "conflict", PQgetvalue(res, row, b + 3));
    } else {
        rt_error(x->a, 400, "invalid_request", PQgetvalue(res, row, b + 3));
    }
}

/* A common append through the one-statement path: 0 answered, -1 to run
 * through append_run_event (no row, or the server refused it). */
static int commit_fast(rt *r, rt_append *x, PGconn *c)
{
    const char *p[4] = {x->id, x->type, x->payload_text, x->key};
    char err[512];
    PGresult *res = dbpool_exec_prepared(c, "rt_append_fast", RTAPPEND_FAST_SQL, 4, p, err, sizeof(err));
    int rc = -1;

    if (res && PQntuples(res) == 1) {
        rtappend_answer(r, x, c, res, 0, 0);
        rc = 0;
    } else if (!res && PQstatus(c) != CONNECTION_OK) {
        rt_db_error(x->a, "appending", x->id, err);
        rc = 0;
    }
    PQclear(res);
    return rc;
}

static void commit_one(rt *r, rt_append *x, PGconn *c, int alone)
{
    const char *p[5] = {x->id, x->type, x->payload_text, x->key, x->has_expected ? x->exp_text : NULL};
    char err[512];
    PGresult *res;

    if (!alone && rtappend_common(x) && commit_fast(r, x, c) == 0)
        return;
    res = dbpool_exec_prepared(c, "rt_append", RTAPPEND_ONE_SQL, 5, p, err, sizeof(err));

    if (!res || PQntuples(res) != 1) {
        rt_db_error(x->a, "appending", x->id, res ? "no outcome" : err);
    } else {
        rtappend_answer(r, x, c, res, 0, 0);
    }
    PQclear(res);
}

char *rtappend_group_json(rt_append **v, int n, int with_ord)
{
    cJSON *arr = cJSON_CreateArray(), *o;
    char *text = NULL;
    int i;

    if (!arr)
        return NULL;
    for (i = 0; i < n; i++) {
        if (!(o = cJSON_CreateObject()))
            goto out;
        cJSON_AddItemToArray(arr, o);
        if ((with_ord && !cJSON_AddNumberToObject(o, "o", i + 1)) || !cJSON_AddStringToObject(o, "r", v[i]->id) || !cJSON_AddStringToObject(o, "t", v[i]->type) ||
            !cJSON_AddRawToObject(o, "p", v[i]->payload_text) ||
            (v[i]->key && !cJSON_AddStringToObject(o, "k", v[i]->key)) ||
            (v[i]->has_expected && !cJSON_AddStringToObject(o, "e", v[i]->exp_text)))
            goto out;
    }
    text = cJSON_PrintUnformatted(arr);
out:
    cJSON_Delete(arr);
    return text;
}

/* Returns 0 with every append answered (a failed group answers 503 when
 * its outcome is unknown), or -1 with none answered when the server
 * refused the group, which rolled it back: then each runs alone, so that
 * one bad append does not fail the others. */
static int commit_group(rt *r, rt_append **v, int n, PGconn *c)
{
    int set = rtappend_set_fits(v, n);
    char err[512], *text = rtappend_group_json(v, n, set);
    const char *p[1] = {text};
    PGresult *res = NULL;
    int i, ok = 0, seen[RTAPPEND_GROUP_MAX] = {0}, nretry = 0;
    rt_append *retry[RTAPPEND_GROUP_MAX];
    long k;

    if (!text)
        return -1;
    res = set ? dbpool_exec_prepared(c, "rt_append_set", RTAPPEND_SET_SQL, 1, p, err, sizeof(err))
              : dbpool_exec_prepared(c, "rt_append_group", RTAPPEND_GROUP_SQL, 1, p, err, sizeof(err));
    free(text);
    if (!res && PQstatus(c) == CONNECTION_OK) {
        log_warn("runtime: a group of %d appends was refused (each runs alone): %s", n, err);
        return -1;
    }
    if (res && PQntuples(res) == n) {
        for (i = 0, ok = 1; i < n && ok; i++) {
            k = strtol(PQgetvalue(res, i, 0), NULL, 10) - 1;
            ok = k >= 0 && k < n && !seen[k];
            if (ok)
                seen[k] = 1;
        }
    }
    if (!ok) {
        /* The connection broke, or the answer is not one row per append:
         * the group may have committed, so a retry could append twice. */
        log_warn("runtime: a group of %d appends failed: %s", n, res ? "not one row per append" : err);
        for (i = 0; i < n; i++)
            rt_db_unavailable(v[i]->a);
        PQclear(res);
        return 0;
    }
    for (i = 0; i < n; i++) {
        k = strtol(PQgetvalue(res, i, 0), NULL, 10) - 1;
        if (set && strcmp(PQgetvalue(res, i, 1), "retry") == 0)
            retry[nretry++] = v[k];
        else
            rtappend_answer(r, v[k], c, res, i, 1);
    }
    PQclear(res);
    /* The rows come in group order: a run's retried appends keep theirs. */
    for (i = 0; i < nretry; i++)
        commit_one(r, retry[i], c, 1);
    return 0;
}

int rtappend_set_fits(rt_append **v, int n)
{
    int i, j;

    for (i = 0; i < n; i++) {
        if (!rtappend_common(v[i]))
            return 0;
        for (j = i + 1; v[i]->key && j < n; j++)
            if (v[j]->key && strcmp(v[i]->key, v[j]->key) == 0 && strcasecmp(v[i]->id, v[j]->id) == 0)
                return 0;
    }
    return 1;
}

/* A keyed append over its topic's publish rate: a replay of its key is
 * answered as one (it publishes nothing, and a client retrying after a
 * lost answer must get its 200), anything else 429. */
static void commit_limited(rt *r, rt_append *x, PGconn *c)
{
    const char *p[2] = {x->id, x->key};
    char err[512];
    PGresult *res = dbpool_exec_prepared(c, "rt_append_replayed", RTAPPEND_REPLAYED_SQL, 2, p, err, sizeof(err));

    if (!res && PQstatus(c) != CONNECTION_OK)
        rt_db_error(x->a, "appending over the publish rate", x->id, err);
    else if (res && PQntuples(res) == 1)
        rtappend_answer(r, x, c, res, 0, 0);
    else
        rt_publish_refused(r, x->topic, x->retry_ms, x->a);
    PQclear(res);
}

void rtappend_commit(rt *r, rt_append **v, int n)
{
    PGconn *c;
    int i, m;

    if (n <= 0)
        return;
    if (!(c = rt_acquire(r, v[0]->a))) {
        /* rt_acquire logged why, answering the first. */
        for (i = 1; i < n; i++)
            rt_db_unavailable(v[i]->a);
        goto out;
    }
    for (i = m = 0; i < n; i++) {
        if (v[i]->limited) {
            commit_limited(r, v[i], c);
            rtappend_free(v[i]);
        } else {
            v[m++] = v[i];
        }
    }
    n = m; /* the limited ones are answered and freed */
    if (n == 0)
        goto release;
    if (n > 1 && n <= RTAPPEND_GROUP_MAX && commit_group(r, v, n, c) == 0) {
        metrics_counter_inc(r->append_commits);
    } else {
        for (i = 0; i < n; i++) {
            commit_one(r, v[i], c, n > 1);
            metrics_counter_inc(r->append_commits);
        }
    }
release:
    dbpool_release(r->db, c);
out:
    for (i = 0; i < n; i++)
        rtappend_free(v[i]);
}

void rt_h_run_append(rt *r, const rt_req *q, rt_resp *a)
{
    rt_append *x = rtappend_prepare(r, q, a);

    if (x)
        rtappend_commit(r, &x, 1);
}
