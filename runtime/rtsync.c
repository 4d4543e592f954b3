/* rtsync: the Khala poll route and the checks shared with the WebSocket
 * route: Origin policy, sync token, scopes, worker owner, cursor. */
#include "rt.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmt.h"
#include "log.h"
#include "rtroutes.h"
#include "rtsync.h"
#include "svc.h"

static void refusal(rt_resp *a, const synctoken_refusal *why)
{
    rt_error(a, why->status, why->error, why->message);
    cJSON_AddStringToObject(a->json, "reason_code", why->reason_code);
}

/* SPEC 6 Origin policy: a request without Origin passes; one with an
 * Origin outside the list is refused when the policy is on. */
static int origin_ok(rt *r, const rt_req *q, rt_resp *a)
{
    const char *o = q->header(q, "Origin");
    char norm[512];
    size_t n, i;

    if (!r->cfg.enforce_origin || !o)
        return 0;
    while (*o == ' ' || *o == '\t')
        o++;
    n = strlen(o);
    while (n && (o[n - 1] == ' ' || o[n - 1] == '\t' || o[n - 1] == '/'))
        n--;
    if (n == 0)
        return 0;
    if (n + 3 <= sizeof(norm)) {
        norm[0] = ',';
        for (i = 0; i < n; i++)
            norm[i + 1] = (char)tolower((unsigned char)o[i]);
        norm[n + 1] = ',';
        norm[n + 2] = '\0';
        if (strstr(r->cfg.allowed_origins, norm))
            return 0;
    }
    rt_error(a, 403, "forbidden_origin", "origin is not allowed");
    cJSON_AddStringToObject(a->json, "reason_code", "origin_not_allowed");
    return -1;
}

/* The owner check's waits on the loop thread (the WebSocket's accept),
 * where a read that stalls (a full pool, a connect, a lock) stalls every
 * connection of the process: past them the accept is refused 503 and its
 * client retries. A connection the pool must open first gets the acquire's
 * wait for its connect. */
#define RT_LOOP_ACQUIRE_MS 100
#define RT_LOOP_QUERY_MS 300

static const char OWNER_SQL[] =
    "SELECT runtime.worker_owner_matches(w, $2::bigint, $3) FROM runtime.workers w WHERE worker_id = $1";

/* A worker topic is readable by its owner only: the token's user id, or
 * for a token without one its org as the guest scope. An unknown worker
 * is refused the same way, so topics cannot be probed. On the loop
 * (`on_loop`) its waits are bounded. */
static int owner_ok(rt *r, const synctoken_principal *p, const char *worker_id, int on_loop, rt_resp *a)
{
    char uid[FMT_I64_MAX], err[512];
    const char *params[3];
    synctoken_refusal why;
    PGconn *c = on_loop ? rt_acquire_within(r, RT_LOOP_ACQUIRE_MS, a) : rt_acquire(r, a);
    PGresult *res;
    int ok;

    if (!c)
        return -1;
    if (p->has_user_id)
        fmt_i64(uid, p->user_id);
    params[0] = worker_id;
    params[1] = p->has_user_id ? uid : NULL;
    params[2] = p->has_user_id ? NULL : p->org_id;
    res = on_loop ? dbpool_exec_within(c, OWNER_SQL, 3, params, RT_LOOP_QUERY_MS, err, sizeof(err))
                  : dbpool_exec(c, OWNER_SQL, 3, params, err, sizeof(err));
    dbpool_release(r->db, c);
    if (!res) {
        rt_db_error(a, "checking a worker's owner", worker_id, err);
        return -1;
    }
    ok = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    if (!ok) {
        synctoken_owner_mismatch(&why);
        refusal(a, &why);
        return -1;
    }
    return 0;
}

static int parse_count(const char *s, long long max, long long *out)
{
    char *end;
    long long v;

    if (!s || !*s)
        return 1;
    v = strtoll(s, &end, 10);
    if (*end || v < 0 || v > max)
        return -1;
    *out = v;
    return 0;
}

/* Origin, token, scope and owner: the checks both routes make first
 * (on_loop: the WebSocket's, on the loop thread). */
