/* triggers: POST/GET /api/v1/triggers and GET/PUT/PATCH/DELETE
 * /api/v1/triggers/{id}, each scoped to the signed-in user.
 *
 * Validation is trigger_model's (libshared), so the gateway accepts exactly
 * what the event-processor can evaluate. Every write is one transaction
 * over triggers, trigger_conditions and trigger_actions that also runs
 * pg_notify('trigger_changed', id), so listeners hear of a change only once
 * it is committed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apiutil.h"
#include "auth.h"
#include "log.h"
#include "trigger_model.h"

#define TG_DEFAULT_LIMIT 20
#define TG_MAX_LIMIT 100

#define TG_TIME(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* One trigger as the API answers it; conditions and actions are built by
 * the server as JSON in the same round trip. */
#define TG_SELECT                                                                                             \
    "SELECT t.id, t.name, t.description, t.chain_id, t.registry, t.enabled, t.is_stateful, "                  \
    "(SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'condition_type', c.condition_type, "          \
    "'field', c.field, 'operator', c.operator, 'value', c.value, 'config', c.config) ORDER BY c.id), "       \
    "'[]'::jsonb) FROM trigger_conditions c WHERE c.trigger_id = t.id) AS conditions, "                       \
    "(SELECT coalesce(jsonb_agg(jsonb_build_object('id', a.id, 'action_type', a.action_type, "                \
    "'priority', a.priority, 'config', a.config) ORDER BY a.id), '[]'::jsonb) "                               \
    "FROM trigger_actions a WHERE a.trigger_id = t.id) AS actions, " TG_TIME("t.created_at") " AS created_at, " \
    TG_TIME("t.updated_at") " AS updated_at, "                                                                \
    "(extract(epoch from t.created_at) * 1000000)::bigint AS cursor_usec FROM triggers t "

/* Runs a statement that returns nothing interesting; answers on failure. */
static int tg_do(httpd_req *req, PGconn *conn, const char *sql, int n, const char *const *params)
{
    PGresult *res = apiutil_exec(req, conn, sql, n, params);

    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

/* Reads one of `user`'s triggers as JSON; NULL when there is none (not
 * answered) or on error (*failed set, answered). */
static cJSON *tg_load(httpd_req *req, PGconn *conn, const char *id, const char *user_id, int for_update,
                      int *failed)
{
    const char *params[2] = {id, user_id};
    PGresult *res;
    cJSON *t = NULL;

    *failed = 0;
    if (for_update)
        res = apiutil_exec(req, conn, TG_SELECT "WHERE t.id = $1 AND t.user_id = $2 FOR UPDATE OF t", 2, params);
    else
        res = apiutil_exec_prepared(req, conn, "gw_trigger_get", TG_SELECT "WHERE t.id = $1 AND t.user_id = $2", 2,
                                    params);
    if (!res) {
        *failed = 1;
        return NULL;
    }
    if (PQntuples(res) == 1)
        t = apiutil_row_json(res, 0);
    PQclear(res);
    return t;
}

/* The conditions or actions of a validated body as the JSON array
 * jsonb_to_recordset reads: condition values become text (a number 50
 * is stored as "50", the column being text). Returns a malloc'd string. */
static char *tg_rows_json(const trigger_model_def *def, int actions)
{
    cJSON *arr = cJSON_CreateArray();
    char *s;

    if (actions) {
        for (int i = 0; i < def->naction; i++) {
            const trigger_model_action *a = &def->actions[i];
            cJSON *o = cJSON_CreateObject();

            cJSON_AddStringToObject(o, "action_type", trigger_model_action_type_name(a->type));
            cJSON_AddNumberToObject(o, "priority", a->priority);
            cJSON_AddItemToObject(o, "config", cJSON_Duplicate(a->config, 1));
            cJSON_AddItemToArray(arr, o);
        }
    } else {
        for (int i = 0; i < def->ncond; i++) {
            const trigger_model_condition *c = &def->conds[i];
            cJSON *o = cJSON_CreateObject();

            cJSON_AddStringToObject(o, "condition_type", trigger_model_condition_type_name(c->type));
            if (c->field)
                cJSON_AddStringToObject(o, "field", c->field);
            if (c->op_text)
                cJSON_AddStringToObject(o, "operator", c->op_text);
            if (c->value)
                cJSON_AddStringToObject(o, "value", c->value);
            if (c->config)
                cJSON_AddItemToObject(o, "config", cJSON_Duplicate(c->config, 1));
            cJSON_AddItemToArray(arr, o);
        }
    }
    s = cJSON_PrintUnformatted(arr);
    cJSON_Delete(arr);
    return s;
}

/* Writes the children of trigger `id` from `def` (after the caller deleted
 * any old ones) and notifies. Returns 0 or -1 (answered). */
static int tg_write_children(httpd_req *req, PGconn *conn, const char *id, const trigger_model_def *def)
{
    char *conds = tg_rows_json(def, 0), *acts = tg_rows_json(def, 1);
    const char *params[2] = {id, NULL};
    int rc = -1;

    if (!conds || !acts) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        goto out;
    }
    params[1] = conds;
    if (tg_do(req, conn,
              "INSERT INTO trigger_conditions (trigger_id, condition_type, field, operator, value, config) "
              "SELECT $1, r.condition_type, r.field, r.operator, r.value, r.config "
              "FROM jsonb_to_recordset($2::jsonb) AS r(condition_type text, field text, operator text, "
              "value text, config jsonb)",
              2, params) < 0)
        goto out;
    params[1] = acts;
    if (tg_do(req, conn,
              "INSERT INTO trigger_actions (trigger_id, action_type, priority, config) "
              "SELECT $1, r.action_type, r.priority, r.config "
              "FROM jsonb_to_recordset($2::jsonb) AS r(action_type text, priority int, config jsonb)",
              2, params) < 0)
        goto out;
    if (tg_do(req, conn, "SELECT pg_notify('trigger_changed', $1)", 1, params) < 0)
        goto out;
    rc = 0;
out:
    free(conds);
    free(acts);
    return rc;
}

