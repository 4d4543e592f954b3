/* gateway: the API gateway's shared context, built once in main() and read
 * by every route module. After start-up it is read-only except for the
 * objects that document their own thread safety (pool, health, limiter). */
#ifndef AE_GATEWAY_H
#define AE_GATEWAY_H

#include "cfg.h"
#include "dbpool.h"
#include "deps.h"
#include "health.h"
#include "httpd.h"
#include "jwtauth.h"
#include "proxy.h"
#include "sse.h"

typedef struct ratelimit ratelimit;
typedef struct revocation revocation;
typedef struct loginguard loginguard;

#define GATEWAY_VERSION "0.1.0"

typedef struct {
    char host[256];
    int port;
    int threads;
    long max_body;
    int max_connections;
    int max_connections_per_ip;
    long conn_memory;
    int loops; /* HTTP_LOOPS: 0 for libmicrohttpd's thread pool */
    long header_timeout_ms; /* -1: off */
    char cors_origins[1024];
    long rate_limit_per_min;
    long access_token_ttl_s;
    long token_cache_ttl_ms;
    int login_max_failures;
    long login_backoff_max_ms;
    int login_max_hashes;
    long refresh_token_ttl_s;
    long health_interval_ms;
    int db_max_connections;
    int access_log;
    char conninfo[2048];
    char migrations_dir[1024];
    char jwt_secret[512];
    char ingest_token[512];
    char internal_token[512];
    proxy_config proxy;
    sse_config sse;
} gateway_config;

typedef struct {
    gateway_config cfg;
    dbpool *db;
    health *health;
    int health_db;     /* index of the database check in `health` */
    deps_pgmig *pgmig; /* the database check (migrations, then a ping) */
    jwtauth *jwt;
    httpd *http;
    ratelimit *limiter; /* NULL when RATE_LIMIT=0 */
    revocation *revocation;
    loginguard *logins;
    proxy *proxy;
    sse *sse;
    /* A yescrypt hash of a random password, computed at start: a login for
     * an unknown user is checked against it so that it costs the same time
     * as a wrong password for a real one. */
    char dummy_hash[256];
} gateway;

/* SSE streams held by this instance (0 before SSE starts). */
long gateway_sse_clients(gateway *gw);

/* Reads every setting; problems are recorded in `c`. */
void gateway_config_read(cfg *c, gateway_config *out);

/* Registers GET /health, GET /api/v1/health and GET /metrics. */
int gateway_health_routes(gateway *gw);

/* Registers the REST API routes of each module (auth.c, triggers.c,
 * chain_events.c, results.c). Each returns 0 or -1. */
int gateway_auth_routes(gateway *gw);
int gateway_trigger_routes(gateway *gw);
int gateway_chain_event_routes(gateway *gw);
int gateway_result_routes(gateway *gw);

/* Checks "Authorization: Bearer $INGEST_TOKEN" in constant time. Returns 1,
 * or answers 401 and returns 0. */
int gateway_ingest_authorized(gateway *gw, httpd_req *req);

#endif