static int authorize(rt *r, const rt_req *q, const char *topic, int on_loop, synctoken_principal *p, rt_resp *a)
{
    synctoken_refusal why;
    char id[RT_TOPIC_MAX];
    int kind;

    if (!topic || !*topic || strlen(topic) >= RT_TOPIC_MAX) {
        rt_error(a, 400, "invalid_request", "topic is required (at most 600 bytes)");
        return -1;
    }
    if (origin_ok(r, q, a) < 0)
        return -1;
    if (synctoken_authenticate(r->tok, q->header(q, "Authorization"), p, &why) < 0) {
        refusal(a, &why);
        return -1;
    }
    kind = synctoken_authorize_topic(p, topic, id, sizeof(id), &why);
    if (kind < 0) {
        refusal(a, &why);
        return -1;
    }
    if (kind == SYNCTOKEN_TOPIC_WORKER && owner_ok(r, p, id, on_loop, a) < 0)
        return -1;
    return 0;
}

int rt_khala_ws_accept(rt *r, const rt_req *q, const char *topic, long long *after, rt_resp *a)
{
    synctoken_principal p;

    *after = 0;
    if (authorize(r, q, topic, 1, &p, a) < 0)
        return -1;
    if (parse_count(q->query(q, "after_seq"), 9000000000000000000LL, after) < 0) {
        rt_error(a, 400, "invalid_request", "after_seq must be a non-negative integer");
        return -1;
    }
    return 0;
}

/* A topic's window and messages in one statement (one snapshot, so head,
 * floor and messages agree). The log rows are the messages: the run (or
 * worker) row holds the head; the floor is the retention window below it. */
static const char POLL_RUN_SQL[] =
    "SELECT r.last_seq, (SELECT coalesce(json_agg(json_build_object('topic', $4::text, 'sequence', e.seq, 'kind', "
    "e.event_type, 'payload', e.payload, 'published_at', runtime.ts(e.recorded_at)) ORDER BY e.seq), '[]') "
    "FROM (SELECT * FROM runtime.run_events WHERE run_id = $1::uuid AND seq > $2::bigint ORDER BY seq "
    "LIMIT $3::int) e) FROM (SELECT 1) one LEFT JOIN runtime.runs r ON r.id = $1::uuid";
static const char POLL_WORKER_SQL[] =
    "SELECT w.latest_seq, (SELECT coalesce(json_agg(json_build_object('topic', $4::text, 'sequence', e.seq, 'kind', "
    "e.kind, 'payload', e.message, 'published_at', runtime.ts(e.occurred_at)) ORDER BY e.seq), '[]') "
    "FROM (SELECT * FROM runtime.worker_events WHERE worker_id = $1 AND seq > $2::bigint ORDER BY seq "
    "LIMIT $3::int) e) FROM (SELECT 1) one LEFT JOIN runtime.workers w ON w.worker_id = $1";

int rtsync_read(rt *r, const char *topic, long long after, long limit, rtsync_window *w, rt_resp *a)
{
    char afters[FMT_I64_MAX], lims[FMT_I64_MAX], id[RT_TOPIC_MAX], err[512];
    const char *p[4] = {id, afters, lims, topic};
    int kind = synctoken_parse_topic(topic, id, sizeof(id));
    long long keep = r->cfg.retention_messages;
    PGconn *c;
    PGresult *res;

    memset(w, 0, sizeof(*w));
    if (kind == 0 || (kind == SYNCTOKEN_TOPIC_RUN && !rt_is_uuid(id))) {
        /* Topics nothing publishes on are empty. */
        w->messages = cJSON_CreateArray();
        return w->messages ? 0 : -1;
    }
    fmt_i64(afters, after);
    fmt_i64(lims, limit);
    if (!(c = rt_acquire(r, a)))
        return -1;
    res = kind == SYNCTOKEN_TOPIC_RUN ? dbpool_exec_prepared(c, "rt_poll_run", POLL_RUN_SQL, 4, p, err, sizeof(err))
                                     : dbpool_exec_prepared(c, "rt_poll_worker", POLL_WORKER_SQL, 4, p, err, sizeof(err));
    dbpool_release(r->db, c);
    if (!res || PQntuples(res) != 1) {
        rt_db_error(a, "reading a topic", topic, res ? "no row" : err);
        PQclear(res);
        return -1;
    }
    w->head = PQgetisnull(res, 0, 0) ? 0 : strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    w->floor_seq = keep > 0 && w->head > keep ? w->head - keep : 0;
    w->messages = cJSON_Parse(PQgetvalue(res, 0, 1));
    PQclear(res);
    if (!w->messages) {
        rt_error(a, 500, "internal", "out of memory");
        return -1;
    }
    return 0;
}

