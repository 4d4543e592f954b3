/* chain_events: POST /api/v1/chain-events (ingest, INGEST_TOKEN),
 * GET /api/v1/chain-events (query) and GET /api/v1/chain-events/{id}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apiutil.h"
#include "auth.h"
#include "event_model.h"
#include "log.h"

#define CE_MAX_BATCH 1000
#define CE_DEFAULT_LIMIT 100
#define CE_MAX_LIMIT 1000

/* Microseconds since the epoch of created_at: the cursor's time part,
 * exact (extract returns numeric on PostgreSQL 14+). */
#define CE_CURSOR_COL "(extract(epoch from e.created_at) * 1000000)::bigint AS cursor_usec"

int gateway_ingest_authorized(gateway *gw, httpd_req *req)
{
    const char *hdr = httpd_req_header(req, "Authorization");
    const char *tok = hdr ? jwtauth_bearer(hdr) : NULL;

    if (!tok) {
        httpd_respond_error(req, 401, "unauthorized", "missing Bearer ingest token", NULL);
        httpd_req_add_header(req, "WWW-Authenticate", "Bearer");
        return 0;
    }
    if (!apiutil_secret_eq(tok, gw->cfg.ingest_token)) {
        httpd_respond_error(req, 401, "unauthorized", "invalid ingest token", NULL);
        httpd_req_add_header(req, "WWW-Authenticate", "Bearer error=\"invalid_token\"");
        return 0;
    }
    return 1;
}

/* The statement for `n` rows: INSERT ... VALUES ($1..$27), ... ON CONFLICT
 * (id) DO NOTHING RETURNING id. Only placeholders are built here; every
 * value travels as a parameter. Returns a malloc'd string or NULL. */
static char *ce_insert_sql(int n)
{
    static const char head[] = "INSERT INTO events (" EVENT_MODEL_INSERT_COLS ") VALUES ";
    static const char tail[] = " ON CONFLICT (id) DO NOTHING RETURNING id";
    size_t cap = sizeof(head) + sizeof(tail) + (size_t)n * (EVENT_MODEL_NINSERT * 8 + 8), len;
    char *sql = malloc(cap);
    int p = 1;

    if (!sql)
        return NULL;
    len = (size_t)snprintf(sql, cap, "%s", head);
    for (int r = 0; r < n; r++) {
        len += (size_t)snprintf(sql + len, cap - len, "%s(", r ? "," : "");
        for (int c = 0; c < EVENT_MODEL_NINSERT; c++)
            len += (size_t)snprintf(sql + len, cap - len, "%s$%d", c ? "," : "", p++);
        len += (size_t)snprintf(sql + len, cap - len, ")");
    }
    snprintf(sql + len, cap - len, "%s", tail);
    return sql;
}

