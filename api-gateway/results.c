/* results: GET /api/v1/triggers/{id}/results, the action_results of one of
 * the signed-in user's triggers, newest first. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apiutil.h"
#include "auth.h"
#include "event_model.h"
#include "log.h"

#define RS_DEFAULT_LIMIT 20
#define RS_MAX_LIMIT 100

#define RS_COLS                                                                                               \
    "r.id, r.job_id, r.trigger_id, r.event_id, r.action_type, r.status, "                                    \
    "to_char(r.executed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS executed_at, "         \
    "r.duration_ms, r.error_message, r.response_data, r.retry_count, "                                       \
    "(extract(epoch from r.executed_at) * 1000000)::bigint AS cursor_usec, r.id AS cursor_id"

static void rs_list(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    const char *tid = httpd_req_param(req, "id"), *params[5];
    char usec[32], cid[256], limit_b[16];
    cJSON *details = cJSON_CreateObject(), *out, *items;
    PGconn *conn = NULL;
    PGresult *res = NULL;
    int limit, rows;
    int64_t idv;

    if (auth_require(gw, req, &user) < 0)
        goto out;
    apiutil_limit(req, RS_DEFAULT_LIMIT, RS_MAX_LIMIT, &limit, details);
    /* action_results.id is a bigserial: a cursor naming anything else is
     * malformed (and would fail the cast). */
    if (apiutil_cursor_decode(req, usec, sizeof(usec), cid, sizeof(cid), details) == 0 && usec[0] &&
        event_model_parse_i64(cid, &idv) < 0)
        cJSON_AddStringToObject(details, "cursor", "malformed cursor (use next_cursor from a previous page)");
    if (cJSON_GetArraySize(details)) {
        httpd_respond_error(req, 400, "invalid_request", "invalid query", details);
        details = NULL;
        goto out;
    }
    if (!(conn = apiutil_db(gw, req)))
        goto out;
    /* Ownership first: another user's trigger answers 404 like a missing
     * one, so ids cannot be probed. */
    params[0] = tid;
    params[1] = user.user_id;
    if (!(res = apiutil_exec(req, conn, "SELECT 1 FROM triggers WHERE id = $1 AND user_id = $2", 2, params)))
        goto out;
    if (PQntuples(res) != 1) {
        httpd_respond_error(req, 404, "not_found", "no such trigger", NULL);
        goto out;
    }
    PQclear(res);
    snprintf(limit_b, sizeof(limit_b), "%d", limit + 1);
    params[1] = limit_b;
    if (usec[0]) {
        params[2] = usec;
        params[3] = cid;
        res = apiutil_exec(req, conn,
                           "SELECT " RS_COLS " FROM action_results r WHERE r.trigger_id = $1 "
                           "AND (r.executed_at, r.id) < ('epoch'::timestamptz + $3::bigint * interval "
                           "'1 microsecond', $4::bigint) ORDER BY r.executed_at DESC, r.id DESC LIMIT $2",
                           4, params);
    } else {
        res = apiutil_exec(req, conn,
                           "SELECT " RS_COLS " FROM action_results r WHERE r.trigger_id = $1 "
                           "ORDER BY r.executed_at DESC, r.id DESC LIMIT $2",
                           2, params);
    }
    if (!res)
        goto out;
    rows = PQntuples(res);
    out = cJSON_CreateObject();
    items = cJSON_AddArrayToObject(out, "items");
    for (int r = 0; r < rows && r < limit; r++)
        cJSON_AddItemToArray(items, apiutil_row_json(res, r));
    if (rows > limit) {
        char *cur = apiutil_cursor_encode(PQgetvalue(res, limit - 1, PQfnumber(res, "cursor_usec")),
                                          PQgetvalue(res, limit - 1, PQfnumber(res, "cursor_id")));

        cJSON_AddStringToObject(out, "next_cursor", cur ? cur : "");
        free(cur);
    } else {
        cJSON_AddNullToObject(out, "next_cursor");
    }
    httpd_respond_json(req, 200, out);
out:
    PQclear(res);
    dbpool_release(gw->db, conn);
    cJSON_Delete(details);
}

int gateway_result_routes(gateway *gw)
{
    return httpd_route(gw->http, "GET", "/api/v1/triggers/{id}/results", rs_list, gw);
}
