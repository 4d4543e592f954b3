#include <string.h>

#include "gateway.h"
#include "log.h"
#include "migrate.h"

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

static void health_live(httpd_req *req, void *ud)
{
    (void)ud;
    httpd_respond_static(req, 200, "application/json", live_body, sizeof(live_body) - 1);
}

int gateway_health_routes(gateway *gw)
{
    if (httpd_route(gw->http, "GET", "/api/v1/health", health_api, gw) < 0 ||
        httpd_route(gw->http, "GET", "/health", health_live, gw) < 0 || httpd_route_metrics(gw->http) < 0)
        return -1;
    return 0;
}

int gateway_db_check(void *ud)
{
    gateway *gw = ud;
    char err[512];
    int rc, applied = 0;

    if (!gw->migrated) {
        PGconn *conn = dbpool_acquire(gw->db, 2000);

        if (!conn)
            return -1;
        rc = migrate_run(conn, gw->cfg.migrations_dir, &applied, err, sizeof(err));
        dbpool_release(gw->db, conn);
        if (rc < 0) {
            log_error("migrations failed: %s", err);
            return -1;
        }
        gw->migrated = 1;
    }
    return dbpool_ping(gw->db, 2000);
}
