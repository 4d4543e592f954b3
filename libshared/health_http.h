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

#endif
