/* health_http: the JSON health route every service shares. */
#ifndef AE_HEALTH_HTTP_H
#define AE_HEALTH_HTTP_H

#include "health.h"
#include "httpd.h"

/* Registers GET `path` answering 200 {"status":"ok","service","version",
 * "uptime_seconds","checks":{name:"up"|"down"}} when every check passed,
 * else 503 with "status":"unhealthy". `service` and `version` must
 * outlive the server. Returns 0 or -1. */
int health_http_route(httpd *srv, const char *path, health *h, const char *service, const char *version);

/* Registers extra routes on a server before it starts; returns 0 or -1. */
typedef int (*health_http_extra_fn)(httpd *srv, void *ud);

/* The health endpoint of a background service (the event-processor and the
 * action-workers): starts the health thread, then serves GET /health and
 * GET /metrics (plus whatever `extra` registers, may be NULL) on host:port
 * with one worker thread and no access log. Returns the running server,
 * freed with httpd_free, or NULL with the reason in err. */
httpd *health_http_serve(const char *service, const char *version, const char *host, int port, health *h,
                         health_http_extra_fn extra, void *ud, char *err, size_t errlen);

#endif