/* Commits, reads the trigger back and answers it with `status`. */
static void tg_commit_answer(httpd_req *req, PGconn *conn, const char *id, const char *user_id, int status)
{
    cJSON *t;
    int failed;

    if (tg_do(req, conn, "COMMIT", 0, NULL) < 0)
        return;
    t = tg_load(req, conn, id, user_id, 0, &failed);
    if (t)
        httpd_respond_json(req, status, t);
    else if (!failed)
        httpd_respond_error(req, 404, "not_found", "no such trigger", NULL);
}

/* Parses a body object or answers 400. */
static cJSON *tg_body(httpd_req *req)
{
    cJSON *body = NULL;

    if (httpd_req_json(req, &body) < 0)
        return NULL;
    if (!cJSON_IsObject(body)) {
        cJSON_Delete(body);
        httpd_respond_error(req, 400, "invalid_request", "the body must be a JSON object", NULL);
        return NULL;
    }
    return body;
}

/* Validates `body` with trigger_model; answers 400 with every problem and
 * returns NULL when it is invalid. The caller frees the result with
 * trigger_model_def_free. */
static trigger_model_def *tg_validate(httpd_req *req, const cJSON *body)
{
    cJSON *details = cJSON_CreateObject();
    trigger_model_def *def = trigger_model_parse(body, details);

    if (!def || cJSON_GetArraySize(details)) {
        trigger_model_def_free(def);
        httpd_respond_error(req, 400, "invalid_request", "invalid trigger", details);
        return NULL;
    }
    cJSON_Delete(details);
    return def;
}

static void tg_params_top(const trigger_model_def *def, char chain[24], const char *p[6])
{
    snprintf(chain, 24, "%lld", (long long)def->chain_id);
    p[0] = def->name;
    p[1] = def->description;
    p[2] = chain;
    p[3] = def->registry;
    p[4] = def->enabled ? "true" : "false";
    p[5] = trigger_model_def_is_stateful(def) ? "true" : "false";
}

