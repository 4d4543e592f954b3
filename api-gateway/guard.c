#include "guard.h"

#include <stdlib.h>
#include <string.h>

#include "apiutil.h"
#include "auth.h"
#include "ratelimit.h"

typedef enum { GUARD_OPEN, GUARD_USER, GUARD_INGEST, GUARD_INTERNAL } guard_kind;

/* Nonzero when `path` is `prefix` or below it. */
static int guard_under(const char *path, const char *prefix)
{
    size_t n = strlen(prefix);

    return strncmp(path, prefix, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

static guard_kind guard_route_kind(const char *method, const char *path)
{
    if (guard_under(path, "/api/v1/triggers"))
        return GUARD_USER;
    if (guard_under(path, "/api/v1/chain-events"))
        return strcmp(method, "POST") == 0 ? GUARD_INGEST : GUARD_USER;
    if (strcmp(path, "/api/v1/auth/logout-all") == 0)
        return GUARD_USER;
    if (guard_under(path, "/internal"))
        return GUARD_INTERNAL;
    return GUARD_OPEN;
}

/* Bearer $INTERNAL_TOKEN (backends publishing to SSE clients), compared in
 * constant time; the route checks it again with the same answer. */
static int guard_internal_ok(gateway *gw, httpd_req *req)
{
    const char *hdr = httpd_req_header(req, "Authorization");
    const char *tok = hdr ? jwtauth_bearer(hdr) : NULL;

    if (tok && apiutil_secret_eq(tok, gw->cfg.internal_token))
        return 1;
    httpd_respond_error(req, 401, "unauthorized", "Authorization: Bearer $INTERNAL_TOKEN is required", NULL);
    return 0;
}

int guard_hook(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    const char *path = httpd_req_path(req);
    auth_user *user;

    if (ratelimit_hook(req, gw))
        return 1;
    switch (guard_route_kind(httpd_req_method(req), path)) {
    case GUARD_OPEN:
        if (guard_under(path, "/api/v1/auth"))
            httpd_req_set_max_body(req, GUARD_AUTH_MAX_BODY);
        return 0;
    case GUARD_INGEST:
        return !gateway_ingest_authorized(gw, req);
    case GUARD_INTERNAL:
        return !guard_internal_ok(gw, req);
    case GUARD_USER:
        break;
    }
    user = malloc(sizeof(*user));
    if (!user) {
        httpd_respond_error(req, 503, "unavailable", "out of memory", NULL);
        return 1;
    }
    if (auth_check(gw, req, user) < 0) {
        free(user);
        return 1;
    }
    httpd_req_set_ctx(req, user, free);
    return 0;
}

int guard_front(void *ud, const char *method, const char *path, const char *remote)
{
    gateway *gw = ud;

    /* Only the open routes' verdict is the rate limit alone. */
    if (guard_route_kind(method, path) != GUARD_OPEN || guard_under(path, "/api/v1/auth"))
        return -1;
    return ratelimit_wait(gw, path, remote);
}
