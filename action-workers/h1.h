/* h1: a small HTTP/1.1 client for plain http:// REST deliveries, driven by
 * the worker thread's own epoll loop (no thread, no libcurl).
 *
 * It does only what a webhook POST needs: a bounded pool of keep-alive
 * connections per host (key + pinned address), a non-blocking connect to
 * the address target.c already checked, one request at a time per
 * connection, and a response parser (status line, headers, Content-Length,
 * chunked or read-to-close bodies). A connection is reused only after a
 * complete response. A request that fails on a reused connection before
 * any response byte arrived (the peer closed an idle keep-alive) is sent
 * once more on a fresh connection. Everything else is reported as an
 * h1_err, which the caller maps onto the libcurl codes so that outcomes are
 * classified exactly as for libcurl transfers. https is spoken with
 * OpenSSL on the same loop when the pool has a TLS context (h1_tls): the
 * peer's chain, dates and name are verified as libcurl verifies them, and
 * a failure names the check. Redirects, proxies and authentication are
 * libcurl's business. */
#ifndef AW_H1_H
#define AW_H1_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "buf.h"
#include "h1parse.h"

/* How a request ended. */
typedef enum {
    H1_OK = 0,
    H1_E_TIMEOUT,  /* timeout_ms passed */
    H1_E_CONNECT,  /* connect failed (refused, unreachable, no slot) */
    H1_E_SEND,     /* sending the request failed */
    H1_E_RECV,     /* receiving failed */
    H1_E_NOTHING,  /* the peer closed without answering */
    H1_E_PROTO,    /* the answer is not HTTP/1.x or breaks a limit */
    H1_E_PARTIAL,  /* the peer closed in the middle of the body */
    H1_E_NOMEM,
    H1_E_TLS_VERIFY, /* the peer's certificate did not verify (detail says why) */
    H1_E_TLS         /* the TLS handshake or a TLS record failed */
} h1_err;


/* ---- The connection pool and requests. ---- */

/* Epoll events of the pool's sockets carry this bit in data.u64 (the other
 * bits are the connection's generation and index), so a loop sharing its epoll set with
 * other sockets (data.fd) can tell them apart. */
#define H1_TAG (1ULL << 62)

typedef struct h1_pool h1_pool;
typedef struct h1_req h1_req;
typedef struct h1_tls h1_tls;

/* A client TLS context: TLS 1.2 or later, peers verified against the CA
 * certificates in the PEM file `ca_file` (NULL or "": the system store).
 * Shared by the pools of every thread (OpenSSL's contexts are thread-safe
 * once set up). NULL with the reason in err. Free with h1_tls_free, after
 * every pool using it. */
h1_tls *h1_tls_new(const char *ca_file, char *err, size_t errlen);
void h1_tls_free(h1_tls *t);

typedef struct {
    const char *key;                /* pool key, e.g. "host:port" ("https://host:port" for TLS) */
    const struct sockaddr *addr;    /* where to connect (pinned address) */
    socklen_t addrlen;
    const char *data;               /* the request bytes, kept alive by the caller until done */
    size_t len;
    long timeout_ms;                /* whole request, connect included */
    int head_only;                  /* HEAD request */
    buf *body;                      /* response body (bounded by the buf) */
    h1_header_fn on_header;
    void *ud;                       /* handed back on completion and to on_header */
    const char *tls_host;           /* https: the name (or IP literal) to verify and send
                                       as SNI; NULL for plain http */
} h1_request;

/* A pool of at most `max_conns` connections (busy and idle) registered in
 * the epoll set `epfd`, keeping at most `max_idle_per_host` idle ones per
 * key; `tls` (borrowed, may be NULL: plain http only) serves requests with
 * a tls_host. NULL on OOM. Free with h1_pool_free (closes everything;
 * requests still running are dropped without completion). */
h1_pool *h1_pool_new(int epfd, int max_conns, int max_idle_per_host, h1_tls *tls);
void h1_pool_free(h1_pool *p);

/* Starts a request at time `now` (ms). Returns 0 with the request in `*out`
 * (to h1_cancel it), or -1 on OOM. Failures after that, even immediate
 * ones, are reported through h1_next_done. */
int h1_start(h1_pool *p, const h1_request *rq, long long now, h1_req **out);

/* Abandons a request that has not been collected by h1_next_done: its
 * connection is closed and it is freed. NULL is a no-op. */
void h1_cancel(h1_pool *p, h1_req *r);

/* Handles an epoll event whose data.u64 has H1_TAG. */
void h1_event(h1_pool *p, uint64_t tag, uint32_t events, long long now);

/* The earliest request deadline (ms), or -1 when nothing runs. */
long long h1_next_due(const h1_pool *p);

/* Fails the requests whose deadline passed with H1_E_TIMEOUT. */
void h1_expire(h1_pool *p, long long now);

/* Takes one finished request: returns its h1_err and fills `*ud`,
 * `*status` (the HTTP status, 0 when none) and `detail` (dlen bytes: why a
 * TLS failure happened, "" otherwise), or returns -1 when none is
 * finished. The request is freed. */
int h1_next_done(h1_pool *p, void **ud, long *status, char *detail, size_t dlen);

/* A short description of an h1_err (static). */
const char *h1_strerror(int err);

#endif
