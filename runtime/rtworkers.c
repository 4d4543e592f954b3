/* rtworkers: workers, their owners, heartbeat and lifecycle (SPEC 6). Each
 * write is one call of a runtime.worker_* function (0014_runtime.sql): the
 * state machine, the lifecycle event, its projection and its Khala message
 * in one transaction. */
#include "rt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmt.h"
#include "jsonstr.h"
#include "log.h"
#include "randid.h"

#define RT_WORKER_ID_MAX 512
/* The most values a runtime.worker_* call takes between the owner and the
 * stale-after time (worker_register's). */
#define RT_WORKER_EXTRA_MAX 4

typedef struct {
    int has_uid;
    char uid[FMT_I64_MAX];
    const char *guest;
} owner;

static const char WORKER_SQL[] =
    "SELECT json_build_object('worker', json_build_object('worker_id', worker_id, 'owner', "
    "json_build_object('user_id', owner_user_id, 'guest_scope', owner_guest_scope), 'workspace_ref', workspace_ref, "
    "'codex_home_ref', codex_home_ref, 'adapter', adapter, 'status', status, 'latest_seq', latest_seq, 'metadata', "
    "metadata, 'started_at', runtime.ts(started_at), 'stopped_at', runtime.ts(stopped_at), 'last_heartbeat_at', "
    "runtime.ts(last_heartbeat_at), 'updated_at', runtime.ts(updated_at)), 'liveness', json_build_object("
    "'heartbeat_age_ms', CASE WHEN last_heartbeat_at IS NOT NULL THEN greatest(0, (extract(epoch FROM now() - "
    "last_heartbeat_at) * 1000)::bigint) END, 'heartbeat_stale_after_ms', $2::bigint, 'heartbeat_state', "
    "runtime.heartbeat_state(status, last_heartbeat_at, $2::bigint)))::text, "
    "runtime.worker_owner_matches(w, $3::bigint, $4) FROM runtime.workers w ";

/* Reads the owner from a JSON body or the query string: exactly one of
 * owner_user_id (a non-negative integer) and owner_guest_scope (a
 * non-blank string). Returns 0, or -1 with a 400 in `a`. */
static int owner_from(const cJSON *body, const rt_req *q, owner *o, rt_resp *a)
{
    const cJSON *uid = cJSON_GetObjectItemCaseSensitive(body, "owner_user_id");
    const cJSON *guest = cJSON_GetObjectItemCaseSensitive(body, "owner_guest_scope");
    const char *quid = body ? NULL : q->query(q, "owner_user_id");
    const char *qguest = body ? NULL : q->query(q, "owner_guest_scope");
    char *end;
    long long v = -1;

    memset(o, 0, sizeof(*o));
    if (cJSON_IsNumber(uid) && uid->valuedouble >= 0 && uid->valuedouble < 9e15 &&
        uid->valuedouble == floor(uid->valuedouble)) {
        v = (long long)uid->valuedouble;
    } else if (quid && *quid) {
        v = strtoll(quid, &end, 10);
        if (*end || v < 0)
            v = -1;
    } else if (uid && !cJSON_IsNull(uid)) {
        v = -2;
    }
    if (cJSON_IsString(guest))
        o->guest = guest->valuestring;
    else if (qguest)
        o->guest = qguest;
    if (o->guest && !o->guest[strspn(o->guest, " \t")])
        o->guest = NULL;
    if (v >= 0) {
        o->has_uid = 1;
        fmt_i64(o->uid, v);
    }
    if (v == -2 || (quid && *quid && v < 0) || o->has_uid == !!o->guest || (o->guest && strlen(o->guest) > 256)) {
        rt_error(a, 400, "invalid_request",
                 "worker owner is invalid: give exactly one of owner_user_id (integer) and owner_guest_scope");
        return -1;
    }
    return 0;
}

static int worker_id_param(const rt_req *q, rt_resp *a, const char **id)
{
    *id = q->param(q, "id");
    if (!*id || !**id || strlen(*id) > RT_WORKER_ID_MAX) {
        rt_error(a, 400, "invalid_request", "worker id is required (at most 512 bytes)");
        return -1;
    }
    return 0;
}

/* Answers {"worker": SNAPSHOT} for worker id, checking the owner:
 * 404 unknown, 403 another owner. */
static void answer_worker(rt *r, PGconn *c, const char *id, const owner *o, int status, rt_resp *a)
{
    char stale[FMT_I64_MAX], err[512], sql[sizeof(WORKER_SQL) + 40];
    const char *p[4];
    PGresult *res;

    fmt_i64(stale, r->cfg.heartbeat_stale_ms);
    p[0] = id;
    p[1] = stale;
    p[2] = o->has_uid ? o->uid : NULL;
    p[3] = o->guest;
    snprintf(sql, sizeof(sql), "%sWHERE worker_id = $1", WORKER_SQL);
    res = dbpool_exec(c, sql, 4, p, err, sizeof(err));
    if (!res) {
        rt_db_error(a, "reading a worker", id, err);
        return;
    }
    if (PQntuples(res) == 0) {
        rt_error(a, 404, "not_found", "worker not found");
    } else if (strcmp(PQgetvalue(res, 0, 1), "t") != 0) {
        rt_error(a, 403, "forbidden", "worker owner does not match");
    } else {
        a->status = status;
        a->json = cJSON_CreateObject();
        cJSON_AddItemToObject(a->json, "worker", cJSON_Parse(PQgetvalue(res, 0, 0)));
    }
    PQclear(res);
}