/* Locks the user's row for the rest of the transaction: every write of a
 * user's triggers takes it first, so that the per-user limits are counted
 * by one writer at a time, and always before a trigger row (no deadlock
 * between a PATCH and a PUT of one trigger). Returns 0 or -1 (answered). */
static int tg_user_lock(httpd_req *req, PGconn *conn, const char *user_id)
{
    const char *p[1] = {user_id};

    return tg_do(req, conn, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", 1, p);
}

/* The per-user limits (trigger_model) for storing `def` as trigger `id`
 * ("" for a new one), inside the writing transaction, after tg_user_lock
 * (the count is read after the lock is granted: a statement's snapshot
 * would predate its own wait for it). Returns 0, or -1 when answered (400
 * beyond a limit). */
static int tg_user_limits(httpd_req *req, PGconn *conn, const char *user_id, const char *id,
                          const trigger_model_def *def)
{
    const char *p[2] = {user_id, id};
    PGresult *res = apiutil_exec(req, conn,
                                 "SELECT count(*), COALESCE(sum((SELECT count(*) FROM trigger_conditions c "
                                 "WHERE c.trigger_id = t.id AND c.condition_type IN ('ema_threshold', 'rate_limit'))), 0) "
                                 "FROM triggers t WHERE t.user_id = $1 AND t.id <> $2",
                                 2, p);
    cJSON *details;
    long long n, stateful;

    if (!res)
        return -1;
    n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    stateful = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
    PQclear(res);
    if (!(details = cJSON_CreateObject())) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return -1;
    }
    if (trigger_model_check_user_limits(n, stateful, def, !id[0], details) < 0) {
        httpd_respond_error(req, 400, "invalid_request", "beyond the per-user trigger limits", details);
        return -1;
    }
    cJSON_Delete(details);
    return 0;
}

