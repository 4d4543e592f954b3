/* pxint: the proxy's internal records, shared by its modules (proxy.c: the
 * registry, routing, the libcurl path and the loops; pxdirect.c: the direct
 * path and its keep-alive pool; pxfront.c: the keep-alive front). Not for
 * the rest of the gateway, which sees proxy.h only.
 *
 * Ownership and threads: a pxloop and everything linked from it (its
 * direct-path connections, its fronts, its running transfers) belong to the
 * loop's thread. A pxreq is shared by the MHD thread and its loop: the
 * fields under `mu` are locked, the rest is the loop's (see struct pxreq);
 * its references are counted (px_unref frees it on the last). A pxfront is
 * created and freed by the front on its loop; `cur` is the pxreq it is
 * answering (NULL while the connection is idle). */
#ifndef AE_PXINT_H
#define AE_PXINT_H

#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <time.h>

#include <curl/curl.h>

#include "breaker.h"
#include "buf.h"
#include "curlep.h"
#include "h1parse.h"
#include "httpstream.h"
#include "proxy.h"
#include "pxhdr.h"

#define PX_IN_MAX (64 * 1024)      /* request body bytes buffered between client and upstream */
#define PX_OUT_MAX (256 * 1024)    /* response bytes buffered for a slow client */
#define PX_SMALL_MAX (64 * 1024)   /* a response declared at most this long is answered whole */
#define PX_HDR_MAX (64 * 1024)     /* response header bytes */
#define PX_PREFIX "/api/v1/"
#define PX_SPARE_EASY 256
/* Body bytes read and thrown away after a chunked upload passed
 * PROXY_MAX_BODY_BYTES, so that a client that writes its whole body before
 * reading sees the 413; past this the connection is closed. */
#define PX_DISCARD_MAX (64LL * 1024 * 1024)
/* Epoll data of a direct-path connection (httpd's own carry bit 62,
 * libcurl's sockets are plain descriptors). */
#define PX_TAG (1ULL << 61)
#define PX_IDLE_MAX 256          /* idle direct connections kept per upstream and loop */
/* Epoll data of a client connection held by the front (see "the front"). */
#define PX_FTAG (1ULL << 60)
#define PX_FRONT_HEAD_MAX 16384  /* a longer request head goes to libmicrohttpd */
#define PX_READ_CHUNK 16384

/* Commands posted to a loop from other threads. */
enum { CMD_ADD = 1, CMD_UNPAUSE_READ = 2, CMD_UNPAUSE_WRITE = 4, CMD_CANCEL = 8 };

typedef struct upstream {
    char name[64];
    char var[80];
    char url[1024];
    long timeout_ms;
    metrics_histogram *latency;
    metrics_gauge *breaker_gauge;
    _Atomic(metrics_counter *) by_status[600];
    /* The direct path (loop mode, http://): the address resolved at start,
     * the Host header and the base path of the URL. */
    int direct;
    int index;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    char hostport[300];
    char base[1024];
} upstream;

typedef struct pxloop pxloop;
typedef struct pxreq pxreq;

/* An upstream connection of the direct path, owned by one loop. */
typedef struct pxconn {
    int fd;
    int slot;
    unsigned gen;
    int up;               /* index of its upstream */
    int connecting;
    int reused;           /* it served a request before this one */
    uint32_t events;      /* what epoll watches */
    pxreq *owner;         /* NULL while idle */
    struct pxconn *next_idle;
    h1_parser p;
} pxconn;

/* What the front keeps of a request for its answer and access log. */
typedef struct {
    char method[8];
    char path[256];
    char rid[72];
    struct timespec t0;
    int keep;             /* the client keeps the connection */
} pxfinfo;

/* A client connection served by the front (loop mode): taken from
 * libmicrohttpd after a first direct-path request, owned by one loop. */
typedef struct pxfront {
    int fd;
    int slot;
    unsigned gen;
    struct sockaddr_storage addr;
    unsigned int alen;
    char remote[64];
    pxreq *cur;           /* the request in flight, NULL while idle */
    buf out;              /* answer bytes the socket has not taken */
    size_t out_off;
    int closing;          /* close once `out` is written */
    int dead;             /* a write failed: the client is gone */
    int readable;         /* input may be waiting (an edge came) */
    int hup;              /* the client shut its side down */
    size_t peeked;        /* bytes the last peek saw */
    int chunked;          /* the answer in flight streams as chunks */
    long long idle_since; /* ms */
    long long stall_ms;   /* ms: since when `out` waits and the socket took none of it (0: none waits) */
} pxfront;

struct pxreq {
    proxy *px;
    pxloop *loop;
    upstream *up;
    atomic_int refs;
    CURL *easy;
    struct curl_slist *hdrs;
    char *url;
    long long start_ms;