static const char *opt_string(const cJSON *body, const char *name, int *bad)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(body, name);

    if (!it || cJSON_IsNull(it))
        return NULL;
    if (!cJSON_IsString(it) || strlen(it->valuestring) > 4096) {
        *bad = 1;
        return NULL;
    }
    return it->valuestring;
}

/* Runs one runtime.worker_* call and maps its outcome; on "ok"-like
 * outcomes answers the worker snapshot with `status`. Every such call
 * takes the worker id, the owner's user id and guest scope, then the
 * nextra values of extra, then the heartbeat stale-after time. */
/* The longest payload of a worker message but the id's escaped text:
 * {"worker_id":"","status":"stopping","latest_seq":-9223372036854775808,
 * "heartbeat_state":"missing"} is 98 bytes. */
#define RT_WORKER_PAYLOAD_FIXED 98

static void worker_write(rt *r, const char *sql, const char *id, const owner *o, const char *const *extra, int nextra,
                         int status, rt_resp *a)
{
    char err[512], stale[FMT_I64_MAX], topic[RT_WORKER_ID_MAX + 32];
    const char *p[3 + RT_WORKER_EXTRA_MAX + 1];
    PGconn *c;
    PGresult *res = NULL;
    const char *outcome;
    long long rate_ms = 0;
    long retry_ms = 0;
    int pub;
    char *esc;

    /* Every write publishes on the worker's topic: its limits first. */
    snprintf(topic, sizeof(topic), "worker:%s:lifecycle", id);
    rt_topic_canonical(topic);
    if (!(esc = jsonstr_dup(id))) {
        rt_error(a, 500, "internal", "out of memory");
        return;
    }
    pub = rt_publish_check(r, topic, strlen(esc) + RT_WORKER_PAYLOAD_FIXED, a, &rate_ms, &retry_ms);
    free(esc);
    if (pub != 0) {
        if (pub < 0)
            rt_publish_refused(r, topic, retry_ms, a);
        return;
    }
    if (!(c = rt_acquire(r, a))) {
        rt_publish_give(r, topic, rate_ms);
        return;
    }
    fmt_i64(stale, r->cfg.heartbeat_stale_ms);
    p[0] = id;
    p[1] = o->has_uid ? o->uid : NULL;
    p[2] = o->guest;
    memcpy(p + 3, extra, (size_t)nextra * sizeof(*p));
    p[3 + nextra] = stale;
    res = dbpool_exec(c, sql, 3 + nextra + 1, p, err, sizeof(err));
    if (!res || PQntuples(res) != 1) {
        rt_db_error(a, "writing a worker", id, res ? "no outcome" : err);
        rt_publish_give(r, topic, rate_ms);
        goto out;
    }
    outcome = PQgetvalue(res, 0, 0);
    if (strcmp(outcome, "not_found") == 0 || strcmp(outcome, "forbidden") == 0 || strcmp(outcome, "invalid") == 0)
        rt_publish_give(r, topic, rate_ms);
    if (strcmp(outcome, "not_found") == 0) {
        rt_error(a, 404, "not_found", "worker not found");
    } else if (strcmp(outcome, "forbidden") == 0) {
        rt_error(a, 403, "forbidden", "worker owner does not match");
    } else if (strcmp(outcome, "invalid") == 0) {
        rt_error(a, 400, "invalid_request", "worker status transition is not allowed");
    } else {
        metrics_counter_inc(r->published);
        answer_worker(r, c, id, o, status, a);
    }
out:
    PQclear(res);
    dbpool_release(r->db, c);
}

static char *json_text(const cJSON *v, int *oom)
{
    char *s;

    if (!v || cJSON_IsNull(v))
        return NULL;
    if (!(s = cJSON_PrintUnformatted(v)))
        *oom = 1;
    return s;
}