static void ce_ingest(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    cJSON *body = NULL, *details = NULL, *out;
    const cJSON *events, *ev;
    event_model_params *rows = NULL;
    const char **params = NULL;
    char *sql = NULL, err[512];
    PGconn *conn = NULL;
    PGresult *res;
    int n, i, inserted;

    if (!gateway_ingest_authorized(gw, req) || httpd_req_json(req, &body) < 0)
        return;
    events = cJSON_IsObject(body) ? cJSON_GetObjectItemCaseSensitive(body, "events") : body;
    details = cJSON_CreateObject();
    if (!cJSON_IsArray(events)) {
        cJSON_AddStringToObject(details, "events", "the body must be an array of events or {\"events\": [...]}");
        httpd_respond_error(req, 400, "invalid_request", "invalid batch", details);
        details = NULL;
        goto out;
    }
    n = cJSON_GetArraySize(events);
    if (n > CE_MAX_BATCH) {
        cJSON_AddStringToObject(details, "events", "at most 1000 events per batch");
        httpd_respond_error(req, 400, "invalid_request", "batch too large", details);
        details = NULL;
        goto out;
    }
    i = 0;
    cJSON_ArrayForEach(ev, events)
    {
        char prefix[32];

        snprintf(prefix, sizeof(prefix), "events[%d].", i++);
        event_model_validate(ev, details, prefix);
    }
    if (cJSON_GetArraySize(details)) {
        httpd_respond_error(req, 400, "invalid_request", "invalid events; nothing was stored", details);
        details = NULL;
        goto out;
    }
    if (n == 0) {
        out = cJSON_CreateObject();
        cJSON_AddNumberToObject(out, "inserted", 0);
        cJSON_AddNumberToObject(out, "duplicates", 0);
        httpd_respond_json(req, 200, out);
        goto out;
    }
    rows = malloc((size_t)n * sizeof(*rows));
    params = malloc((size_t)n * EVENT_MODEL_NINSERT * sizeof(*params));
    sql = ce_insert_sql(n);
    if (!rows || !params || !sql) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        goto out;
    }
    i = 0;
    cJSON_ArrayForEach(ev, events)
    {
        if (event_model_to_params(ev, &rows[i]) < 0) {
            httpd_respond_error(req, 500, "internal", "event conversion failed", NULL);
            goto out;
        }
        memcpy(params + (size_t)i * EVENT_MODEL_NINSERT, rows[i].values, sizeof(rows[i].values));
        i++;
    }
    if (!(conn = apiutil_db(gw, req)))
        goto out;
    /* One statement for the whole batch; ON CONFLICT DO NOTHING also skips
     * an id repeated inside the batch itself. */
    res = dbpool_exec(conn, sql, n * EVENT_MODEL_NINSERT, params, err, sizeof(err));
    if (!res) {
        apiutil_db_fail(req, "ingest", err);
        goto out;
    }
    inserted = PQntuples(res);
    PQclear(res);
    out = cJSON_CreateObject();
    cJSON_AddNumberToObject(out, "inserted", inserted);
    cJSON_AddNumberToObject(out, "duplicates", n - inserted);
    httpd_respond_json(req, 200, out);
out:
    dbpool_release(gw->db, conn);
    free(sql);
    free(params);
    free(rows);
    cJSON_Delete(details);
    cJSON_Delete(body);
}

/* Adds "<name>" to details when query argument `name` is present but is not
 * an integer; stores its text in *out otherwise (NULL when absent). */
static void ce_int_filter(httpd_req *req, const char *name, const char **out, cJSON *details)
{
    const char *s = httpd_req_query(req, name);
    int64_t v;

    *out = NULL;
    if (!s)
        return;
    if (event_model_parse_i64(s, &v) < 0)
        cJSON_AddStringToObject(details, name, "must be an integer");
    else
        *out = s;
}

static void ce_time_filter(httpd_req *req, const char *name, char *buf, size_t len, const char **out,
                           cJSON *details)
{
    const char *s = httpd_req_query(req, name);
    int64_t t;

    *out = NULL;
    if (!s)
        return;
    if (apiutil_parse_time(s, &t) < 0) {
        cJSON_AddStringToObject(details, name, "must be unix seconds or an RFC 3339 time");
        return;
    }
    snprintf(buf, len, "%lld", (long long)t);
    *out = buf;
}

