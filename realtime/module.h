/* module: how the parts of the realtime program plug into it.
 *
 * realtime/main.c owns the process: configuration, the wsapp server (HTTP
 * and WebSocket on PORT), the dependency checks behind /health, and the
 * order of start and stop. Each part (messaging on /ws, workflow
 * executions on /rt and /executions) is an rt_module listed in main.c's
 * table: it reads its own variables, registers its own routes and health
 * checks, and runs its own threads.
 *
 * Lifecycle, in this order, all from the main thread:
 *   configure (every module)   reads variables; errors go to the cfg
 *   attach    (every module)   registers routes, checks; the server is not yet listening
 *   start     (every module)   after the server listens: threads, timers (via wsapp_post)
 *   stop      (reverse order)  after the loop ended (no callback runs any more);
 *                              free timers here: they need the server
 *   free      (reverse order)  after the server is freed (the close hooks of
 *                              connections still open have run by then)
 * Any hook may be NULL. A module's routes and timers run on the server's
 * loop thread (see wsapp.h); its own threads talk to the loop through
 * wsapp_post. */
#ifndef RT_MODULE_H
#define RT_MODULE_H

#include <cjson/cJSON.h>

#include "cfg.h"
#include "health.h"
#include "metrics.h"
#include "rconn.h"
#include "wsapp.h"

#define RT_VERSION "0.2.0"

/* What the host shares with every module; valid from attach to free. */
typedef struct {
    wsapp *app;
    health *health;        /* add checks in attach (health_add) */
    metrics *metrics;      /* the registry /metrics renders */
    const char *instance_id; /* unique per process: "<hostname>-<pid>-<random>" */
    long long started_ms;  /* svc_now_ms() at start */
    int redis_configured;  /* REDIS_URL (or REDIS_HOST) was set */
    const rconn_opts *redis;
    const char *conninfo;  /* PostgreSQL */
    const char *amqp_url;
} rt_host;

typedef struct {
    const char *name;
    /* Reads the module's configuration (bad values recorded in c). Returns
     * its state, or NULL on OOM. */
    void *(*configure)(cfg *c);
    /* Registers routes and health checks. Returns 0 or -1. */
    int (*attach)(void *state, rt_host *host);
    /* Starts threads and timers. Returns 0 or -1. */
    int (*start)(void *state);
    /* Adds the module's members to the /health body (on the loop thread);
     * returns nonzero when the module makes the service unhealthy, after
     * setting body "reason". */
    int (*health)(void *state, cJSON *body);
    /* Adds the module's members to the /info body (on the loop thread). */
    void (*info)(void *state, cJSON *body);
    void (*stop)(void *state);
    void (*free)(void *state);
} rt_module;

#endif
