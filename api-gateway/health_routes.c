#include <string.h>

#include "gateway.h"
#include "log.h"

static const char health_ok_body[] = "{\"status\":\"healthy\",\"database\":\"connected\",\"version\":\"" GATEWAY_VERSION "\"}";
static const char health_bad_body[] =
    "{\"status\":\"unhealthy\",\"database\":\"disconnected\",\"version\":\"" GATEWAY_VERSION "\"}";
static const char live_body[] = "{\"status\":\"ok\",\"service\":\"api-gateway\",\"version\":\"" GATEWAY_VERSION "\"}";

/* Answers from the state the health thread keeps: the route is hit by load
 * balancers many times a second and must never wait on the database. */
static void health_api(httpd_req *req, void *ud)
{
    gateway *gw = ud;

    if (health_check_ok(gw->health, gw->health_db))
        httpd_respond_static(req, 200, "application/json", health_ok_body, sizeof(health_ok_body) - 1);
    else
        httpd_respond_static(req, 503, "application/json", health_bad_body, sizeof(health_bad_body) - 1);
}

/* Liveness, with what SPEC 2b adds: the SSE clients held and the proxy's
 * upstreams with their breaker state (all from memory). */
static void health_live(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    cJSON *o = cJSON_CreateObject();

    if (!o) {
        httpd_respond_static(req, 200, "application/json", live_body, sizeof(live_body) - 1);
        return;
    }
    cJSON_AddStringToObject(o, "status", "ok");
    cJSON_AddStringToObject(o, "service", "api-gateway");
    cJSON_AddStringToObject(o, "version", GATEWAY_VERSION);
    cJSON_AddNumberToObject(o, "sse_clients", (double)gateway_sse_clients(gw));
    cJSON_AddItemToObject(o, "upstreams", proxy_health(gw->proxy));
    httpd_respond_json(req, 200, o);
}

int gateway_health_routes(gateway *gw)
{
    if (httpd_route(gw->http, "GET", "/api/v1/health", health_api, gw) < 0 ||
        httpd_route(gw->http, "GET", "/health", health_live, gw) < 0 || httpd_route_metrics(gw->http) < 0)
        return -1;
    return 0;
}
