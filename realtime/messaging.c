/* messaging: /ws (SPEC 5a). First cut: the handshake with its JWT and the
 * connected Status; the frames follow. */
#include "messaging.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "jwtauth.h"
#include "log.h"

typedef struct {
    long max_connections;
    jwtauth *jwt;
    rt_host *host;
} messaging;

typedef struct {
    int unused;
} msg_conn;

static void *messaging_configure(cfg *c)
{
    messaging *m = calloc(1, sizeof(*m));
    const char *secret = cfg_secret(c, "JWT_SECRET", "dev-jwt-secret-change-me");

    if (!m)
        return NULL;
    m->max_connections = cfg_int(c, "MAX_CONNECTIONS", 10000, 1, 1000000);
    m->jwt = jwtauth_new(secret, cfg_str(c, "JWT_ISSUER", NULL), cfg_str(c, "JWT_AUDIENCE", NULL), 0);
    return m;
}

static int messaging_accept(wsapp_req *req, void *user, void *ud)
{
    messaging *m = ud;
    const char *tok = wsapp_req_query(req, "token");
    int rc;

    (void)user;
    if (wsapp_conn_count(m->host->app) >= m->max_connections) {
        wsapp_respond(req, 503, "application/json", "{\"error\":\"Server at capacity\"}", 30);
        return -1;
    }
    if (!tok)
        tok = wsapp_req_query(req, "access_token");
    if (!tok)
        tok = jwtauth_bearer(wsapp_req_header(req, "Authorization"));
    rc = tok ? jwtauth_verify(m->jwt, tok, NULL) : JWTAUTH_EMISSING;
    if (rc != JWTAUTH_OK) {
        wsapp_respond_error(req, 401, "unauthorized", tok ? jwtauth_message(rc) : "missing token", NULL);
        return -1;
    }
    return 0;
}

static void messaging_open(wsapp_conn *c, void *user, void *ud)
{
    char out[256];
    int n;

    (void)user;
    (void)ud;
    n = snprintf(out, sizeof(out),
                 "{\"type\":\"Status\",\"data\":{\"status\":\"connected\",\"details\":{\"connection_id\":\"%llu\","
                 "\"server_time\":%lld,\"protocol_version\":\"1.0\"}}}",
                 (unsigned long long)wsapp_conn_id(c), (long long)time(NULL));
    wsapp_conn_send_text(c, out, (size_t)n);
}

static int messaging_attach(void *state, rt_host *host)
{
    messaging *m = state;
    wsapp_ws_handlers h = {0};

    m->host = host;
    h.user_size = sizeof(msg_conn);
    h.accept = messaging_accept;
    h.open = messaging_open;
    return m->jwt ? wsapp_ws_route(host->app, "/ws", &h, m) : -1;
}

static int messaging_health(void *state, cJSON *body)
{
    messaging *m = state;
    int n = wsapp_conn_count(m->host->app);

    cJSON_AddNumberToObject(body, "active_connections", n);
    cJSON_AddNumberToObject(body, "max_connections", (double)m->max_connections);
    if (n >= m->max_connections) {
        cJSON_AddStringToObject(body, "reason", "At capacity");
        return 1;
    }
    return 0;
}

static void messaging_free(void *state)
{
    messaging *m = state;

    jwtauth_free(m->jwt);
    free(m);
}

const rt_module messaging_module = {
    .name = "messaging",
    .configure = messaging_configure,
    .attach = messaging_attach,
    .health = messaging_health,
    .free = messaging_free,
};
