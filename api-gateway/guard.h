/* guard: what the gateway decides on a request's headers, before any of
 * its body is read (the httpd hook): the per-address rate limit, a small
 * body limit for the routes anyone may call, and authentication of the
 * routes that need it (user token, ingest token, internal token), so that an unauthenticated client never makes the
 * gateway hold a body.
 *
 * A user request that passes carries its auth_user as the request's ctx
 * (httpd_req_set_ctx), which auth_require returns without checking the
 * token a second time. */
#ifndef AE_GUARD_H
#define AE_GUARD_H

#include "gateway.h"

/* Largest body taken by the account routes (/api/v1/auth/...): their JSON is
 * a few hundred bytes, and they are open to anyone. */
#define GUARD_AUTH_MAX_BODY (16 * 1024)

/* The httpd hook; `ud` is the gateway. Returns nonzero when it answered
 * (429, 401, 413). */
int guard_hook(httpd_req *req, void *ud);
/* guard_hook's verdict for the proxy's front (proxy_front_guard): -1 for a
 * request the hook would do more for than rate limiting. */
int guard_front(void *ud, const char *method, const char *path, const char *remote);

#endif