static void tg_create(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    cJSON *body;
    trigger_model_def *def = NULL;
    const char *params[7];
    char chain[24], id[128];
    PGconn *conn = NULL;
    PGresult *res;

    if (auth_require(gw, req, &user) < 0 || !(body = tg_body(req)))
        return;
    if (!(def = tg_validate(req, body)) || !(conn = apiutil_db(gw, req)))
        goto out;
    tg_params_top(def, chain, params);
    params[6] = user.user_id;
    if (tg_do(req, conn, "BEGIN", 0, NULL) < 0 || tg_user_lock(req, conn, user.user_id) < 0 ||
        tg_user_limits(req, conn, user.user_id, "", def) < 0)
        goto out;
    res = apiutil_exec(req, conn,
                       "INSERT INTO triggers (id, user_id, name, description, chain_id, registry, enabled, "
                       "is_stateful) VALUES (gen_random_uuid()::text, $7, $1, $2, $3, $4, $5, $6) RETURNING id",
                       7, params);
    if (!res)
        goto out;
    snprintf(id, sizeof(id), "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    if (tg_write_children(req, conn, id, def) < 0)
        goto out;
    tg_commit_answer(req, conn, id, user.user_id, 201);
out:
    dbpool_release(gw->db, conn); /* rolls back anything uncommitted */
    trigger_model_def_free(def);
    cJSON_Delete(body);
}

/* Replaces trigger `id` of `user` with `def` inside the caller's
 * transaction (which holds tg_user_lock), then commits and answers. */
static void tg_replace(httpd_req *req, PGconn *conn, const char *id, const auth_user *user,
                       const trigger_model_def *def)
{
    const char *params[8];
    char chain[24];
    PGresult *res;

    if (tg_user_limits(req, conn, user->user_id, id, def) < 0)
        return;
    tg_params_top(def, chain, params);
    params[6] = id;
    params[7] = user->user_id;
    res = apiutil_exec(req, conn,
                       "UPDATE triggers SET name = $1, description = $2, chain_id = $3, registry = $4, "
                       "enabled = $5, is_stateful = $6, updated_at = now() WHERE id = $7 AND user_id = $8",
                       8, params);
    if (!res)
        return;
    if (strcmp(PQcmdTuples(res), "1") != 0) {
        PQclear(res);
        httpd_respond_error(req, 404, "not_found", "no such trigger", NULL);
        return;
    }
    PQclear(res);
    if (tg_do(req, conn, "DELETE FROM trigger_conditions WHERE trigger_id = $1", 1, params + 6) < 0 ||
        tg_do(req, conn, "DELETE FROM trigger_actions WHERE trigger_id = $1", 1, params + 6) < 0 ||
        tg_write_children(req, conn, id, def) < 0)
        return;
    tg_commit_answer(req, conn, id, user->user_id, 200);
}

static void tg_put(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    cJSON *body;
    trigger_model_def *def = NULL;
    PGconn *conn = NULL;

    if (auth_require(gw, req, &user) < 0 || !(body = tg_body(req)))
        return;
    if (!(def = tg_validate(req, body)) || !(conn = apiutil_db(gw, req)))
        goto out;
    if (tg_do(req, conn, "BEGIN", 0, NULL) == 0 && tg_user_lock(req, conn, user.user_id) == 0)
        tg_replace(req, conn, httpd_req_param(req, "id"), &user, def);
out:
    dbpool_release(gw->db, conn);
    trigger_model_def_free(def);
    cJSON_Delete(body);
}

/* PATCH: members present in the body replace the stored ones (conditions
 * and actions as whole lists); the merged trigger is validated like a PUT. */
static void tg_patch(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    cJSON *body, *cur = NULL, *it;
    trigger_model_def *def = NULL;
    PGconn *conn = NULL;
    const char *id = httpd_req_param(req, "id");
    static const char *const drop[] = {"id", "is_stateful", "created_at", "updated_at", NULL};
    int failed;

    if (auth_require(gw, req, &user) < 0 || !(body = tg_body(req)))
        return;
    if (!(conn = apiutil_db(gw, req)) || tg_do(req, conn, "BEGIN", 0, NULL) < 0 ||
        tg_user_lock(req, conn, user.user_id) < 0)
        goto out;
    cur = tg_load(req, conn, id, user.user_id, 1, &failed);
    if (!cur) {
        if (!failed)
            httpd_respond_error(req, 404, "not_found", "no such trigger", NULL);
        goto out;
    }
    /* The stored form back into the request form: server-set members go,
     * condition/action ids go. */
    for (int i = 0; drop[i]; i++)
        cJSON_DeleteItemFromObjectCaseSensitive(cur, drop[i]);
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(cur, "conditions"))
    {
        cJSON_DeleteItemFromObjectCaseSensitive(it, "id");
    }
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(cur, "actions"))
    {
        cJSON_DeleteItemFromObjectCaseSensitive(it, "id");
    }
    cJSON_ArrayForEach(it, body)
    {
        cJSON *copy = cJSON_Duplicate(it, 1);

        if (cJSON_HasObjectItem(cur, it->string))
            cJSON_ReplaceItemInObjectCaseSensitive(cur, it->string, copy);
        else
            cJSON_AddItemToObject(cur, it->string, copy);
    }
    if ((def = tg_validate(req, cur)))
        tg_replace(req, conn, id, &user, def);
out:
    dbpool_release(gw->db, conn);
    trigger_model_def_free(def);
    cJSON_Delete(cur);
    cJSON_Delete(body);
}

static void tg_get(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    PGconn *conn;
    cJSON *t;
    int failed;

    if (auth_require(gw, req, &user) < 0 || !(conn = apiutil_db(gw, req)))
        return;
    t = tg_load(req, conn, httpd_req_param(req, "id"), user.user_id, 0, &failed);
    if (t)
        httpd_respond_json(req, 200, t);
    else if (!failed)
        httpd_respond_error(req, 404, "not_found", "no such trigger", NULL);
    dbpool_release(gw->db, conn);
}