cJSON *rtsync_stale(rt *r, const char *topic, long long after, const rtsync_window *w)
{
    const char *reasons[2];
    khala_class cls = khala_topic_class(topic);
    long long budget = r->cfg.limits[cls].replay_budget;
    int n = khala_stale_reasons(after, w->floor_seq, w->head, budget, reasons), i;
    cJSON *d, *codes;

    if (n == 0)
        return NULL;
    d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "topic", topic);
    cJSON_AddNumberToObject(d, "requested_cursor", (double)after);
    cJSON_AddNumberToObject(d, "oldest_available_cursor", (double)w->floor_seq);
    cJSON_AddNumberToObject(d, "head_cursor", (double)w->head);
    codes = cJSON_AddArrayToObject(d, "reason_codes");
    for (i = 0; i < n; i++) {
        cJSON_AddItemToArray(codes, cJSON_CreateString(reasons[i]));
        metrics_counter_inc(strcmp(reasons[i], "retention_floor_breach") == 0 ? r->stale_floor : r->stale_budget);
    }
    cJSON_AddNumberToObject(d, "replay_lag", (double)(w->head > after ? w->head - after : 0));
    cJSON_AddNumberToObject(d, "replay_budget_events", (double)budget);
    cJSON_AddStringToObject(d, "qos_tier", cls == KHALA_CLASS_OTHER ? "cold" : cls == KHALA_CLASS_RUN ? "hot" : "warm");
    cJSON_AddStringToObject(d, "recovery", "reset_local_watermark_and_replay_bootstrap");
    return d;
}

void rt_h_khala_poll(rt *r, const rt_req *q, rt_resp *a)
{
    /* Wider than a topic: one too long is refused, not cut to another. */
    char topic[RT_PARAM_MAX];
    synctoken_principal p;
    long long after = 0, limit = r->cfg.poll_default_limit, last;
    long applied, retry = 0;
    char key[RT_TOPIC_MAX + 1024];
    rtsync_window w;
    cJSON *stale, *lastmsg;

    fmt_copy(topic, sizeof(topic), q->param(q, "topic") ? q->param(q, "topic") : "");
    rt_topic_canonical(topic);
    if (authorize(r, q, topic, 0, &p, a) < 0)
        return;
    if (parse_count(q->query(q, "after_seq"), 9000000000000000000LL, &after) < 0 ||
        parse_count(q->query(q, "limit"), 1000000000LL, &limit) < 0) {
        rt_error(a, 400, "invalid_request", "after_seq and limit must be non-negative integers");
        return;
    }
    if (limit < 1)
        limit = 1;
    applied = limit > r->cfg.poll_max_limit ? r->cfg.poll_max_limit : (long)limit;
    /* The guard is per principal and topic: one client polling two topics
     * is two pollers, two clients of one user are two as well. */
    snprintf(key, sizeof(key), "%s|%s|%s|%s", p.sub, p.device_id, p.org_id, topic);
    if (khala_guard_poll(r->guard, key, r->cfg.poll_min_interval_ms, svc_now_ms(), &retry) < 0) {
        rt_error(a, 429, "rate_limited", "poll interval guard triggered");
        cJSON_AddStringToObject(a->json, "reason_code", "poll_interval_guard");
        cJSON_AddNumberToObject(a->json, "retry_after_ms", (double)retry);
        snprintf(a->retry_after, sizeof(a->retry_after), "1");
        return;
    }
    if (rtsync_read(r, topic, after, applied, &w, a) < 0)
        return;
    if ((stale = rtsync_stale(r, topic, after, &w)) != NULL) {
        cJSON_Delete(w.messages);
        rt_error(a, 410, "stale_cursor", "cursor cannot be resumed from retained stream window");
        cJSON_AddItemToObject(a->json, "details", stale);
        return;
    }
    lastmsg = cJSON_GetArrayItem(w.messages, cJSON_GetArraySize(w.messages) - 1);
    last = lastmsg ? (long long)cJSON_GetObjectItemCaseSensitive(lastmsg, "sequence")->valuedouble : after;
    a->status = 200;
    a->json = cJSON_CreateObject();
    cJSON_AddStringToObject(a->json, "topic", topic);
    cJSON_AddItemToObject(a->json, "messages", w.messages);
    cJSON_AddNumberToObject(a->json, "oldest_available_cursor", (double)w.floor_seq);
    cJSON_AddNumberToObject(a->json, "head_cursor", (double)w.head);
    cJSON_AddNumberToObject(a->json, "next_cursor", (double)last);
    cJSON_AddBoolToObject(a->json, "replay_complete", last >= w.head);
    cJSON_AddNumberToObject(a->json, "limit_applied", (double)applied);
    cJSON_AddBoolToObject(a->json, "limit_capped", limit > applied);
}
