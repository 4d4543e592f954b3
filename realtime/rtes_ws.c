#include "rtes_ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fmt.h"
#include "log.h"
#include "rtes_tokens.h"

struct rtes_ws {
    rtes_hub *hub;
    jwtauth *jwt;
    rconn *redis; /* loop thread only */
    int skip_auth;
};

/* Per connection, owned by wsapp. */
typedef struct {
    rtes_watch *w;
    char eid[RTES_ID_MAX];
    char wid[RTES_ID_MAX];
} conn_data;

rtes_ws *rtes_ws_new(rtes_hub *hub, jwtauth *jwt, const rconn_opts *redis, int skip_auth)
{
    rtes_ws *w = calloc(1, sizeof(*w));

    if (!w)
        return NULL;
    w->hub = hub;
    w->jwt = jwt;
    w->skip_auth = skip_auth;
    w->redis = rconn_new(redis, 500);
    if (!w->redis) {
        free(w);
        return NULL;
    }
    return w;
}

void rtes_ws_free(rtes_ws *w)
{
    if (!w)
        return;
    rconn_free(w->redis);
    free(w);
}

/* An id from the query or path: 1..RTES_ID_MAX-1 bytes. */
static int id_ok(const char *s)
{
    size_t n = s ? strlen(s) : 0;

    return n > 0 && n < RTES_ID_MAX;
}

/* The Bearer JWT's user, into uid. Returns 1 when a valid token names a
 * user, 0 when there is no Authorization header, -1 when it is there but
 * bad (the request has been answered 401). */
static int bearer_user(rtes_ws *w, wsapp_req *req, char *uid)
{
    const char *h = wsapp_req_header(req, "Authorization"), *tok;
    cJSON *claims = NULL;
    const cJSON *u;
    int rc;

    uid[0] = '\0';
    if (!h)
        return 0;
    tok = jwtauth_bearer(h);
    if (!tok) {
        wsapp_respond_error(req, 401, "unauthorized", "Authorization must be a Bearer token", NULL);
        return -1;
    }
    rc = jwtauth_verify(w->jwt, tok, &claims);
    if (rc != JWTAUTH_OK) {
        wsapp_respond_error(req, 401, "unauthorized", jwtauth_message(rc), NULL);
        return -1;
    }
    u = cJSON_GetObjectItemCaseSensitive(claims, "user_id");
    if (!cJSON_IsString(u) || !u->valuestring[0])
        u = cJSON_GetObjectItemCaseSensitive(claims, "sub");
    if (!cJSON_IsString(u) || !id_ok(u->valuestring)) {
        cJSON_Delete(claims);
        wsapp_respond_error(req, 401, "unauthorized", "the token names no user (user_id or sub)", NULL);
        return -1;
    }
    fmt_copy(uid, RTES_ID_MAX, u->valuestring);
    cJSON_Delete(claims);
    return 1;
}

static int rt_accept(wsapp_req *req, void *user, void *ud)
{
    rtes_ws *w = ud;
    conn_data *cd = user;
    const char *eid = wsapp_req_query(req, "execution_id"), *wid = wsapp_req_query(req, "workflow_id");
    char uid[RTES_ID_MAX], err[512];
    long long now = (long long)time(NULL);
    int who, ok;

    if (!id_ok(eid)) {
        wsapp_respond_error(req, 400, "invalid_request", "execution_id is required (1 to 255 bytes)", NULL);
        return -1;
    }
    if (wid && *wid && !id_ok(wid)) {
        wsapp_respond_error(req, 400, "invalid_request", "workflow_id is too long", NULL);
        return -1;
    }
    fmt_copy(cd->eid, sizeof(cd->eid), eid);
    fmt_copy(cd->wid, sizeof(cd->wid), wid ? wid : "");
    if (w->skip_auth)
        return 0;
    who = bearer_user(w, req, uid);
    if (who < 0)
        return -1;
    if (who)
        ok = rtes_tokens_user_grants(w->redis, uid, cd->eid, cd->wid, now, err, sizeof(err));
    else
        ok = rtes_tokens_execution_live(w->redis, cd->eid, cd->wid, now, err, sizeof(err));
    if (ok < 0) {
        wsapp_respond_error(req, 503, "unavailable", "the token store is unavailable", NULL);
        return -1;
    }
    if (ok == 0) {
        if (who)
            wsapp_respond_error(req, 403, "forbidden", "no token grants this execution", NULL);
        else
            wsapp_respond_error(req, 401, "unauthorized", "a Bearer token or an execution token is required", NULL);
        return -1;
    }
    return 0;
}

static void rt_open(wsapp_conn *c, void *user, void *ud)
{
    rtes_ws *w = ud;
    conn_data *cd = user;

    cd->w = rtes_hub_watch(w->hub, c, cd->eid, cd->wid);
    if (!cd->w)
        wsapp_conn_close(c, 1011, "out of memory");
}

static int rt_writable(wsapp_conn *c, void *user, void *ud)
{
    rtes_ws *w = ud;
    conn_data *cd = user;

    (void)c;
    return rtes_hub_writable(w->hub, cd->w);
}

static void rt_close(wsapp_conn *c, void *user, void *ud)
{
    rtes_ws *w = ud;
    conn_data *cd = user;

    (void)c;
    rtes_hub_unwatch(w->hub, cd->w);
    cd->w = NULL;
}

static void get_execution(wsapp_req *req, void *ud)
{
    rtes_ws *w = ud;
    const char *path = wsapp_req_path(req);
    const char *eid = path + strlen("/executions/");
    rtes_asker who;

    memset(&who, 0, sizeof(who));
    if (!id_ok(eid) || strchr(eid, '/')) {
        wsapp_respond_error(req, 404, "not_found", "no such route", NULL);
        return;
    }
    who.skip_auth = w->skip_auth;
    if (!w->skip_auth && bearer_user(w, req, who.user_id) < 0)
        return;
    rtes_hub_document(w->hub, req, eid, &who);
}

int rtes_ws_mount(rtes_ws *w, wsapp *app)
{
    wsapp_ws_handlers h;

    memset(&h, 0, sizeof(h));
    h.user_size = sizeof(conn_data);
    h.accept = rt_accept;
    h.open = rt_open;
    /* No message handler: the original ignored what watchers send. */
    h.writable = rt_writable;
    h.close = rt_close;
    if (wsapp_ws_route(app, "/rt", &h, w) < 0)
        return -1;
    return wsapp_route(app, "GET", "/executions/*", get_execution, w);
}