static void tg_delete(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    const char *params[2];
    PGconn *conn;
    PGresult *res;

    if (auth_require(gw, req, &user) < 0 || !(conn = apiutil_db(gw, req)))
        return;
    params[0] = httpd_req_param(req, "id");
    params[1] = user.user_id;
    if (tg_do(req, conn, "BEGIN", 0, NULL) < 0)
        goto out;
    res = apiutil_exec(req, conn, "DELETE FROM triggers WHERE id = $1 AND user_id = $2", 2, params);
    if (!res)
        goto out;
    if (strcmp(PQcmdTuples(res), "1") != 0) {
        PQclear(res);
        httpd_respond_error(req, 404, "not_found", "no such trigger", NULL);
        goto out;
    }
    PQclear(res);
    if (tg_do(req, conn, "SELECT pg_notify('trigger_changed', $1)", 1, params) < 0 ||
        tg_do(req, conn, "COMMIT", 0, NULL) < 0)
        goto out;
    httpd_respond_static(req, 204, NULL, "", 0);
out:
    dbpool_release(gw->db, conn);
}

static void tg_list(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    const char *params[4];
    char usec[32], cid[256], limit_b[16];
    cJSON *details, *out, *items;
    PGconn *conn = NULL;
    PGresult *res = NULL;
    int limit, rows;

    if (auth_require(gw, req, &user) < 0)
        return;
    details = cJSON_CreateObject();
    apiutil_limit(req, TG_DEFAULT_LIMIT, TG_MAX_LIMIT, &limit, details);
    apiutil_cursor_decode(req, usec, sizeof(usec), cid, sizeof(cid), details);
    if (cJSON_GetArraySize(details)) {
        httpd_respond_error(req, 400, "invalid_request", "invalid query", details);
        return;
    }
    cJSON_Delete(details);
    if (!(conn = apiutil_db(gw, req)))
        return;
    snprintf(limit_b, sizeof(limit_b), "%d", limit + 1);
    params[0] = user.user_id;
    params[1] = limit_b;
    params[2] = usec;
    params[3] = cid;
    /* Newest first, keyset on (created_at, id): a page boundary is a
     * position, not an offset, so rows inserted meanwhile (which sort
     * before the cursor) shift nothing. */
    if (usec[0])
        res = apiutil_exec_prepared(req, conn, "gw_trigger_list_after",
                                    TG_SELECT "WHERE t.user_id = $1 AND (t.created_at, t.id) < ('epoch'::timestamptz + "
                                              "$3::bigint * interval '1 microsecond', $4) "
                                              "ORDER BY t.created_at DESC, t.id DESC LIMIT $2",
                                    4, params);
    else
        res = apiutil_exec_prepared(req, conn, "gw_trigger_list",
                                    TG_SELECT "WHERE t.user_id = $1 ORDER BY t.created_at DESC, t.id DESC LIMIT $2",
                                    2, params);
    if (!res)
        goto out;
    rows = PQntuples(res);
    out = cJSON_CreateObject();
    items = cJSON_AddArrayToObject(out, "items");
    for (int r = 0; r < rows && r < limit; r++)
        cJSON_AddItemToArray(items, apiutil_row_json(res, r));
    if (rows > limit) {
        char *cur = apiutil_cursor_encode(PQgetvalue(res, limit - 1, PQfnumber(res, "cursor_usec")),
                                          PQgetvalue(res, limit - 1, PQfnumber(res, "id")));

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

int gateway_trigger_routes(gateway *gw)
{
    if (httpd_route(gw->http, "POST", "/api/v1/triggers", tg_create, gw) < 0 ||
        httpd_route(gw->http, "GET", "/api/v1/triggers", tg_list, gw) < 0 ||
        httpd_route(gw->http, "GET", "/api/v1/triggers/{id}", tg_get, gw) < 0 ||
        httpd_route(gw->http, "PUT", "/api/v1/triggers/{id}", tg_put, gw) < 0 ||
        httpd_route(gw->http, "PATCH", "/api/v1/triggers/{id}", tg_patch, gw) < 0 ||
        httpd_route(gw->http, "DELETE", "/api/v1/triggers/{id}", tg_delete, gw) < 0)
        return -1;
    return 0;
}