static void ce_list(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    cJSON *details, *out, *items;
    const char *chain_id, *agent_id, *registry, *event_type, *since, *until, *params[10];
    char since_b[32], until_b[32], usec[32], cid[EVENT_MODEL_MAX_ID + 1], limit_b[16], sql[2048];
    int limit, np = 0, rows;
    size_t len;
    PGconn *conn = NULL;
    PGresult *res = NULL;

    if (auth_require(gw, req, &user) < 0)
        return;
    details = cJSON_CreateObject();
    ce_int_filter(req, "chain_id", &chain_id, details);
    ce_int_filter(req, "agent_id", &agent_id, details);
    registry = httpd_req_query(req, "registry");
    if (registry && !event_model_registry_valid(registry))
        cJSON_AddStringToObject(details, "registry", "must be one of identity, reputation, validation");
    event_type = httpd_req_query(req, "event_type");
    if (event_type && !event_model_type_valid(event_type))
        cJSON_AddStringToObject(details, "event_type",
                                "must be one of AgentRegistered, MetadataSet, NewFeedback, FeedbackRevoked, "
                                "ResponseAppended, ValidationRequest, ValidationResponse");
    ce_time_filter(req, "since", since_b, sizeof(since_b), &since, details);
    ce_time_filter(req, "until", until_b, sizeof(until_b), &until, details);
    apiutil_limit(req, CE_DEFAULT_LIMIT, CE_MAX_LIMIT, &limit, details);
    apiutil_cursor_decode(req, usec, sizeof(usec), cid, sizeof(cid), details);
    if (cJSON_GetArraySize(details)) {
        httpd_respond_error(req, 400, "invalid_request", "invalid query", details);
        return;
    }
    cJSON_Delete(details);
    len = (size_t)snprintf(sql, sizeof(sql), "SELECT " EVENT_MODEL_SELECT ", " CE_CURSOR_COL
                                             " FROM events e WHERE true");
#define CE_FILTER(val, clause)                                                                                \
    do {                                                                                                      \
        if (val) {                                                                                            \
            params[np++] = (val);                                                                             \
            len += (size_t)snprintf(sql + len, sizeof(sql) - len, clause, np);                                \
        }                                                                                                     \
    } while (0)
    CE_FILTER(chain_id, " AND e.chain_id = $%d");
    CE_FILTER(registry, " AND e.registry = $%d");
    CE_FILTER(event_type, " AND e.event_type = $%d");
    CE_FILTER(agent_id, " AND e.agent_id = $%d");
    CE_FILTER(since, " AND e.\"timestamp\" >= $%d");
    CE_FILTER(until, " AND e.\"timestamp\" <= $%d");
#undef CE_FILTER
    if (usec[0]) {
        params[np++] = usec;
        params[np++] = cid;
        len += (size_t)snprintf(sql + len, sizeof(sql) - len,
                                " AND (e.created_at, e.id) < ('epoch'::timestamptz + $%d::bigint * interval "
                                "'1 microsecond', $%d)",
                                np - 1, np);
    }
    snprintf(limit_b, sizeof(limit_b), "%d", limit + 1);
    params[np++] = limit_b;
    snprintf(sql + len, sizeof(sql) - len, " ORDER BY e.created_at DESC, e.id DESC LIMIT $%d", np);
    if (!(conn = apiutil_db(gw, req)))
        return;
    if (!(res = apiutil_exec(req, conn, sql, np, params)))
        goto out;
    rows = PQntuples(res);
    out = cJSON_CreateObject();
    items = cJSON_AddArrayToObject(out, "items");
    for (int r = 0; r < rows && r < limit; r++)
        cJSON_AddItemToArray(items, event_model_from_row(res, r));
    if (rows > limit) {
        int cf = PQfnumber(res, "cursor_usec"), idf = PQfnumber(res, "id");
        char *cur = apiutil_cursor_encode(PQgetvalue(res, limit - 1, cf), PQgetvalue(res, limit - 1, idf));

        cJSON_AddStringToObject(out, "next_cursor", cur ? cur : "");
        free(cur);
    } else {
        cJSON_AddNullToObject(out, "next_cursor");
    }
    httpd_respond_json(req, 200, out);
out:
    PQclear(res);
    dbpool_release(gw->db, conn);
}

static void ce_get(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    const char *params[1] = {httpd_req_param(req, "id")};
    PGconn *conn;
    PGresult *res;

    if (auth_require(gw, req, &user) < 0 || !(conn = apiutil_db(gw, req)))
        return;
    res = apiutil_exec(req, conn, "SELECT " EVENT_MODEL_SELECT " FROM events e WHERE e.id = $1", 1, params);
    if (res && PQntuples(res) == 1)
        httpd_respond_json(req, 200, event_model_from_row(res, 0));
    else if (res)
        httpd_respond_error(req, 404, "not_found", "no such chain event", NULL);
    PQclear(res);
    dbpool_release(gw->db, conn);
}

int gateway_chain_event_routes(gateway *gw)
{
    if (httpd_route(gw->http, "POST", "/api/v1/chain-events", ce_ingest, gw) < 0 ||
        httpd_route(gw->http, "GET", "/api/v1/chain-events", ce_list, gw) < 0 ||
        httpd_route(gw->http, "GET", "/api/v1/chain-events/{id}", ce_get, gw) < 0)
        return -1;
    return 0;
}
