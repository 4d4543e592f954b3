/* proxy: the reverse proxy of SPEC 2b, /api/v1/{service}/{path...} to the
 * URL of {SERVICE}_URL.
 *
 * Threads: a request is taken by proxy_take (httpd's stream hook, on the
 * connection's MHD thread) when its headers are in, and deferred: it holds
 * no thread while it waits. Its transfer runs on one of the proxy's event
 * loops (PROXY_LOOPS threads, each an epoll set driving one libcurl multi
 * handle, whose connection cache is the keep-alive pool of every upstream
 * for that loop). The request body moves from the MHD thread to the loop
 * through a bounded buffer (the connection is suspended while it is full,
 * the transfer paused while it is empty), and the response back through an
 * httpstream (the transfer paused while the client is slow). Everything a
 * transfer owns is touched by its loop only, except the few fields under
 * its own lock (see pxint.h). The breaker is shared and locked. */
#ifndef AE_PROXY_H
#define AE_PROXY_H

#include <cjson/cJSON.h>

#include "cfg.h"
#include "httpd.h"
#include "metrics.h"

typedef struct proxy proxy;

#define PROXY_MAX_UPSTREAMS 64

typedef struct {
    long timeout_ms;          /* PROXY_TIMEOUT_MS: no byte from the upstream for this long: 504 (or the stream is cut) */
    long connect_timeout_ms;  /* PROXY_CONNECT_TIMEOUT_MS */
    long client_timeout_ms;   /* PROXY_CLIENT_TIMEOUT_MS: a client that takes no byte of its answer for this
                                 long is cut (its connection closed, the upstream released) */
    int breaker_threshold;    /* PROXY_BREAKER_THRESHOLD consecutive failures open it (0: off) */
    long breaker_cooldown_ms; /* PROXY_BREAKER_COOLDOWN_MS */
    int loops;                /* PROXY_LOOPS event-loop threads */
    int httpd_loops;          /* > 0: run on httpd's loops instead (HTTP_LOOPS; see proxy_loop_hooks) */
    int max_conns_per_upstream; /* PROXY_MAX_CONNECTIONS_PER_UPSTREAM (per loop) */
    long long max_body;       /* PROXY_MAX_BODY_BYTES: a larger body is 413 */
    int direct;               /* PROXY_DIRECT (1): in loop mode, requests without a body to an
                                 http:// upstream skip libcurl (see pxdirect.c) */
    int front;                /* PROXY_FRONT (1): in loop mode, a kept-alive client connection of
                                 direct-path requests leaves libmicrohttpd (see pxfront.c) */
    int nupstreams;
    struct proxy_upstream_cfg {
        char name[64];        /* my_service */
        char var[80];         /* MY_SERVICE_URL */
        char url[1024];       /* without a trailing slash */
        long timeout_ms;      /* {NAME}_TIMEOUT_MS, else timeout_ms */
    } upstreams[PROXY_MAX_UPSTREAMS];
} proxy_config;

/* Reads the proxy settings and registers a service for every {NAME}_URL
 * variable of the environment that holds an http(s) URL (other schemes,
 * DATABASE_URL and the like, are not services). A reserved name (a native
 * route: auth, triggers, chain_events, events, health) or a URL that
 * points at this gateway (`self_host`:`self_port`) is a configuration
 * error recorded in `c`. */
void proxy_config_read(cfg *c, proxy_config *out, const char *self_host, int self_port);

/* Creates the proxy and starts its loops. NULL on failure (reason in err).
 * `reg` holds its metrics. Free with proxy_free. */
proxy *proxy_new(const proxy_config *pc, metrics *reg, char *err, size_t errlen);

/* Answers every transfer still running (503, or a cut stream) after up to
 * grace_ms, then stops the loops. New requests get 503. */
void proxy_stop(proxy *px, int grace_ms);

void proxy_free(proxy *px);

/* Loop mode: the hooks that run the proxy's transfers on httpd's loop
 * threads (one libcurl multi handle in each loop's epoll set), so a request
 * and its transfer never change threads. */
void proxy_loop_hooks(proxy *px, httpd_loop_hooks *h);

/* httpd's stream hooks (ud: the proxy): proxy_claims is nonzero for
 * /api/v1/{service}/... of a registered service; proxy_take forwards it
 * (deferred), or answers at once (breaker open, bad path, stopping). */
int proxy_claims(httpd_req *req, void *ud);
int proxy_take(httpd_req *req, void *ud);

/* What the front (pxfront.c) asks before it serves a request itself, in
 * place of httpd's hook: 0 to go on, > 0 to answer 429 with that many
 * seconds in Retry-After (rate limited), < 0 to leave the request to
 * libmicrohttpd and the hook (anything but the plain proxied case). `path`
 * is the request's path (no query, nothing to decode). Loop threads. */
typedef int (*proxy_front_guard)(void *ud, const char *method, const char *path, const char *remote);
void proxy_set_front_guard(proxy *px, proxy_front_guard fn, void *ud);

/* httpd's fallback (ud: the proxy): 404 for /api/v1/{unknown}/..., naming
 * the variable that would register it; the plain 404 elsewhere. */
void proxy_fallback(httpd_req *req, void *ud);

/* The upstreams as [{"name","url","breaker"}] (new cJSON array, owned by the
 * caller), for /health. */
cJSON *proxy_health(proxy *px);

#endif