void rt_h_worker_register(rt *r, const rt_req *q, rt_resp *a)
{
    cJSON *body = NULL;
    owner o;
    char gen[48];
    char *meta = NULL;
    const char *id, *p[RT_WORKER_EXTRA_MAX], *adapter;
    int bad = 0, oom = 0;

    if (rt_writes_frozen(r, a) < 0 || rt_body_object(q, &body, 1, a) < 0)
        return;
    if (owner_from(body, q, &o, a) < 0)
        goto out;
    id = opt_string(body, "worker_id", &bad);
    adapter = opt_string(body, "adapter", &bad);
    p[0] = opt_string(body, "workspace_ref", &bad);
    p[1] = opt_string(body, "codex_home_ref", &bad);
    meta = json_text(cJSON_GetObjectItemCaseSensitive(body, "metadata"), &oom);
    if (bad || (id && strlen(id) > RT_WORKER_ID_MAX) || oom) {
        rt_error(a, 400, "invalid_request",
                 "worker_id (at most 512 bytes), adapter, workspace_ref and codex_home_ref must be strings");
        goto out;
    }
    while (id && (*id == ' ' || *id == '\t'))
        id++;
    if (!id || !*id) {
        randid_uuid(gen, sizeof(gen), "codexw_");
        id = gen;
    }
    while (adapter && (*adapter == ' ' || *adapter == '\t'))
        adapter++;
    if (!meta && !(meta = strdup("{}"))) {
        rt_error(a, 500, "internal", "out of memory");
        goto out;
    }
    p[2] = adapter && *adapter ? adapter : "in_memory";
    p[3] = meta;
    worker_write(r, "SELECT runtime.worker_register($1, $2, $3, $4, $5, $6, $7::jsonb, $8)", id, &o, p, 4, 201, a);
out:
    free(meta);
    cJSON_Delete(body);
}

void rt_h_worker_get(rt *r, const rt_req *q, rt_resp *a)
{
    owner o;
    const char *id;
    PGconn *c;

    if (worker_id_param(q, a, &id) < 0 || owner_from(NULL, q, &o, a) < 0 || !(c = rt_acquire(r, a)))
        return;
    answer_worker(r, c, id, &o, 200, a);
    dbpool_release(r->db, c);
}

void rt_h_worker_heartbeat(rt *r, const rt_req *q, rt_resp *a)
{
    cJSON *body = NULL;
    owner o;
    char *patch = NULL;
    const char *id;
    int oom = 0;

    if (rt_writes_frozen(r, a) < 0 || worker_id_param(q, a, &id) < 0 || rt_body_object(q, &body, 0, a) < 0)
        return;
    if (owner_from(body, q, &o, a) < 0)
        goto out;
    patch = json_text(cJSON_GetObjectItemCaseSensitive(body, "metadata_patch"), &oom);
    if (oom) {
        rt_error(a, 500, "internal", "out of memory");
        goto out;
    }
    worker_write(r, "SELECT runtime.worker_heartbeat($1, $2, $3, $4::jsonb, $5)", id, &o, (const char *[]){patch}, 1,
                 200, a);
out:
    free(patch);
    cJSON_Delete(body);
}

void rt_h_worker_status(rt *r, const rt_req *q, rt_resp *a)
{
    static const char *const statuses[] = {"starting", "running", "stopping", "stopped", "failed", NULL};
    cJSON *body = NULL;
    const cJSON *st;
    owner o;
    const char *id, *p[2];
    int i, bad = 0;

    if (rt_writes_frozen(r, a) < 0 || worker_id_param(q, a, &id) < 0 || rt_body_object(q, &body, 0, a) < 0)
        return;
    if (owner_from(body, q, &o, a) < 0)
        goto out;
    st = cJSON_GetObjectItemCaseSensitive(body, "status");
    for (i = 0; statuses[i] && !(cJSON_IsString(st) && strcmp(st->valuestring, statuses[i]) == 0); i++)
        ;
    p[1] = opt_string(body, "reason", &bad);
    if (!statuses[i] || bad) {
        rt_error(a, 400, "invalid_request",
                 "status must be one of starting, running, stopping, stopped, failed; reason a string");
        goto out;
    }
    p[0] = statuses[i];
    worker_write(r, "SELECT runtime.worker_transition($1, $2, $3, $4, $5, $6)", id, &o, p, 2, 200, a);
out:
    cJSON_Delete(body);
}

void rt_h_worker_list(rt *r, const rt_req *q, rt_resp *a)
{
    owner o;
    char stale[FMT_I64_MAX], err[512], sql[sizeof(WORKER_SQL) + 200];
    const char *p[4];
    PGconn *c;
    PGresult *res;
    cJSON *list;
    int i;

    if (owner_from(NULL, q, &o, a) < 0 || !(c = rt_acquire(r, a)))
        return;
    fmt_i64(stale, r->cfg.heartbeat_stale_ms);
    p[0] = o.has_uid ? o.uid : NULL;
    p[1] = stale;
    p[2] = p[0];
    p[3] = o.guest;
    snprintf(sql, sizeof(sql),
             "%sWHERE CASE WHEN $1::bigint IS NOT NULL THEN owner_user_id = $1::bigint "
             "ELSE owner_user_id IS NULL AND owner_guest_scope = btrim($4) END ORDER BY worker_id LIMIT 1000",
             WORKER_SQL);
    res = dbpool_exec(c, sql, 4, p, err, sizeof(err));
    dbpool_release(r->db, c);
    if (!res) {
        rt_db_error(a, "listing workers", NULL, err);
        return;
    }
    a->status = 200;
    a->json = cJSON_CreateObject();
    list = cJSON_AddArrayToObject(a->json, "workers");
    for (i = 0; i < PQntuples(res); i++)
        cJSON_AddItemToArray(list, cJSON_Parse(PQgetvalue(res, i, 0)));
    PQclear(res);
}