    /* Under mu: shared by the MHD thread and the loop. */
    pthread_mutex_t mu;
    httpd_req *req;       /* NULL once answered or gone */
    int client_gone;
    int too_large;        /* a chunked body passed PROXY_MAX_BODY_BYTES: answered 413 */
    int finished;         /* the transfer is over (no more body wanted) */
    char *in;             /* request body waiting for the upstream */
    size_t in_off, in_len;
    int in_eof;
    long long in_total;   /* body bytes received from the client */
    long long discarded;  /* body bytes thrown away after the limit */
    int read_paused;      /* the transfer waits for body bytes */
    int body_blocked;     /* the connection waits for room */
    int cmds;             /* pending commands (linked on loop->cmdq when nonzero) */
    struct pxreq *cmd_next;

    /* The loop's own. */
    int has_body;
    int status;
    int headers_done;
    int streaming;
    int write_paused;
    int breaker_reported;
    long long declared_len;
    buf rh;               /* response header lines kept */
    buf body;             /* a small response, answered whole */
    httpstream *out;
    struct pxreq *next, *prev; /* running transfers of the loop */

    /* The direct path (no libcurl; loop mode only, so the loop's alone). */
    int direct;
    int retried;          /* sent again on a fresh connection once */
    int got_bytes;        /* the upstream answered something */
    int done_pending;     /* the response is complete but the stream was full */
    pxconn *conn;
    buf out_req;          /* the request bytes */
    size_t sent;
    buf stage;            /* body bytes parsed, not yet taken */
    long long deadline;   /* ms: silence (or connect) deadline */

    /* The front's (loop only): the client connection it answers on. */
    pxfront *front;
    int f_streaming;
    pxfinfo fi;
};

struct pxloop {
    proxy *px;
    pthread_t thread;
    int started;
    int epfd, evfd;
    CURLM *multi;
    curlep cep;
    pthread_mutex_t qmu;
    pxreq *cmdq;
    atomic_int stop;
    pxreq *running;
    int nrunning;
    int finished; /* transfers finished since the last tick (loop mode) */
    int external;  /* loop mode: the thread is httpd's loop `owner` */
    pthread_t owner;
    /* Easy handles of finished transfers, reset and reused: creating one
     * costs more than the setup of a request (under qmu). */
    CURL *spare[PX_SPARE_EASY];
    int nspare;
    /* A connection was resumed from this loop this turn (an answer set, a
     * stream written, an upload's room made): libmicrohttpd serves it only
     * on another run. Atomic: the MHD side may set it too (pool mode). */
    atomic_int wrote;
    /* The direct path's connections: slots (epoll data: PX_TAG | gen << 32 |
     * slot) and an idle stack per upstream. */
    pxconn **conns;
    int capconns;
    unsigned gen;
    int *free_slots;
    int nfree;
    pxconn *idle[PROXY_MAX_UPSTREAMS];
    int nidle[PROXY_MAX_UPSTREAMS];
    int nopen[PROXY_MAX_UPSTREAMS];
    long long next_scan;
    long long next_cscan; /* px_client_expire's */
    /* The front's client connections (slots as for `conns`). */
    httpd_loop *hl;
    pxfront **fronts;
    int capfronts;
    unsigned fgen;
    int *ffree;
    int nffree;
    int nfronts;
    long long next_fscan;
    char *peek;           /* PX_FRONT_HEAD_MAX + 1 bytes */
    h1_head head;
    int fdepth, fkick;    /* px_front_settle's nesting; a read left to the tick */
    char date[40];
    time_t date_s;
};

struct proxy {
    proxy_config cfg;
    upstream ups[PROXY_MAX_UPSTREAMS];
    int nups;
    breaker *brk;
    metrics *reg;
    pxloop *loops;
    int nloops;
    atomic_uint rr;
    atomic_int stopping;
    int external; /* the loops are httpd's threads */
    proxy_front_guard guard;
    void *guard_ud;
    metrics_counter *client_timeouts;
};

/* proxy.c's parts the front and the direct path use; all on the loop's
 * thread except px_find, px_each_header and the counters (any thread). */
upstream *px_find(proxy *px, const char *name, size_t n);
/* A transfer record for upstream u on loop l, holding one reference (the
 * caller's: px_unref drops it); NULL when out of memory. */
pxreq *px_req_new(proxy *px, upstream *u, pxloop *l);
void px_unref(pxreq *r);
metrics_counter *px_up_counter(proxy *px, upstream *u, int status);
void px_up_breaker_gauge(proxy *px, upstream *u);
/* Ends a transfer: unlinks it, answers what is unanswered (or the error),
 * the breaker's verdict and the metrics; drops the loop's reference. */
void px_finish(pxloop *l, pxreq *r, CURLcode rc, const char *why);
/* Adds a starting transfer to the loop's running list with the loop's
 * reference (px_finish drops it). */
void px_link(pxloop *l, pxreq *r);
/* A client took no byte of its answer for PROXY_CLIENT_TIMEOUT_MS (u: the
 * service it waited for, NULL if none): counted and logged; the caller cuts
 * it. */
void px_client_timed_out(proxy *px, const upstream *u);
/* Starts the answer once the response headers are in (r->status, r->rh). */
void px_headers_done(pxreq *r);
/* pxhdr_each over an httpd_req's request headers. */
void px_each_header(const void *src, pxhdr_visit visit, void *vud);

#endif
