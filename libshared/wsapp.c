/* wsapp: HTTP and WebSocket on one port over libwebsockets 4.1 (see
 * wsapp.h for the model). */
#include "wsapp.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ev.h>
#include <libwebsockets.h>

#include "buf.h"
#include "jget.h"
#include "fmt.h"
#include "httpd.h"
#include "log.h"
#include "svc.h"

#define WSAPP_MAX_ROUTES 64
#define WSAPP_MAX_RESP_HEADERS 16
/* The private header that carries the client's Sec-WebSocket-Protocol past
 * lws (lower case: lws stores unknown header names lowered). */
#define WSAPP_SUBPROTO_HDR "x-wsapp-subprotocol:"
/* Bytes lws keeps per connection to reassemble a frame; messages larger
 * than this arrive in pieces that wsapp joins (up to max_frame). The
 * buffer lives as long as the connection, so it is most of the cost of an
 * idle one. */
#define WSAPP_RX_CHUNK 1024
/* Frames of several queued messages are joined into one write of up to
 * this many bytes, so a burst costs one system call per connection. */
#define WSAPP_WRITE_CHUNK 65536
/* Connections written per loop turn by wsapp_flush. A fan-out to 10,000
 * takes tens of milliseconds of sends; in slices this size the loop reads
 * between them, so a frame queued meanwhile joins the writes still to come
 * (those connections get both in one send) instead of waiting for the
 * whole sweep to end and then for a sweep of its own. */
#define WSAPP_FLUSH_BATCH 256
/* Frame header bytes reserved in front of every message's payload. */
#define WSAPP_FRAME_ROOM 10
/* A request head is read into a buffer that starts this small and doubles
 * up to max_header: a connection that trickles its head holds what it
 * sent, not the limit. */
#define WSAPP_HEAD_CHUNK 1024
/* An oversized message is discarded (too_big, the connection lives on)
 * until this many times max_frame have come; then it is closed 1009, so a
 * frame announcing 2^62 bytes cannot keep a connection busy for ever. */
#define WSAPP_DISCARD_FACTOR 16
/* How often the messages in progress are checked against their deadline. */
#define WSAPP_SWEEP_MS 1000
/* How long a closing connection's queue and close frame may take to go
 * out before the socket is dropped: a peer we close politely, and one
 * closed for misbehaving. */
#define WSAPP_CLOSE_GRACE_MS 10000
#define WSAPP_CUT_GRACE_MS 5000

enum { WSAPP_KIND_REQ = 1, WSAPP_KIND_CONN = 2, WSAPP_KIND_HEAD = 3 };

typedef struct {
    char method[8];
    char *path;
    size_t plen;
    int prefix;
    wsapp_http_fn fn;
    void *ud;
} wsapp_http_route;

typedef struct {
    char *path;
    size_t plen;
    int prefix;
    wsapp_ws_handlers h;
    void *ud;
} wsapp_ws_route_t;

struct wsapp_msg {
    atomic_int refs;
    int binary;
    size_t len;   /* payload bytes */
    size_t cap;   /* payload capacity */
    size_t hdr;   /* frame header bytes, in front of the payload */
    unsigned char mem[]; /* LWS_PRE + WSAPP_FRAME_ROOM + cap */
};

typedef struct wsapp_strnode {
    struct wsapp_strnode *next;
    char s[];
} wsapp_strnode;

struct wsapp_req {
    int kind; /* WSAPP_KIND_REQ: first, so the opaque pointer tells its type */
    wsapp *app;
    struct lws *wsi;
    const wsapp_http_route *route;
    char method[8];
    char *path;
    char request_id[72];
    char remote[48];
    long long start_ms;
    buf body;
    size_t content_length;
    int has_body, body_too_big, head_only, dispatched, deferred, answered, close_after;
    int status, headers_sent, is_ws;
    unsigned char *resp; /* LWS_PRE headroom, then the body */
    size_t resp_len, resp_off;
    char ctype[96];
    char *hname[WSAPP_MAX_RESP_HEADERS], *hval[WSAPP_MAX_RESP_HEADERS];
    int nhdr;
    wsapp_strnode *strs;
    char *subprotos;
    char *subproto_chosen;
    void (*on_gone)(wsapp_req *req, void *ud);
    void *gone_ud;
    wsapp_stream *stream; /* a streamed answer's, until it ends or is refused */
    wsapp_req *sprev, *snext; /* in app->streaming while `stream` is set */
    int streamed;         /* wsapp_req_stream was called: on_gone at the free */
    int chunked;          /* answered by its stream: the body goes out as it comes */
    int http10;           /* an HTTP/1.0 request: no chunks, the end is the close */
};

struct wsapp_conn {
    int kind; /* WSAPP_KIND_CONN */
    unsigned established : 1, closing : 1, dropped : 1, ping : 1, discarding : 1, rx_binary : 1, told : 1;
    unsigned want_raw : 1, raw_mid : 1;
    struct lws *wsi;
    wsapp *app;
    const wsapp_ws_route_t *route;
    wsapp_conn *prev, *next;
    uint64_t id;
    long long last_rx_ms;
    long long msg_since_ms; /* first byte of the message in progress; 0: none */
    long long kill_at_ms;   /* a cut peer is dropped then even if it reads nothing */
    wsapp_msg **q;
    uint32_t qhead, qcount, qcap;
    size_t qbytes;
    char *rx;
    size_t rxlen;
    size_t rx_charged; /* bytes of rx counted in wsapp_rx_held */
    char *subproto; /* echoed in the handshake, then freed */
    char *close_reason;
    int close_code;
    uint32_t dirty_at; /* its slot in app->dirty while queued there, else UINT32_MAX */
    char remote[46];
};

/* A connection being read up to the end of its request head. */
typedef struct {
    int kind; /* WSAPP_KIND_HEAD */
    ev_timer deadline;
    struct wsapp *app;
    struct lws *wsi;
    size_t len, cap; /* bytes peeked into data, its size */
    size_t lowat;    /* SO_RCVLOWAT set on the socket (0: the default) */
    char *data;
} wsapp_head;

struct wsapp_timer {
    ev_timer ev; /* first: the libev callback gets its address */
    wsapp *app;
    void (*fn)(wsapp_timer *t, void *ud);
    void *ud;
};

typedef struct wsapp_post_item {
    struct wsapp_post_item *next;
    void (*fn)(wsapp *app, void *ud);
    void *ud;
    int embedded; /* part of its owner (a stream's kick), not freed after it runs */
} wsapp_post_item;

struct wsapp {
    wsapp_opts o;
    char service[64];
    char host[256];
    struct lws_context *ctx;
    struct lws_vhost *vh;
    struct lws_protocols protocols[3];
    struct lws *listen_wsi;
    int listen_fd, port;
    wsapp_http_route http[WSAPP_MAX_ROUTES];
    int nhttp;
    wsapp_ws_route_t ws[WSAPP_MAX_ROUTES];
    int nws;
    wsapp_conn *conns; /* open (established) connections */
    int nconns, nsockets, http_inflight;
    uint64_t next_id;
    pthread_t thread;
    struct ev_loop *loop; /* libev (epoll): poll(2) over every socket per turn costs too much at 10,000 */
    int started, joined;
    atomic_int stopping, done;
    long long stop_deadline_ms;
    int stop_phase;
    pthread_mutex_t post_lock;
    wsapp_post_item *posts, *posts_tail;
    wsapp_req *streaming; /* requests with a stream (wsapp_req_stream), loop thread only */
    /* By descriptor: whether the connection's first request line said
     * HTTP/1.0 (lws 4.1 keeps a server request's version to itself). */
    unsigned char *http10;
    size_t nhttp10;
    unsigned char *scratch; /* LWS_PRE + WSAPP_WRITE_CHUNK, loop thread only */
    /* Connections whose queue went from empty to not empty, in that order:
     * a ring (dirty_cap a power of two) that wsapp_flush writes from its
     * head, WSAPP_FLUSH_BATCH per loop turn; while it is not empty the
     * idle watcher keeps the loop from blocking. */
    wsapp_conn **dirty;
    uint32_t dirty_head, ndirty, dirty_cap;
    ev_prepare flush;
    ev_idle flush_more;
    metrics_counter *m_http[6];
    metrics_gauge *m_conns;
    metrics_counter *m_opened, *m_dropped, *m_oversize, *m_refused, *m_head_timeouts, *m_msg_timeouts;
    metrics_counter *m_msg_memory_cuts;
    metrics_gauge *m_msg_memory; /* this app's share of wsapp_rx_held */
    ev_timer sweep; /* messages in progress against message_timeout_ms, closes against their grace */
};

/* Bytes held by unfinished incoming messages, over every wsapp of the
 * process (each runs its own loop thread, hence atomic). */
static atomic_size_t wsapp_rx_held;

/* ---- small helpers ------------------------------------------------------ */

static char *wsapp_strndup(const char *s, size_t n)
{
    char *p = malloc(n + 1);

    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

static int wsapp_path_matches(const char *rpath, size_t rlen, int prefix, const char *path)
{
    if (prefix)
        return strncmp(path, rpath, rlen) == 0;
    return strcmp(path, rpath) == 0;
}

static int wsapp_parse_pattern(const char *path, char **out, size_t *len, int *prefix)
{
    size_t n = strlen(path);

    if (n == 0 || path[0] != '/')
        return -1;
    *prefix = path[n - 1] == '*';
    if (*prefix)
        n--;
    *out = wsapp_strndup(path, n);
    *len = n;
    return *out ? 0 : -1;
}

static int wsapp_status_class(int status)
{
    int c = status / 100;

    return c >= 1 && c <= 5 ? c : 0;
}

/* ---- messages ----------------------------------------------------------- */

static unsigned char *wsapp_msg_payload(wsapp_msg *m) { return m->mem + LWS_PRE + WSAPP_FRAME_ROOM; }

wsapp_msg *wsapp_msg_new_text(size_t cap)
{
    wsapp_msg *m;

    if (cap > (1u << 30))
        return NULL;
    m = malloc(sizeof(*m) + LWS_PRE + WSAPP_FRAME_ROOM + cap + 1);
    if (!m)
        return NULL;
    atomic_init(&m->refs, 1);
    m->binary = 0;
    m->len = 0;
    m->cap = cap;
    m->hdr = 0;
    return m;
}

char *wsapp_msg_data(wsapp_msg *m) { return (char *)wsapp_msg_payload(m); }

size_t wsapp_frame_header(unsigned char *out, size_t len, int binary)
{
    unsigned char op = binary ? 0x82 : 0x81;

    out[0] = op;
    if (len < 126) {
        out[1] = (unsigned char)len;
        return 2;
    }
    if (len < 65536) {
        out[1] = 126;
        out[2] = (unsigned char)(len >> 8);
        out[3] = (unsigned char)len;
        return 4;
    }
    out[1] = 127;
    for (int i = 0; i < 8; i++)
        out[9 - i] = (unsigned char)((uint64_t)len >> (8 * i));
    return 10;
}

/* Server frames are unmasked, so one header serves every receiver. */
void wsapp_msg_set_len(wsapp_msg *m, size_t len)
{
    unsigned char *p = wsapp_msg_payload(m);
    unsigned char h[10];

    if (len > m->cap)
        len = m->cap;
    m->len = len;
    m->hdr = wsapp_frame_header(h, len, m->binary);
    memcpy(p - m->hdr, h, m->hdr);
}

wsapp_msg *wsapp_msg_new(const void *data, size_t len, int binary)
{
    wsapp_msg *m = wsapp_msg_new_text(len);

    if (!m)
        return NULL;
    m->binary = binary != 0;
    if (len)
        memcpy(wsapp_msg_payload(m), data, len);
    wsapp_msg_set_len(m, len);
    return m;
}

void wsapp_msg_ref(wsapp_msg *m) { atomic_fetch_add_explicit(&m->refs, 1, memory_order_relaxed); }

void wsapp_msg_unref(wsapp_msg *m)
{
    if (m && atomic_fetch_sub_explicit(&m->refs, 1, memory_order_acq_rel) == 1)
        free(m);
}

static size_t wsapp_msg_wire(const wsapp_msg *m) { return m->hdr + m->len; }

/* ---- connections -------------------------------------------------------- */

void *wsapp_conn_user(wsapp_conn *c)
{
    return (char *)c + ((sizeof(*c) + 15) & ~(size_t)15);
}

void *wsapp_conn_route_ud(const wsapp_conn *c) { return c->route->ud; }
uint64_t wsapp_conn_id(const wsapp_conn *c) { return c->id; }
const char *wsapp_conn_remote(const wsapp_conn *c) { return c->remote; }
long long wsapp_conn_last_rx_ms(const wsapp_conn *c) { return c->last_rx_ms; }
size_t wsapp_conn_queued(const wsapp_conn *c) { return c->qbytes; }
int wsapp_conn_count(const wsapp *app) { return app->nconns; }

static void wsapp_conn_clear_queue(wsapp_conn *c)
{
    while (c->qcount) {
        wsapp_msg_unref(c->q[c->qhead]);
        c->qhead = (c->qhead + 1) % c->qcap;
        c->qcount--;
    }
    free(c->q);
    c->q = NULL;
    c->qcap = c->qhead = 0;
    c->qbytes = 0;
}

static void wsapp_conn_drop(wsapp_conn *c)
{
    if (c->dropped)
        return;
    c->dropped = 1;
    c->closing = 1;
    wsapp_conn_clear_queue(c);
    metrics_counter_inc(c->app->m_dropped);
    if (c->wsi)
        lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_REASON_BASE, LWS_TO_KILL_ASYNC);
}

/* Doubles the ring of dirty connections, its entries moved to the front
 * in order (each one's dirty_at follows). -1 on OOM. */
static int wsapp_dirty_grow(wsapp *app)
{
    uint32_t ncap = app->dirty_cap ? app->dirty_cap * 2 : 256;
    wsapp_conn **nd = malloc(ncap * sizeof(*nd));

    if (!nd)
        return -1;
    for (uint32_t i = 0; i < app->ndirty; i++) {
        nd[i] = app->dirty[(app->dirty_head + i) & (app->dirty_cap - 1)];
        if (nd[i])
            nd[i]->dirty_at = i;
    }
    free(app->dirty);
    app->dirty = nd;
    app->dirty_cap = ncap;
    app->dirty_head = 0;
    return 0;
}

/* Queues c for wsapp_flush; -1 when out of memory (the caller falls back
 * to a writable callback). */
static int wsapp_conn_mark_dirty(wsapp_conn *c)
{
    wsapp *app = c->app;

    if (app->ndirty == app->dirty_cap && wsapp_dirty_grow(app) < 0)
        return -1;
    c->dirty_at = (app->dirty_head + app->ndirty++) & (app->dirty_cap - 1);
    app->dirty[c->dirty_at] = c;
    return 0;
}

int wsapp_conn_send(wsapp_conn *c, wsapp_msg *m)
{
    size_t wire = wsapp_msg_wire(m);

    if (c->closing || !c->wsi)
        return -1;
    /* One frame larger than the whole queue still goes out alone: its
     * producer bounded it; only a backlog marks a slow reader. */
    if (c->qcount > 0 && c->qbytes + wire > c->app->o.send_queue_bytes) {
        log_event(LOG_WARN, "websocket reader too slow, dropped",
                  "\"connection_id\":%llu,\"queued_bytes\":%zu", (unsigned long long)c->id, c->qbytes);
        wsapp_conn_drop(c);
        return -1;
    }
    if (c->qcount == c->qcap) {
        uint32_t ncap = c->qcap ? c->qcap * 2 : 4;
        wsapp_msg **nq = malloc(ncap * sizeof(*nq));

        if (!nq)
            return -1;
        for (uint32_t i = 0; i < c->qcount; i++)
            nq[i] = c->q[(c->qhead + i) % c->qcap];
        free(c->q);
        c->q = nq;
        c->qcap = ncap;
        c->qhead = 0;
    }
    wsapp_msg_ref(m);
    c->q[(c->qhead + c->qcount) % c->qcap] = m;
    c->qcount++;
    c->qbytes += wire;
    if (c->qcount == 1 && c->dirty_at == UINT32_MAX && wsapp_conn_mark_dirty(c) < 0)
        lws_callback_on_writable(c->wsi);
    return 0;
}

int wsapp_conn_send_text(wsapp_conn *c, const char *data, size_t len)
{
    wsapp_msg *m = wsapp_msg_new(data, len, 0);
    int rc;

    if (!m)
        return -1;
    rc = wsapp_conn_send(c, m);
    wsapp_msg_unref(m);
    return rc;
}

long wsapp_conn_write_raw(wsapp_conn *c, const struct iovec *iov, int iovcnt)
{
    struct msghdr mh;
    ssize_t n;

    if (c->dropped || !c->wsi)
        return -1;
    if (lws_partial_buffered(c->wsi)) {
        wsapp_conn_want_write(c);
        return 0;
    }
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = (struct iovec *)(uintptr_t)iov;
    mh.msg_iovlen = (size_t)iovcnt;
    do
        n = sendmsg(lws_get_socket_fd(c->wsi), &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
        n = 0;
    if (n < 0) {
        wsapp_conn_drop(c);
        return -1;
    }
    if (n == 0)
        wsapp_conn_want_write(c);
    return (long)n;
}

void wsapp_conn_abort(wsapp_conn *c)
{
    if (c->wsi)
        wsapp_conn_drop(c);
}

void wsapp_conn_want_write(wsapp_conn *c)
{
    if (c->dropped || !c->wsi || c->want_raw)
        return;
    c->want_raw = 1;
    lws_callback_on_writable(c->wsi);
}

void wsapp_conn_ping(wsapp_conn *c)
{
    if (c->closing || !c->wsi)
        return;
    c->ping = 1;
    lws_callback_on_writable(c->wsi);
}

/* The close frame goes out after what is queued before it, which a peer
 * that stopped reading never takes: the sweep drops the socket once
 * grace_ms have passed, or the connection would hold its place (and
 * everything it was subscribed to) until the process ends. */
static void wsapp_conn_close_within(wsapp_conn *c, int code, const char *reason, long long grace_ms)
{
    if (c->closing || !c->wsi)
        return;
    c->closing = 1;
    c->close_code = code < 1000 || code > 4999 ? 1000 : code;
    if (reason && reason[0])
        c->close_reason = wsapp_strndup(reason, strnlen(reason, 123));
    if (!c->kill_at_ms)
        c->kill_at_ms = svc_now_ms() + grace_ms;
    lws_callback_on_writable(c->wsi);
}

void wsapp_conn_close(wsapp_conn *c, int code, const char *reason)
{
    wsapp_conn_close_within(c, code, reason, WSAPP_CLOSE_GRACE_MS);
}

/* A close for a peer that misbehaves: nothing more is read from it, and
 * its close frame gets less time than a polite peer's. */
static void wsapp_conn_cut(wsapp_conn *c, int code, const char *reason)
{
    wsapp_conn_close_within(c, code, reason, WSAPP_CUT_GRACE_MS);
    /* lws keeps a ping's payload (to echo in the pong) where it keeps the
     * close reason, so a ping parsed before the close went out garbled the
     * close frame. */
    if (c->wsi)
        lws_rx_flow_control(c->wsi, 0);
}

/* Every WSAPP_SWEEP_MS: a message in progress for longer than
 * message_timeout_ms is closed 1008. lws parses a frame's header before
 * any of its payload reaches us, so a frame that announced a payload and
 * stopped is seen by lws_remaining_packet_payload only. */
static void wsapp_sweep(struct ev_loop *loop, ev_timer *w, int revents)
{
    wsapp *app = lws_container_of(w, wsapp, sweep);
    long long now = svc_now_ms();
    wsapp_conn *c, *next;

    (void)loop;
    (void)revents;
    for (c = app->conns; c; c = next) {
        next = c->next;
        if (!c->wsi)
            continue;
        if (c->kill_at_ms) {
            if (now >= c->kill_at_ms) {
                c->kill_at_ms = 0;
                lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_REASON_BASE, LWS_TO_KILL_ASYNC);
            }
            continue;
        }
        if (c->closing)
            continue;
        if (!c->msg_since_ms && lws_remaining_packet_payload(c->wsi) > 0)
            c->msg_since_ms = now;
        if (c->msg_since_ms && now - c->msg_since_ms > app->o.message_timeout_ms) {
            metrics_counter_inc(app->m_msg_timeouts);
            log_event(LOG_WARN, "websocket message not completed in time, closed",
                      "\"connection_id\":%llu,\"received_bytes\":%zu", (unsigned long long)c->id, c->rxlen);
            wsapp_conn_cut(c, 1008, "message not completed in time");
        }
    }
}

void wsapp_foreach_conn(wsapp *app, void (*fn)(wsapp_conn *c, void *user, void *ud), void *ud)
{
    wsapp_conn *c = app->conns, *next;

    for (; c; c = next) {
        next = c->next;
        fn(c, wsapp_conn_user(c), ud);
    }
}

/* Makes the connection's message buffer `need` bytes, charged to the
 * process-wide total; -1 (nothing changed) when that would pass
 * message_memory_bytes or on OOM. */
static int wsapp_rx_reserve(wsapp_conn *c, size_t need)
{
    size_t more = need > c->rx_charged ? need - c->rx_charged : 0,
           held = atomic_load_explicit(&wsapp_rx_held, memory_order_relaxed);
    char *nrx;

    do {
        if (held + more > c->app->o.message_memory_bytes)
            return -1;
    } while (!atomic_compare_exchange_weak_explicit(&wsapp_rx_held, &held, held + more, memory_order_relaxed,
                                                    memory_order_relaxed));
    if (!(nrx = realloc(c->rx, need))) {
        atomic_fetch_sub_explicit(&wsapp_rx_held, more, memory_order_relaxed);
        return -1;
    }
    c->rx = nrx;
    c->rx_charged += more;
    metrics_gauge_add(c->app->m_msg_memory, (double)more);
    return 0;
}

static void wsapp_rx_release(wsapp_conn *c)
{
    free(c->rx);
    c->rx = NULL;
    if (c->rx_charged) {
        atomic_fetch_sub_explicit(&wsapp_rx_held, c->rx_charged, memory_order_relaxed);
        metrics_gauge_add(c->app->m_msg_memory, -(double)c->rx_charged);
        c->rx_charged = 0;
    }
}

static void wsapp_conn_free(wsapp_conn *c)
{
    if (c->dirty_at != UINT32_MAX)
        c->app->dirty[c->dirty_at] = NULL;
    wsapp_conn_clear_queue(c);
    wsapp_rx_release(c);
    free(c->subproto);
    free(c->close_reason);
    free(c);
}

static int wsapp_conn_write_queue(wsapp_conn *c);

/* Writes what is queued: frames joined into chunks of WSAPP_WRITE_CHUNK
 * while the socket takes them. Returns -1 to close. */
static int wsapp_conn_writable(wsapp_conn *c)
{
    if (c->dropped)
        return -1;
    if (c->ping && !c->raw_mid) {
        /* A payload: lws 4.1 does not report an empty pong. */
        unsigned char pbuf[LWS_PRE + 4] = {0};

        memcpy(pbuf + LWS_PRE, "ping", 4);
        c->ping = 0;
        if (lws_write(c->wsi, pbuf + LWS_PRE, 4, LWS_WRITE_PING) < 0)
            return -1;
    }
    if (wsapp_conn_write_queue(c) < 0)
        return -1;
    if (!c->qcount && (c->want_raw || c->raw_mid) && c->route->h.writable && !lws_partial_buffered(c->wsi)) {
        int r;

        c->want_raw = 0;
        r = c->route->h.writable(c, wsapp_conn_user(c), c->route->ud);
        if (r < 0 || c->dropped)
            return -1;
        c->raw_mid = r == 1;
        if (c->raw_mid || (c->ping && !c->want_raw))
            lws_callback_on_writable(c->wsi);
    }
    if (c->qcount || c->raw_mid || (c->want_raw && lws_partial_buffered(c->wsi))) {
        lws_callback_on_writable(c->wsi);
        return 0;
    }
    if (c->closing) {
        const char *r = c->close_reason ? c->close_reason : "";

        lws_close_reason(c->wsi, (enum lws_close_status)c->close_code, (unsigned char *)(uintptr_t)r, strlen(r));
        return -1;
    }
    return 0;
}

/* Writes queued frames while the kernel takes them (none while a raw
 * frame is half written): lws_partial_buffered tells (without the poll(2)
 * that lws_send_pipe_choked costs) whether it took everything; when it did
 * not, lws keeps the rest and asks for POLLOUT itself. Returns -1 when the
 * socket failed. */
static int wsapp_conn_write_queue(wsapp_conn *c)
{
    wsapp *app = c->app;

    while (c->qcount && !c->raw_mid && !lws_partial_buffered(c->wsi)) {
        wsapp_msg *m = c->q[c->qhead];
        size_t wire = wsapp_msg_wire(m), n = 0;
        unsigned char *out;

        if (wire >= WSAPP_WRITE_CHUNK / 2 || c->qcount == 1) {
            /* One large (or lone) frame goes out from its own memory. */
            out = wsapp_msg_payload(m) - m->hdr;
            n = wire;
            c->qhead = (c->qhead + 1) % c->qcap;
            c->qcount--;
            c->qbytes -= wire;
            if (lws_write(c->wsi, out, n, LWS_WRITE_HTTP) < (int)n) {
                wsapp_msg_unref(m);
                return -1;
            }
            wsapp_msg_unref(m);
            continue;
        }
        out = app->scratch + LWS_PRE;
        while (c->qcount) {
            m = c->q[c->qhead];
            wire = wsapp_msg_wire(m);
            if (n + wire > WSAPP_WRITE_CHUNK)
                break;
            memcpy(out + n, wsapp_msg_payload(m) - m->hdr, wire);
            n += wire;
            c->qhead = (c->qhead + 1) % c->qcap;
            c->qcount--;
            c->qbytes -= wire;
            wsapp_msg_unref(m);
        }
        /* The frames are already framed: lws passes HTTP writes on a
         * WebSocket through unchanged. */
        if (lws_write(c->wsi, out, n, LWS_WRITE_HTTP) < (int)n)
            return -1;
    }
    if (!c->qcount && c->qcap > 4) {
        /* A burst is over: give back its queue. */
        free(c->q);
        c->q = NULL;
        c->qcap = c->qhead = 0;
    }
    return 0;
}

/* Before the loop blocks: writes the frames queued straight to the
 * sockets, so a broadcast to N subscribers costs N sends and no
 * epoll_ctl/epoll_wait round per subscriber, and every frame queued for a
 * connection before its turn leaves in one send. At most WSAPP_FLUSH_BATCH
 * connections a turn: the rest wait in order, the loop polling (not
 * blocking) in between. Pings, closes, raw writers and sockets lws still
 * holds bytes for go through the writable callback as before. */
static void wsapp_flush(struct ev_loop *loop, ev_prepare *w, int revents)
{
    wsapp *app = w->data;

    (void)revents;
    /* A write runs no callback that could queue more, so the ring does
     * not change under the loop but for its head. */
    for (int done = 0; app->ndirty && done < WSAPP_FLUSH_BATCH; done++) {
        wsapp_conn *c = app->dirty[app->dirty_head];

        app->dirty_head = (app->dirty_head + 1) & (app->dirty_cap - 1);
        app->ndirty--;
        if (!c)
            continue;
        c->dirty_at = UINT32_MAX;
        if (!c->wsi || !c->qcount)
            continue;
        if (c->closing || c->ping || c->want_raw || c->raw_mid || lws_partial_buffered(c->wsi)) {
            lws_callback_on_writable(c->wsi);
            continue;
        }
        if (wsapp_conn_write_queue(c) < 0) {
            /* The socket failed: lws closes it on its next turn. */
            c->closing = 1;
            wsapp_conn_clear_queue(c);
            lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_REASON_BASE, LWS_TO_KILL_ASYNC);
        } else if (c->qcount) {
            lws_callback_on_writable(c->wsi);
        }
    }
    if (app->ndirty && !ev_is_active(&app->flush_more))
        ev_idle_start(loop, &app->flush_more);
    else if (!app->ndirty && ev_is_active(&app->flush_more))
        ev_idle_stop(loop, &app->flush_more);
}

/* Only there to make the loop poll rather than block while wsapp_flush
 * has connections left: it writes them, before the next poll. */
static void wsapp_flush_more(struct ev_loop *loop, ev_idle *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
}

static void wsapp_conn_receive(wsapp_conn *c, const char *in, size_t len)
{
    wsapp *app = c->app;
    const wsapp_ws_route_t *r = c->route;
    int first = lws_is_first_fragment(c->wsi), final = lws_is_final_fragment(c->wsi);

    /* Once a close is decided nothing more is delivered: a peer that keeps
     * sending is not worth the work. */
    if (c->closing)
        return;
    c->last_rx_ms = svc_now_ms();
    if (first) {
        c->rxlen = 0;
        c->discarding = 0;
        c->rx_binary = lws_frame_is_binary(c->wsi) != 0;
        /* Kept when the sweep saw the frame's header already. */
        if (final)
            c->msg_since_ms = 0;
        else if (!c->msg_since_ms)
            c->msg_since_ms = c->last_rx_ms;
        if (final) {
            if (len > app->o.max_frame) {
                metrics_counter_inc(app->m_oversize);
                if (r->h.too_big)
                    r->h.too_big(c, wsapp_conn_user(c), len, r->ud);
            } else if (r->h.message) {
                r->h.message(c, wsapp_conn_user(c), in, len, c->rx_binary, r->ud);
            }
            return;
        }
    }
    if (!c->discarding) {
        if (c->rxlen + len > app->o.max_frame) {
            c->discarding = 1;
            wsapp_rx_release(c);
        } else if (!r->h.message) {
            /* A one-way route: the message is counted (for the limits), not kept. */
        } else if (wsapp_rx_reserve(c, c->rxlen + len + 1) == 0) {
            memcpy(c->rx + c->rxlen, in, len);
        } else {
            size_t held = atomic_load_explicit(&wsapp_rx_held, memory_order_relaxed);

            /* This peer's bytes would pass what all may hold: it goes, the
             * messages already held are finished. */
            metrics_counter_inc(app->m_msg_memory_cuts);
            log_event(LOG_WARN, "websocket messages in progress hold the memory limit, connection closed",
                      "\"connection_id\":%llu,\"received_bytes\":%zu,\"held_bytes\":%zu,\"limit_bytes\":%zu",
                      (unsigned long long)c->id, c->rxlen + len, held, app->o.message_memory_bytes);
            wsapp_rx_release(c);
            c->rxlen = 0;
            c->msg_since_ms = 0;
            wsapp_conn_cut(c, 1009, "message too big for the server now");
            return;
        }
    }
    c->rxlen += len;
    if (!final) {
        if (c->discarding && c->rxlen > app->o.max_frame * WSAPP_DISCARD_FACTOR) {
            metrics_counter_inc(app->m_oversize);
            if (r->h.too_big)
                r->h.too_big(c, wsapp_conn_user(c), c->rxlen, r->ud);
            wsapp_conn_cut(c, 1009, "message too big");
        }
        return;
    }
    c->msg_since_ms = 0;
    if (c->discarding) {
        metrics_counter_inc(app->m_oversize);
        if (r->h.too_big)
            r->h.too_big(c, wsapp_conn_user(c), c->rxlen, r->ud);
    } else if (r->h.message) {
        c->rx[c->rxlen] = '\0';
        r->h.message(c, wsapp_conn_user(c), c->rx, c->rxlen, c->rx_binary, r->ud);
    }
    wsapp_rx_release(c);
    c->rxlen = 0;
    c->discarding = 0;
}

/* ---- HTTP requests ------------------------------------------------------ */

const char *wsapp_req_method(const wsapp_req *req) { return req->method; }
const char *wsapp_req_path(const wsapp_req *req) { return req->path; }
const char *wsapp_req_id(const wsapp_req *req) { return req->request_id; }
const char *wsapp_req_remote(const wsapp_req *req) { return req->remote; }
const char *wsapp_req_subprotocols(wsapp_req *req) { return req->subprotos; }

const char *wsapp_req_body(const wsapp_req *req, size_t *len)
{
    if (len)
        *len = req->body.len;
    return buf_str(&req->body);
}

static const char *wsapp_req_keep(wsapp_req *req, const char *s, size_t n)
{
    wsapp_strnode *node = malloc(sizeof(*node) + n + 1);

    if (!node)
        return NULL;
    memcpy(node->s, s, n);
    node->s[n] = '\0';
    node->next = req->strs;
    req->strs = node;
    return node->s;
}

const char *wsapp_req_query(wsapp_req *req, const char *name)
{
    char key[128], val[8192];
    size_t n = strlen(name);
    const char *v;

    if (!req->wsi || n == 0 || n + 2 > sizeof(key))
        return NULL;
    memcpy(key, name, n);
    key[n] = '=';
    key[n + 1] = '\0';
    v = lws_get_urlarg_by_name(req->wsi, key, val, (int)sizeof(val));
    if (!v)
        return NULL;
    return wsapp_req_keep(req, v, strlen(v));
}

const char *wsapp_req_header(wsapp_req *req, const char *name)
{
    char key[128], *val;
    size_t n = strlen(name);
    int len;
    const char *out = NULL;

    if (!req->wsi || n == 0 || n + 2 > sizeof(key))
        return NULL;
    for (size_t i = 0; i < n; i++)
        key[i] = (char)((name[i] >= 'A' && name[i] <= 'Z') ? name[i] + 32 : name[i]);
    key[n] = ':';
    key[n + 1] = '\0';
    for (int t = 0; t < WSI_TOKEN_COUNT; t++) {
        const unsigned char *tn = lws_token_to_string((enum lws_token_indexes)t);

        if (!tn || strcmp((const char *)tn, key) != 0)
            continue;
        len = lws_hdr_total_length(req->wsi, (enum lws_token_indexes)t);
        if (len <= 0)
            return NULL;
        val = malloc((size_t)len + 1);
        if (!val)
            return NULL;
        if (lws_hdr_copy(req->wsi, val, len + 1, (enum lws_token_indexes)t) >= 0)
            out = wsapp_req_keep(req, val, strlen(val));
        free(val);
        return out;
    }
    len = lws_hdr_custom_length(req->wsi, key, (int)n + 1);
    if (len < 0)
        return NULL;
    val = malloc((size_t)len + 1);
    if (!val)
        return NULL;
    if (lws_hdr_custom_copy(req->wsi, val, len + 1, key, (int)n + 1) >= 0) {
        const char *v = val;

        while (*v == ' ' || *v == '\t')
            v++;
        out = wsapp_req_keep(req, v, strlen(v));
    }
    free(val);
    return out;
}

int wsapp_req_add_header(wsapp_req *req, const char *name, const char *value)
{
    if (req->nhdr >= WSAPP_MAX_RESP_HEADERS)
        return -1;
    req->hname[req->nhdr] = strdup(name);
    req->hval[req->nhdr] = strdup(value);
    if (!req->hname[req->nhdr] || !req->hval[req->nhdr]) {
        free(req->hname[req->nhdr]);
        free(req->hval[req->nhdr]);
        return -1;
    }
    req->nhdr++;
    return 0;
}

int wsapp_req_set_subprotocol(wsapp_req *req, const char *proto)
{
    free(req->subproto_chosen);
    req->subproto_chosen = proto ? strdup(proto) : NULL;
    return proto && !req->subproto_chosen ? -1 : 0;
}

static void wsapp_stream_detach(wsapp_req *req);

static void wsapp_req_free(wsapp_req *req)
{
    if (!req)
        return;
    wsapp_stream_detach(req);
    buf_free(&req->body);
    free(req->path);
    free(req->resp);
    for (int i = 0; i < req->nhdr; i++) {
        free(req->hname[i]);
        free(req->hval[i]);
    }
    while (req->strs) {
        wsapp_strnode *n = req->strs;

        req->strs = n->next;
        free(n);
    }
    free(req->subprotos);
    free(req->subproto_chosen);
    free(req);
}

static void wsapp_access_log(wsapp_req *req)
{
    char ep[512], eid[160], er[100];
    double ms = (double)(svc_now_ms() - req->start_ms);
    int cls = wsapp_status_class(req->status);

    metrics_counter_inc(req->app->m_http[cls]);
    if (!req->app->o.access_log || !log_enabled(LOG_INFO))
        return;
    log_event(LOG_INFO, "request",
              "\"method\":\"%s\",\"path\":\"%s\",\"status\":%d,\"duration_ms\":%.3f,\"request_id\":\"%s\","
              "\"remote\":\"%s\"",
              req->method, log_escape(ep, sizeof(ep), req->path ? req->path : ""), req->status, ms,
              log_escape(eid, sizeof(eid), req->request_id), log_escape(er, sizeof(er), req->remote));
}

/* Stores the answer; it is written when the socket is writable. */
static void wsapp_answer(wsapp_req *req, int status, const char *ctype, unsigned char *resp, size_t len)
{
    if (req->answered) {
        free(resp);
        return;
    }
    req->answered = 1;
    wsapp_stream_detach(req);
    req->status = status;
    fmt_copy(req->ctype, sizeof(req->ctype), ctype ? ctype : "application/json");
    req->resp = resp;
    req->resp_len = resp ? len : 0;
    if (req->wsi && !req->is_ws)
        lws_callback_on_writable(req->wsi);
}

void wsapp_respond(wsapp_req *req, int status, const char *content_type, const char *body, size_t len)
{
    unsigned char *r;

    if (req->answered)
        return;
    r = malloc(LWS_PRE + len + 1);
    if (!r) {
        status = 500;
        len = 0;
        r = NULL;
    } else if (len) {
        memcpy(r + LWS_PRE, body, len);
    }
    wsapp_answer(req, status, content_type, r, len);
}

void wsapp_respond_take(wsapp_req *req, int status, const char *content_type, char *body, size_t len)
{
    wsapp_respond(req, status, content_type, body, len);
    free(body);
}

void wsapp_respond_json(wsapp_req *req, int status, cJSON *body)
{
    char *text = body ? cJSON_PrintUnformatted(body) : NULL;

    cJSON_Delete(body);
    if (!text) {
        wsapp_respond(req, body ? 500 : status, "application/json", "null", 4);
        return;
    }
    wsapp_respond_take(req, status, "application/json", text, strlen(text));
}

void wsapp_respond_error(wsapp_req *req, int status, const char *code, const char *message, cJSON *details)
{
    wsapp_respond_json(req, status, httpd_error_body(status, code, message, details, req->request_id));
}

int wsapp_req_json(wsapp_req *req, cJSON **out)
{
    const char *why;
    size_t len, pos;
    const char *body = wsapp_req_body(req, &len);

    *out = NULL;
    if (len == 0) {
        wsapp_respond_error(req, 400, "invalid_request", "request body is empty; JSON expected", NULL);
        return -1;
    }
    if (!(*out = jget_parse(body, len, &pos, &why))) {
        char msg[128];

        snprintf(msg, sizeof(msg), "%s at position %zu", why, pos);
        wsapp_respond_error(req, 400, "invalid_request", msg, NULL);
        return -1;
    }
    return 0;
}

void wsapp_req_defer(wsapp_req *req, void (*on_gone)(wsapp_req *req, void *ud), void *ud)
{
    req->deferred = 1;
    req->on_gone = on_gone;
    req->gone_ud = ud;
}

/* Builds the status line and headers into `hb` (LWS_PRE headroom).
 * Returns the end pointer, or NULL when they do not fit. */
static unsigned char *wsapp_headers(wsapp_req *req, unsigned char *hb, size_t hbsize)
{
    unsigned char *p = hb + LWS_PRE, *end = hb + hbsize - 1;

    if (req->chunked) {
        /* lws_add_http_common_headers would make a body of unknown length
         * close-delimited; chunks keep the connection and let the client
         * tell a body cut short from a whole one. */
        if (lws_add_http_header_status(req->wsi, (unsigned int)req->status, &p, end) ||
            lws_add_http_header_by_token(req->wsi, WSI_TOKEN_HTTP_CONTENT_TYPE, (const unsigned char *)req->ctype,
                                         (int)strlen(req->ctype), &p, end) ||
            (!req->http10 && lws_add_http_header_by_token(req->wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING,
                                                          (const unsigned char *)"chunked", 7, &p, end)))
            return NULL;
    } else if (lws_add_http_common_headers(req->wsi, (unsigned int)req->status, req->ctype,
                                           (lws_filepos_t)req->resp_len, &p, end)) {
        return NULL;
    }
    if (lws_add_http_header_by_name(req->wsi, (const unsigned char *)"x-request-id:",
                                    (const unsigned char *)req->request_id, (int)strlen(req->request_id), &p, end))
        return NULL;
    for (int i = 0; i < req->nhdr; i++) {
        char name[128];
        size_t n = strlen(req->hname[i]);

        if (n + 2 > sizeof(name))
            continue;
        memcpy(name, req->hname[i], n);
        name[n] = ':';
        name[n + 1] = '\0';
        if (lws_add_http_header_by_name(req->wsi, (const unsigned char *)name, (const unsigned char *)req->hval[i],
                                        (int)strlen(req->hval[i]), &p, end))
            return NULL;
    }
    if (req->close_after &&
        lws_add_http_header_by_token(req->wsi, WSI_TOKEN_CONNECTION, (const unsigned char *)"close", 5, &p, end))
        return NULL;
    return p;
}

/* The transaction is over: logs it, frees the request and tells lws
 * whether the connection is kept. Returns what the writable callback
 * returns. */
static int wsapp_http_finish(wsapp_req *req)
{
    struct lws *wsi = req->wsi;
    int close_after = req->close_after;
    wsapp *app = req->app;

    wsapp_access_log(req);
    if (req->streamed && req->deferred && req->on_gone)
        req->on_gone(req, req->gone_ud);
    lws_set_opaque_user_data(wsi, NULL);
    wsapp_req_free(req);
    app->http_inflight--;
    if (close_after)
        return -1;
    return lws_http_transaction_completed(wsi) ? -1 : 0;
}

static int wsapp_stream_send(wsapp_req *req);

/* Writes the answer of an HTTP request. Returns -1 to close the socket, 0
 * when more is to come or the transaction is over. */
static int wsapp_http_write(wsapp_req *req)
{
    struct lws *wsi = req->wsi;

    if (req->chunked)
        return wsapp_stream_send(req);
    if (!req->headers_sent) {
        unsigned char hb[LWS_PRE + 4096], *p = wsapp_headers(req, hb, sizeof(hb));

        if (!p || lws_finalize_write_http_header(wsi, hb + LWS_PRE, &p, hb + sizeof(hb) - 1))
            return -1;
        req->headers_sent = 1;
    }
    while (!req->head_only && req->resp_off < req->resp_len) {
        size_t n = req->resp_len - req->resp_off;
        int last;

        if (lws_send_pipe_choked(wsi)) {
            lws_callback_on_writable(wsi);
            return 0;
        }
        if (n > WSAPP_WRITE_CHUNK)
            n = WSAPP_WRITE_CHUNK;
        last = req->resp_off + n == req->resp_len;
        if (lws_write(wsi, req->resp + LWS_PRE + req->resp_off, n, last ? LWS_WRITE_HTTP_FINAL : LWS_WRITE_HTTP) <
            (int)n)
            return -1;
        req->resp_off += n;
    }
    return wsapp_http_finish(req);
}

static const wsapp_http_route *wsapp_find_http(wsapp *app, const char *method, const char *path, int *other_method)
{
    const wsapp_http_route *best = NULL;

    *other_method = 0;
    for (int pass = 0; pass < 2 && !best; pass++) {
        for (int i = 0; i < app->nhttp; i++) {
            const wsapp_http_route *r = &app->http[i];

            if (r->prefix != pass || !wsapp_path_matches(r->path, r->plen, r->prefix, path))
                continue;
            if (strcmp(r->method, method) != 0) {
                *other_method = 1;
                continue;
            }
            if (!best || r->plen > best->plen)
                best = r;
        }
    }
    return best;
}

static const wsapp_ws_route_t *wsapp_find_ws(wsapp *app, const char *path)
{
    const wsapp_ws_route_t *best = NULL;

    for (int i = 0; i < app->nws; i++) {
        const wsapp_ws_route_t *r = &app->ws[i];

        if (!wsapp_path_matches(r->path, r->plen, r->prefix, path))
            continue;
        if (!r->prefix)
            return r;
        if (!best || r->plen > best->plen)
            best = r;
    }
    return best;
}

static wsapp_req *wsapp_req_new(wsapp *app, struct lws *wsi)
{
    static const char *const names[] = {"GET", "POST", "OPTIONS", "PUT", "PATCH", "DELETE", "CONNECT", "HEAD", "GET"};
    wsapp_req *req = calloc(1, sizeof(*req));
    char *uri = NULL, given[80];
    int ulen = 0, m;

    if (!req)
        return NULL;
    req->kind = WSAPP_KIND_REQ;
    req->app = app;
    req->wsi = wsi;
    req->start_ms = svc_now_ms();
    buf_init(&req->body, app->o.max_body);
    m = lws_http_get_uri_and_method(wsi, &uri, &ulen);
    fmt_copy(req->method, sizeof(req->method), m >= 0 && m < (int)(sizeof(names) / sizeof(names[0])) ? names[m] : "?");
    req->path = wsapp_strndup(uri ? uri : "/", uri ? (size_t)ulen : 1);
    if (!req->path) {
        wsapp_req_free(req);
        return NULL;
    }
    if (lws_hdr_custom_copy(wsi, given, sizeof(given), "x-request-id:", 13) < 0)
        given[0] = '\0';
    httpd_request_id_make(given[0] == ' ' ? given + 1 : given, req->request_id, sizeof(req->request_id));
    if (!lws_get_peer_simple(wsi, req->remote, sizeof(req->remote)))
        req->remote[0] = '\0';
    return req;
}

static void wsapp_http_dispatch(wsapp_req *req)
{
    wsapp *app = req->app;
    const char *method = req->head_only ? "GET" : req->method;
    int other = 0;

    req->dispatched = 1;
    if (req->body_too_big) {
        req->close_after = 1;
        wsapp_respond_error(req, 413, "payload_too_large", "request body exceeds the limit", NULL);
        return;
    }
    req->route = wsapp_find_http(app, method, req->path, &other);
    if (!req->route) {
        if (other || wsapp_find_ws(app, req->path))
            wsapp_respond_error(req, 405, "invalid_request", "method not allowed", NULL);
        else
            wsapp_respond_error(req, 404, "not_found", "no such route", NULL);
        return;
    }
    req->route->fn(req, req->route->ud);
    if (!req->answered && !req->deferred)
        wsapp_respond_error(req, 500, "internal", "handler gave no answer", NULL);
}

/* LWS_CALLBACK_HTTP: a new request whose head is parsed. */
static int wsapp_http_begin(wsapp *app, struct lws *wsi)
{
    wsapp_req *req = wsapp_req_new(app, wsi);
    char cl[32];

    if (!req)
        return -1;
    lws_set_opaque_user_data(wsi, req);
    app->http_inflight++;
    if (strcmp(req->method, "HEAD") == 0)
        req->head_only = 1;
    {
        int fd = (int)lws_get_socket_fd(wsi);

        req->http10 = fd >= 0 && (size_t)fd < app->nhttp10 && app->http10[fd];
    }
    if (lws_hdr_copy(wsi, cl, sizeof(cl), WSI_TOKEN_HTTP_CONTENT_LENGTH) > 0) {
        char *end;
        unsigned long long v = strtoull(cl, &end, 10);

        req->content_length = (size_t)v;
        if (end == cl || *end)
            req->body_too_big = 0, req->content_length = 0;
        req->has_body = req->content_length > 0;
        if (v > app->o.max_body) {
            req->body_too_big = 1;
            req->has_body = 0;
        }
    } else if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0) {
        req->has_body = 1;
    }
    if (!req->has_body || app->stopping)
        wsapp_http_dispatch(req);
    return 0;
}

static int wsapp_http_body(wsapp_req *req, const char *in, size_t len)
{
    if (req->body_too_big)
        return 0;
    if (req->body.len + len > req->app->o.max_body) {
        req->body_too_big = 1;
        buf_free(&req->body);
        wsapp_http_dispatch(req);
        return 0;
    }
    return buf_append(&req->body, in, len);
}

/* Refuses a WebSocket before the upgrade: the answer is written at once
 * (lws then ends the transaction). */
static int wsapp_ws_refuse(wsapp_req *req)
{
    unsigned char hb[LWS_PRE + 4096], *p;

    if (!req->answered)
        wsapp_respond_error(req, 403, "forbidden", "connection refused", NULL);
    metrics_counter_inc(req->app->m_refused);
    p = wsapp_headers(req, hb, sizeof(hb));
    if (!p || lws_finalize_write_http_header(req->wsi, hb + LWS_PRE, &p, hb + sizeof(hb) - 1))
        return -1;
    if (req->resp_len &&
        lws_write(req->wsi, req->resp + LWS_PRE, req->resp_len, LWS_WRITE_HTTP_FINAL) < (int)req->resp_len)
        return -1;
    wsapp_access_log(req);
    return 1;
}

/* LWS_CALLBACK_HTTP_CONFIRM_UPGRADE. Returns what lws expects: 0 go on, 1
 * answered, -1 hang up. */
static int wsapp_ws_confirm(wsapp *app, struct lws *wsi)
{
    wsapp_req *req = wsapp_req_new(app, wsi);
    const wsapp_ws_route_t *r;
    wsapp_conn *c = NULL;
    int rc = -1, len;

    if (!req)
        return -1;
    req->is_ws = 1;
    r = wsapp_find_ws(app, req->path);
    if (app->stopping) {
        wsapp_respond_error(req, 503, "unavailable", "server is stopping", NULL);
        rc = wsapp_ws_refuse(req);
        goto out;
    }
    if (!r) {
        wsapp_respond_error(req, 404, "not_found", "no WebSocket route here", NULL);
        rc = wsapp_ws_refuse(req);
        goto out;
    }
    len = lws_hdr_custom_length(wsi, WSAPP_SUBPROTO_HDR, (int)strlen(WSAPP_SUBPROTO_HDR));
    if (len > 0) {
        char *v = malloc((size_t)len + 1);

        if (!v || lws_hdr_custom_copy(wsi, v, len + 1, WSAPP_SUBPROTO_HDR, (int)strlen(WSAPP_SUBPROTO_HDR)) < 0) {
            free(v);
            goto out;
        }
        req->subprotos = v;
        while (*req->subprotos == ' ')
            memmove(req->subprotos, req->subprotos + 1, strlen(req->subprotos));
    }
    c = calloc(1, ((sizeof(*c) + 15) & ~(size_t)15) + r->h.user_size);
    if (!c)
        goto out;
    c->kind = WSAPP_KIND_CONN;
    c->dirty_at = UINT32_MAX;
    c->app = app;
    c->route = r;
    c->id = ++app->next_id;
    fmt_copy(c->remote, sizeof(c->remote), req->remote);
    if (r->h.accept && r->h.accept(req, wsapp_conn_user(c), r->ud) < 0) {
        free(c);
        c = NULL;
        rc = wsapp_ws_refuse(req);
        goto out;
    }
    if (req->subproto_chosen) {
        c->subproto = req->subproto_chosen;
        req->subproto_chosen = NULL;
    }
    req->status = 101;
    wsapp_access_log(req);
    lws_set_opaque_user_data(wsi, c);
    rc = 0;
out:
    wsapp_req_free(req);
    return rc;
}

static void wsapp_conn_established(wsapp *app, struct lws *wsi, wsapp_conn *c)
{
    c->wsi = wsi;
    c->established = 1;
    c->last_rx_ms = svc_now_ms();
    free(c->subproto);
    c->subproto = NULL;
    c->next = app->conns;
    if (app->conns)
        app->conns->prev = c;
    app->conns = c;
    app->nconns++;
    metrics_gauge_set(app->m_conns, app->nconns);
    metrics_counter_inc(app->m_opened);
    if (c->route->h.open)
        c->route->h.open(c, wsapp_conn_user(c), c->route->ud);
}

static void wsapp_conn_closed(wsapp *app, struct lws *wsi, wsapp_conn *c)
{
    if (c->established) {
        if (c->prev)
            c->prev->next = c->next;
        else
            app->conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
        app->nconns--;
        metrics_gauge_set(app->m_conns, app->nconns);
    }
    c->wsi = NULL;
    c->closing = 1;
    if (!c->told && c->route->h.close)
        c->route->h.close(c->established ? c : NULL, wsapp_conn_user(c), c->route->ud);
    c->told = 1;
    lws_set_opaque_user_data(wsi, NULL);
    wsapp_conn_free(c);
}

/* ---- the loop ----------------------------------------------------------- */

static void wsapp_run_posts(wsapp *app)
{
    wsapp_post_item *it;

    pthread_mutex_lock(&app->post_lock);
    it = app->posts;
    app->posts = app->posts_tail = NULL;
    pthread_mutex_unlock(&app->post_lock);
    while (it) {
        wsapp_post_item *next = it->next;
        int owned = !it->embedded; /* fn may free an embedded item's owner */

        it->fn(app, it->ud);
        if (owned)
            free(it);
        it = next;
    }
}

/* Queues `it` for the loop; it must not be queued already. */
static void wsapp_post_push(wsapp *app, wsapp_post_item *it)
{
    it->next = NULL;
    pthread_mutex_lock(&app->post_lock);
    if (app->posts_tail)
        app->posts_tail->next = it;
    else
        app->posts = it;
    app->posts_tail = it;
    pthread_mutex_unlock(&app->post_lock);
    if (app->ctx)
        lws_cancel_service(app->ctx);
}

int wsapp_post(wsapp *app, void (*fn)(wsapp *app, void *ud), void *ud)
{
    wsapp_post_item *it = malloc(sizeof(*it));

    if (!it)
        return -1;
    it->fn = fn;
    it->ud = ud;
    it->embedded = 0;
    wsapp_post_push(app, it);
    return 0;
}

static void wsapp_close_each(wsapp_conn *c, void *user, void *ud)
{
    (void)user;
    (void)ud;
    wsapp_conn_close(c, 1001, "server stopping");
}

/* Runs on the loop: the stop sequence (close the listener and every
 * WebSocket, wait for HTTP in flight, end). */
static void wsapp_stop_step(wsapp *app)
{
    if (app->stop_phase == 0) {
        app->stop_phase = 1;
        if (app->listen_wsi) {
            struct lws *lw = app->listen_wsi;

            app->listen_wsi = NULL;
            lws_set_timeout(lw, PENDING_TIMEOUT_USER_REASON_BASE, LWS_TO_KILL_ASYNC);
        }
        wsapp_foreach_conn(app, wsapp_close_each, NULL);
    }
    if ((app->nconns == 0 && app->http_inflight <= 0) || svc_now_ms() >= app->stop_deadline_ms) {
        atomic_store(&app->done, 1);
        ev_break(app->loop, EVBREAK_ALL);
    }
}

static void wsapp_head_expired(struct ev_loop *loop, ev_timer *w, int revents);

static void wsapp_accept_ready(wsapp *app)
{
    for (;;) {
        int fd = accept4(app->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), one = 1;
        struct lws *w;
        wsapp_head *h;
        lws_sock_file_fd_type d;

        if (fd < 0)
            return;
        if (app->nsockets >= app->o.max_connections || app->stopping) {
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        h = calloc(1, sizeof(*h));
        if (!h) {
            close(fd);
            continue;
        }
        h->kind = WSAPP_KIND_HEAD;
        h->app = app;
        ev_timer_init(&h->deadline, wsapp_head_expired, (double)app->o.header_timeout_ms / 1000.0, 0.);
        d.filefd = fd;
        w = lws_adopt_descriptor_vhost(app->vh, LWS_ADOPT_RAW_FILE_DESC, d, "wsapp-head", NULL);
        if (!w) {
            free(h);
            close(fd);
            continue;
        }
        h->wsi = w;
        lws_set_opaque_user_data(w, h);
        ev_timer_start(app->loop, &h->deadline);
    }
}

/* Takes what the peer sent and nobody read (a head left in the socket):
 * closing over unread bytes would send a reset, which can make the peer
 * drop the answer just written before reading it. */
static void wsapp_drain(int fd, size_t max)
{
    char junk[2048];
    ssize_t n;

    while (max > 0 && (n = recv(fd, junk, sizeof(junk), MSG_DONTWAIT)) > 0)
        max = (size_t)n >= max ? 0 : max - (size_t)n;
}

static void wsapp_reply_raw(int fd, int status, const char *code, const char *message)
{
    char out[512];
    cJSON *b = httpd_error_body(status, code, message, NULL, "");
    char *text = b ? cJSON_PrintUnformatted(b) : NULL;
    int n;

    cJSON_Delete(b);
    n = snprintf(out, sizeof(out), "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                 "Connection: close\r\n\r\n%s", status, code, text ? strlen(text) : 0, text ? text : "");
    free(text);
    if (n > 0 && (size_t)n < sizeof(out) && write(fd, out, (size_t)n) < 0)
        return;
}

/* Moves Sec-WebSocket-Protocol to WSAPP_SUBPROTO_HDR (see wsapp.h) in a
 * copy of the head; `*outlen` is the new length. */
static char *wsapp_head_rewrite(const char *h, size_t len, size_t *outlen)
{
    static const char from[] = "sec-websocket-protocol:";
    size_t flen = sizeof(from) - 1, tlen = strlen(WSAPP_SUBPROTO_HDR);
    char *out = malloc(len + 64);
    size_t o = 0, i = 0;

    if (!out)
        return NULL;
    while (i < len) {
        const char *eol = memchr(h + i, '\n', len - i);
        size_t l = eol ? (size_t)(eol - (h + i)) + 1 : len - i;

        if (i > 0 && l > flen && strncasecmp(h + i, from, flen) == 0 && o + tlen + (l - flen) < len + 64) {
            memcpy(out + o, WSAPP_SUBPROTO_HDR, tlen);
            o += tlen;
            memcpy(out + o, h + i + flen, l - flen);
            o += l - flen;
        } else {
            memcpy(out + o, h + i, l);
            o += l;
        }
        i += l;
    }
    *outlen = o;
    return out;
}

/* Hands a socket whose request head is complete (`n` bytes peeked at
 * `data`) to lws: as it is, or, when it offers subprotocols, with the head
 * consumed here, rewritten and given to lws as its first read (the body of
 * a WebSocket handshake is empty, so only the head is taken). */
static void wsapp_head_handoff(wsapp *app, int fd, const char *data, size_t n)
{
    static const char hdr[] = "\r\nsec-websocket-protocol:";
    const char *end = memmem(data, n, "\r\n\r\n", 4);
    size_t hlen = (size_t)(end - data) + 4, outlen;
    int has_proto = 0, nfd;
    char *head;

    for (size_t i = 0; i + sizeof(hdr) - 1 <= hlen; i++)
        if (data[i] == '\r' && strncasecmp(data + i, hdr, sizeof(hdr) - 1) == 0) {
            has_proto = 1;
            break;
        }
    nfd = dup(fd);
    if (nfd < 0)
        return;
    if ((size_t)nfd < app->nhttp10) {
        const char *line = data, *eol;

        while (line + 2 <= data + hlen && line[0] == '\r' && line[1] == '\n')
            line += 2; /* empty lines before a request line are allowed */
        eol = memmem(line, hlen - (size_t)(line - data), "\r\n", 2);
        app->http10[nfd] = eol && eol - line >= 8 && memcmp(eol - 8, "HTTP/1.0", 8) == 0;
    }
    if (!has_proto) {
        if (!lws_adopt_socket_vhost(app->vh, nfd))
            close(nfd);
        return;
    }
    if (recv(fd, (char *)(uintptr_t)data, hlen, 0) != (ssize_t)hlen) {
        close(nfd);
        return;
    }
    head = wsapp_head_rewrite(data, hlen, &outlen);
    if (!head) {
        close(nfd);
        return;
    }
    /* On failure lws has closed nfd. */
    (void)lws_adopt_socket_vhost_readbuf(app->vh, nfd, head, outlen);
    free(head);
}

/* The head did not come in time: 408, as RFC 9110 has a server say it
 * gave up waiting, and close. */
static void wsapp_head_expired(struct ev_loop *loop, ev_timer *w, int revents)
{
    wsapp_head *h = lws_container_of(w, wsapp_head, deadline);
    char msg[96];

    (void)loop;
    (void)revents;
    metrics_counter_inc(h->app->m_head_timeouts);
    snprintf(msg, sizeof(msg), "the request head was not complete within %d ms", h->app->o.header_timeout_ms);
    wsapp_drain(lws_get_socket_fd(h->wsi), h->app->o.max_header);
    wsapp_reply_raw(lws_get_socket_fd(h->wsi), 408, "request_timeout", msg);
    /* Frees h (LWS_CALLBACK_RAW_CLOSE_FILE). */
    lws_set_timeout(h->wsi, PENDING_TIMEOUT_USER_REASON_BASE + 1, LWS_TO_KILL_SYNC);
}

static void wsapp_head_free(wsapp_head *h)
{
    ev_timer_stop(h->app->loop, &h->deadline);
    free(h->data);
    free(h);
}

/* Callback of the "wsapp-head" protocol: a new connection, watched as a
 * raw descriptor (lws does not read it) until its request head is all
 * there, which recv(MSG_PEEK) tells without taking the bytes. SO_RCVLOWAT
 * keeps the socket from looking readable again until more bytes came:
 * looking again on a timer instead cost a fifth of a core for 1,000
 * clients trickling their heads. (Taking the bytes and handing them to lws
 * with lws_adopt_socket_vhost_readbuf is not an option: lws 4.1 then never
 * reads a request body that follows.) */
static int wsapp_head_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    wsapp *app = lws_context_user(lws_get_context(wsi));
    wsapp_head *h = lws_get_opaque_user_data(wsi);
    int fd = lws_get_socket_fd(wsi);
    ssize_t n;

    (void)user;
    (void)in;
    (void)len;
    switch (reason) {
    case LWS_CALLBACK_RAW_RX_FILE:
        if (!h)
            return -1;
        if (h->len == h->cap) {
            size_t cap = h->cap ? h->cap * 2 : WSAPP_HEAD_CHUNK;
            char *nd;

            if (cap > app->o.max_header)
                cap = app->o.max_header;
            if (cap <= h->len) {
                wsapp_reply_raw(fd, 431, "invalid_request", "request head too large");
                return -1;
            }
            if (!(nd = realloc(h->data, cap)))
                return -1;
            h->data = nd;
            h->cap = cap;
        }
        /* Peeked: lws reads the head itself (and the body after it). */
        n = recv(fd, h->data, h->cap, MSG_PEEK);
        if (n == 0)
            return -1;
        if (n < 0)
            return errno == EAGAIN || errno == EINTR ? 0 : -1;
        /* Readable with no byte beyond the low mark: the peer shut its
         * side (a FIN wakes epoll whatever the mark), and would wake us
         * at every turn until the deadline. */
        if (h->lowat > h->len && (size_t)n <= h->len)
            return -1;
        h->len = (size_t)n;
        if (memmem(h->data, h->len, "\r\n\r\n", 4)) {
            int one = 1;

            /* Back to the default before lws takes the socket. */
            setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
            wsapp_head_handoff(app, fd, h->data, h->len);
            return -1;
        }
        if (h->len >= app->o.max_header) {
            wsapp_drain(fd, app->o.max_header);
            wsapp_reply_raw(fd, 431, "invalid_request", "request head too large");
            return -1;
        }
        if (h->len < h->cap) {
            /* The bytes stay in the socket, so it stays readable: epoll
             * is told to wake us only once more than these have come. */
            int lowat = (int)h->len + 1;

            if (setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof(lowat)) < 0)
                return -1;
            h->lowat = (size_t)lowat;
        }
        /* A full buffer grows at the next wake-up (which is at once). */
        return 0;
    case LWS_CALLBACK_RAW_CLOSE_FILE:
        if (h) {
            wsapp_head_free(h);
            lws_set_opaque_user_data(wsi, NULL);
        }
        return 0;
    default:
        return 0;
    }
}

/* Callback of the listening descriptor (adopted as a raw file). */
static int wsapp_listen_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    wsapp *app = lws_context_user(lws_get_context(wsi));

    (void)user;
    (void)in;
    (void)len;
    if (reason == LWS_CALLBACK_RAW_RX_FILE)
        wsapp_accept_ready(app);
    return 0;
}

static int wsapp_raw_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    wsapp *app = lws_context_user(lws_get_context(wsi));

    if (wsi == app->listen_wsi || (!app->listen_wsi && !lws_get_opaque_user_data(wsi)))
        return wsapp_listen_cb(wsi, reason, user, in, len);
    return wsapp_head_cb(wsi, reason, user, in, len);
}

static int wsapp_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in, size_t len)
{
    struct lws_context *ctx = lws_get_context(wsi);
    wsapp *app = ctx ? lws_context_user(ctx) : NULL;
    void *op = wsi ? lws_get_opaque_user_data(wsi) : NULL;
    int kind = op ? *(int *)op : 0;
    wsapp_req *req = kind == WSAPP_KIND_REQ ? op : NULL;
    wsapp_conn *c = kind == WSAPP_KIND_CONN ? op : NULL;

    (void)user;
    if (!app)
        return 0;
    switch (reason) {
    case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
        wsapp_run_posts(app);
        if (app->stopping)
            wsapp_stop_step(app);
        return 0;
    case LWS_CALLBACK_HTTP:
        if (req)
            return -1;
        return wsapp_http_begin(app, wsi);
    case LWS_CALLBACK_HTTP_BODY:
        return req ? wsapp_http_body(req, in, len) : -1;
    case LWS_CALLBACK_HTTP_BODY_COMPLETION:
        if (req && !req->dispatched)
            wsapp_http_dispatch(req);
        return 0;
    case LWS_CALLBACK_HTTP_WRITEABLE:
        if (req && req->answered)
            return wsapp_http_write(req);
        return 0;
    case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
        if (op)
            return -1;
        return wsapp_ws_confirm(app, wsi);
    case LWS_CALLBACK_ADD_HEADERS:
        if (c && c->subproto) {
            struct lws_process_html_args *a = in;
            unsigned char *p = (unsigned char *)a->p;

            if (lws_add_http_header_by_name(wsi, (const unsigned char *)"sec-websocket-protocol:",
                                            (const unsigned char *)c->subproto, (int)strlen(c->subproto), &p,
                                            p + a->max_len))
                return -1;
            a->p = (char *)p;
        }
        return 0;
    case LWS_CALLBACK_ESTABLISHED:
        if (!c)
            return -1;
        wsapp_conn_established(app, wsi, c);
        return 0;
    case LWS_CALLBACK_RECEIVE:
        if (c && !c->dropped)
            wsapp_conn_receive(c, in, len);
        return 0;
    case LWS_CALLBACK_RECEIVE_PONG:
        if (c) {
            c->last_rx_ms = svc_now_ms();
            if (c->route->h.pong)
                c->route->h.pong(c, wsapp_conn_user(c), c->route->ud);
        }
        return 0;
    case LWS_CALLBACK_SERVER_WRITEABLE:
        return c ? wsapp_conn_writable(c) : 0;
    case LWS_CALLBACK_CLOSED:
        if (c)
            wsapp_conn_closed(app, wsi, c);
        return 0;
    case LWS_CALLBACK_WSI_CREATE:
        app->nsockets++;
        return 0;
    case LWS_CALLBACK_WSI_DESTROY:
        if (kind == WSAPP_KIND_HEAD) {
            wsapp_head_free(op);
            lws_set_opaque_user_data(wsi, NULL);
        } else if (c) {
            wsapp_conn_closed(app, wsi, c);
        } else if (req) {
            if (req->deferred && (!req->answered || req->streamed) && req->on_gone)
                req->on_gone(req, req->gone_ud);
            app->http_inflight--;
            lws_set_opaque_user_data(wsi, NULL);
            wsapp_req_free(req);
        }
        app->nsockets--;
        return 0;
    default:
        return 0;
    }
}

/* ---- streamed answers ------------------------------------------------ */

enum { WSAPP_STREAM_MORE, WSAPP_STREAM_WAIT, WSAPP_STREAM_DONE, WSAPP_STREAM_CUT };

/* A chunk on the wire: 4 hex digits and CRLF, the bytes, CRLF. Leading
 * zeros are valid chunk sizes, so the head has one width. */
#define WSAPP_CHUNK_HEAD 6
#define WSAPP_CHUNK_DATA (WSAPP_WRITE_CHUNK - WSAPP_CHUNK_HEAD - 2)

struct wsapp_stream {
    atomic_int refs;  /* the producer's, the request's, the kick's while queued */
    wsapp *app;
    wsapp_req *req;   /* loop only; NULL once the request let go */
    wsapp_post_item kick; /* embedded: waking the loop cannot fail */
    pthread_mutex_t mu;
    pthread_cond_t room; /* bytes taken, or the stream refused */
    /* under mu */
    int status;       /* 0 until the producer begins */
    char ctype[96];
    int ended, ok;
    int refused;      /* answered otherwise, HEAD, the client gone, the loop over */
    int armed;        /* the loop found nothing to do: the next change kicks it */
    int kick_queued;
    buf pending;      /* written, not yet taken from `off` */
    size_t off, max;
};

static void wsapp_stream_unref(wsapp_stream *s)
{
    if (atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->room);
    buf_free(&s->pending);
    free(s);
}

/* On the loop: the request is done with its stream (answered otherwise,
 * freed, the body over, or the loop ended). The producer's waits and
 * writes fail from now on. */
static void wsapp_stream_detach(wsapp_req *req)
{
    wsapp_stream *s = req->stream;

    if (!s)
        return;
    if (req->sprev)
        req->sprev->snext = req->snext;
    else
        req->app->streaming = req->snext;
    if (req->snext)
        req->snext->sprev = req->sprev;
    req->stream = NULL;
    req->sprev = req->snext = NULL;
    pthread_mutex_lock(&s->mu);
    s->refused = 1;
    pthread_cond_broadcast(&s->room);
    pthread_mutex_unlock(&s->mu);
    s->req = NULL;
    wsapp_stream_unref(s);
}

/* On the loop, after a kick: the head may be decided, or bytes wait. */
static void wsapp_stream_kicked(wsapp *app, void *ud)
{
    wsapp_stream *s = ud;
    wsapp_req *req = s->req;

    (void)app;
    pthread_mutex_lock(&s->mu);
    s->kick_queued = 0;
    if (req && !req->answered && s->status) {
        req->answered = req->chunked = 1;
        req->close_after |= req->http10; /* HTTP/1.0 has no chunks: the close ends the body */
        req->status = s->status;
        fmt_copy(req->ctype, sizeof(req->ctype), s->ctype);
    }
    pthread_mutex_unlock(&s->mu);
    if (req && req->answered)
        lws_callback_on_writable(req->wsi);
    wsapp_stream_unref(s);
}

/* Producer, with mu held: wakes the loop if it found nothing to do last
 * time (one kick queued at most). */
static void wsapp_stream_wake(wsapp_stream *s)
{
    if (!s->armed)
        return;
    s->armed = 0;
    if (s->kick_queued)
        return;
    s->kick_queued = 1;
    atomic_fetch_add(&s->refs, 1);
    wsapp_post_push(s->app, &s->kick);
}

wsapp_stream *wsapp_req_stream(wsapp_req *req, size_t max_buffered)
{
    wsapp_stream *s;

    if (req->answered || req->stream || req->is_ws || !(s = calloc(1, sizeof(*s))))
        return NULL;
    atomic_init(&s->refs, 2);
    s->app = req->app;
    s->req = req;
    s->kick.fn = wsapp_stream_kicked;
    s->kick.ud = s;
    s->kick.embedded = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->room, NULL);
    buf_init(&s->pending, SIZE_MAX / 2);
    s->max = max_buffered ? max_buffered : WSAPP_WRITE_CHUNK;
    s->armed = 1;
    req->stream = s;
    req->streamed = 1;
    req->snext = req->app->streaming;
    if (req->snext)
        req->snext->sprev = req;
    req->app->streaming = req;
    return s;
}

int wsapp_stream_begin(wsapp_stream *s, int status, const char *content_type)
{
    int refused;

    pthread_mutex_lock(&s->mu);
    refused = s->refused || s->status;
    if (!refused) {
        s->status = status;
        fmt_copy(s->ctype, sizeof(s->ctype), content_type ? content_type : "application/octet-stream");
        wsapp_stream_wake(s);
    }
    pthread_mutex_unlock(&s->mu);
    return refused ? -1 : 0;
}

int wsapp_stream_write(wsapp_stream *s, const void *data, size_t len)
{
    int rc = -1;

    pthread_mutex_lock(&s->mu);
    while (!s->refused && s->pending.len > s->off && s->pending.len - s->off + len > s->max)
        pthread_cond_wait(&s->room, &s->mu);
    if (!s->refused && s->status) {
        if (s->off) {
            memmove(s->pending.p, s->pending.p + s->off, s->pending.len - s->off);
            s->pending.len -= s->off;
            s->off = 0;
        }
        if (buf_append_all(&s->pending, data, len) == 0) {
            rc = 0;
            wsapp_stream_wake(s);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void wsapp_stream_end(wsapp_stream *s, int ok)
{
    pthread_mutex_lock(&s->mu);
    s->ended = 1;
    s->ok = ok;
    if (s->status && !s->refused)
        wsapp_stream_wake(s);
    pthread_mutex_unlock(&s->mu);
    wsapp_stream_unref(s);
}

/* On the loop: up to `max` waiting bytes into out. Returns MORE with *n
 * bytes, WAIT (armed: a change will kick), DONE or CUT. */
static int wsapp_stream_take(wsapp_stream *s, unsigned char *out, size_t max, size_t *n)
{
    int st;

    pthread_mutex_lock(&s->mu);
    *n = s->pending.len - s->off;
    if (*n > max)
        *n = max;
    if (*n) {
        memcpy(out, s->pending.p + s->off, *n);
        s->off += *n;
        if (s->off == s->pending.len)
            s->pending.len = s->off = 0;
        pthread_cond_signal(&s->room);
        st = WSAPP_STREAM_MORE;
    } else if (s->ended) {
        st = s->ok ? WSAPP_STREAM_DONE : WSAPP_STREAM_CUT;
    } else {
        s->armed = 1;
        st = WSAPP_STREAM_WAIT;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

/* Writes n bytes of out (which has WSAPP_CHUNK_HEAD bytes of room before
 * them and 2 after) as one chunk, or as they are for HTTP/1.0. */
static int wsapp_stream_put(wsapp_req *req, unsigned char *out, size_t n)
{
    unsigned char *p = out + WSAPP_CHUNK_HEAD;
    size_t len = n;

    if (!req->http10) {
        char head[WSAPP_CHUNK_HEAD + 1];

        snprintf(head, sizeof(head), "%04zx\r\n", n);
        memcpy(out, head, WSAPP_CHUNK_HEAD);
        memcpy(out + WSAPP_CHUNK_HEAD + n, "\r\n", 2);
        p = out;
        len = n + WSAPP_CHUNK_HEAD + 2;
    }
    return lws_write(req->wsi, p, len, LWS_WRITE_HTTP) < (int)len ? -1 : 0;
}

/* The writable callback of a streamed answer: the head, then chunks as
 * the producer writes them, then the last chunk. Each return before the
 * end arms lws's timeout: a body that does not move for http_timeout_s
 * closes the connection, which lets the producer go. Armed while waiting
 * for the producer too, since the socket may be full then without lws
 * knowing it: the producer's next bytes would ask for a writable callback
 * that never comes if the client stopped reading. */
static int wsapp_stream_send(wsapp_req *req)
{
    struct lws *wsi = req->wsi;
    unsigned char *out = req->app->scratch + LWS_PRE;

    if (!req->headers_sent) {
        unsigned char hb[LWS_PRE + 4096], *p = wsapp_headers(req, hb, sizeof(hb));

        if (!p || lws_finalize_write_http_header(wsi, hb + LWS_PRE, &p, hb + sizeof(hb) - 1))
            return -1;
        req->headers_sent = 1;
    }
    while (req->stream && !req->head_only) {
        size_t n;
        int st;

        if (lws_send_pipe_choked(wsi)) {
            lws_callback_on_writable(wsi);
            st = WSAPP_STREAM_WAIT;
        } else {
            st = wsapp_stream_take(req->stream, out + WSAPP_CHUNK_HEAD, WSAPP_CHUNK_DATA, &n);
        }
        if (st == WSAPP_STREAM_WAIT) {
            lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, req->app->o.http_timeout_s);
            return 0;
        }
        if (st == WSAPP_STREAM_CUT) {
            req->close_after = 1;
            break;
        }
        if (st == WSAPP_STREAM_DONE) {
            if (!req->http10 &&
                lws_write(wsi, (unsigned char *)memcpy(out, "0\r\n\r\n", 5), 5, LWS_WRITE_HTTP_FINAL) < 5)
                return -1;
            break;
        }
        if (wsapp_stream_put(req, out, n) < 0)
            return -1;
    }
    /* HEAD, or the body is over: a cut one closes the connection, which
     * is how the client learns that it is short. */
    return wsapp_http_finish(req);
}

/* ---- timers ------------------------------------------------------------- */

/* libev timers rather than lws's sorted list: with a foreign libev loop
 * lws 4.1 does not re-arm its own timer when an earlier deadline is
 * added, so a short timer could wait for the next unrelated wake-up. */
static void wsapp_timer_fire(struct ev_loop *loop, ev_timer *w, int revents)
{
    wsapp_timer *t = (wsapp_timer *)w;

    (void)loop;
    (void)revents;
    t->fn(t, t->ud);
}

wsapp_timer *wsapp_timer_new(wsapp *app, void (*fn)(wsapp_timer *t, void *ud), void *ud)
{
    wsapp_timer *t = calloc(1, sizeof(*t));

    if (!t)
        return NULL;
    t->app = app;
    t->fn = fn;
    t->ud = ud;
    ev_timer_init(&t->ev, wsapp_timer_fire, 0., 0.);
    return t;
}

void wsapp_timer_set(wsapp_timer *t, long ms)
{
    ev_timer_stop(t->app->loop, &t->ev);
    ev_timer_set(&t->ev, (double)(ms < 0 ? 0 : ms) / 1000.0, 0.);
    ev_timer_start(t->app->loop, &t->ev);
}

void wsapp_timer_cancel(wsapp_timer *t)
{
    if (t && t->app->loop)
        ev_timer_stop(t->app->loop, &t->ev);
}

void wsapp_timer_free(wsapp_timer *t)
{
    if (!t)
        return;
    wsapp_timer_cancel(t);
    free(t);
}

/* ---- descriptors ---------------------------------------------------------- */

struct wsapp_io {
    ev_io ev; /* first: the libev callback gets its address */
    wsapp *app;
    void (*fn)(wsapp_io *w, int readable, int writable, void *ud);
    void *ud;
};

static void wsapp_io_fire(struct ev_loop *loop, ev_io *w, int revents)
{
    wsapp_io *io = (wsapp_io *)w;

    (void)loop;
    io->fn(io, (revents & EV_READ) != 0, (revents & EV_WRITE) != 0, io->ud);
}

wsapp_io *wsapp_io_new(wsapp *app, int fd, void (*fn)(wsapp_io *w, int readable, int writable, void *ud), void *ud)
{
    wsapp_io *io = calloc(1, sizeof(*io));

    if (!io)
        return NULL;
    io->app = app;
    io->fn = fn;
    io->ud = ud;
    ev_io_init(&io->ev, wsapp_io_fire, fd, EV_READ);
    ev_io_start(app->loop, &io->ev);
    return io;
}

void wsapp_io_want_write(wsapp_io *io, int on)
{
    int want = EV_READ | (on ? EV_WRITE : 0);

    if ((io->ev.events & (EV_READ | EV_WRITE)) == want)
        return;
    ev_io_stop(io->app->loop, &io->ev);
    ev_io_set(&io->ev, io->ev.fd, want);
    ev_io_start(io->app->loop, &io->ev);
}

void wsapp_io_free(wsapp_io *io)
{
    if (!io)
        return;
    if (io->app->loop)
        ev_io_stop(io->app->loop, &io->ev);
    free(io);
}

/* ---- set-up ------------------------------------------------------------- */

int wsapp_route(wsapp *app, const char *method, const char *path, wsapp_http_fn fn, void *ud)
{
    wsapp_http_route *r;

    if (app->nhttp >= WSAPP_MAX_ROUTES || !fn || strlen(method) >= sizeof(r->method))
        return -1;
    r = &app->http[app->nhttp];
    if (wsapp_parse_pattern(path, &r->path, &r->plen, &r->prefix) < 0)
        return -1;
    fmt_copy(r->method, sizeof(r->method), method);
    r->fn = fn;
    r->ud = ud;
    app->nhttp++;
    return 0;
}

int wsapp_ws_route(wsapp *app, const char *path, const wsapp_ws_handlers *h, void *ud)
{
    wsapp_ws_route_t *r;

    if (app->nws >= WSAPP_MAX_ROUTES || !h)
        return -1;
    r = &app->ws[app->nws];
    if (wsapp_parse_pattern(path, &r->path, &r->plen, &r->prefix) < 0)
        return -1;
    r->h = *h;
    r->ud = ud;
    app->nws++;
    return 0;
}

static void wsapp_metrics_handler(wsapp_req *req, void *ud)
{
    wsapp *app = ud;
    char *text = NULL;
    size_t len = 0;

    if (metrics_render(app->o.metrics, &text, &len) < 0) {
        wsapp_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    wsapp_respond_take(req, 200, METRICS_CONTENT_TYPE, text, len);
}

int wsapp_route_metrics(wsapp *app) { return wsapp_route(app, "GET", "/metrics", wsapp_metrics_handler, app); }

wsapp *wsapp_new(const wsapp_opts *opts, char *err, size_t errlen)
{
    wsapp *app = calloc(1, sizeof(*app));
    char lab[160], esc[96];
    static const char *const cls[6] = {"other", "1xx", "2xx", "3xx", "4xx", "5xx"};

    if (!app) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    app->o = *opts;
    fmt_copy(app->service, sizeof(app->service), opts->service ? opts->service : "wsapp");
    fmt_copy(app->host, sizeof(app->host), opts->host ? opts->host : "");
    app->o.service = app->service;
    app->o.host = app->host;
    if (!app->o.max_body)
        app->o.max_body = 1u << 20;
    if (!app->o.max_header)
        app->o.max_header = 16384;
    if (!app->o.max_frame)
        app->o.max_frame = 65536;
    if (!app->o.send_queue_bytes)
        app->o.send_queue_bytes = 1u << 20;
    if (app->o.max_connections <= 0)
        app->o.max_connections = 20000;
    if (app->o.http_timeout_s <= 0)
        app->o.http_timeout_s = 30;
    if (app->o.header_timeout_ms <= 0)
        app->o.header_timeout_ms = 10000;
    if (app->o.message_timeout_ms <= 0)
        app->o.message_timeout_ms = 30000;
    if (!app->o.message_memory_bytes)
        app->o.message_memory_bytes = 64u << 20;
    if (!app->o.metrics)
        app->o.metrics = metrics_default();
    app->listen_fd = -1;
    pthread_mutex_init(&app->post_lock, NULL);
    app->scratch = malloc(LWS_PRE + WSAPP_WRITE_CHUNK);
    {
        struct rlimit rl;

        app->nhttp10 = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (1u << 20)
                           ? (size_t)rl.rlim_cur
                           : (size_t)1 << 20;
        app->http10 = calloc(app->nhttp10, 1);
    }
    /* Created here so that timers can be set before wsapp_start. */
    app->loop = ev_loop_new(EVFLAG_AUTO);
    if (app->loop) {
        ev_prepare_init(&app->flush, wsapp_flush);
        app->flush.data = app;
        ev_idle_init(&app->flush_more, wsapp_flush_more);
        ev_prepare_start(app->loop, &app->flush);
        /* lws's own watchers must not keep the loop alive for this one. */
        ev_unref(app->loop);
    }
    if (!app->scratch || !app->loop || !app->http10) {
        snprintf(err, errlen, "out of memory");
        wsapp_free(app);
        return NULL;
    }
    metrics_escape_label(esc, sizeof(esc), app->service);
    for (int i = 0; i < 6; i++) {
        snprintf(lab, sizeof(lab), "service=\"%s\",class=\"%s\"", esc, cls[i]);
        app->m_http[i] = metrics_counter_get(app->o.metrics, "wsapp_http_responses_total",
                                             "HTTP responses (WebSocket handshakes included) by status class", lab);
    }
    snprintf(lab, sizeof(lab), "service=\"%s\"", esc);
    app->m_conns = metrics_gauge_get(app->o.metrics, "wsapp_websocket_connections", "Open WebSocket connections", lab);
    app->m_opened = metrics_counter_get(app->o.metrics, "wsapp_websocket_opened_total", "WebSocket connections opened", lab);
    app->m_dropped = metrics_counter_get(app->o.metrics, "wsapp_websocket_dropped_slow_total",
                                         "WebSocket connections dropped because their send queue was full", lab);
    app->m_oversize = metrics_counter_get(app->o.metrics, "wsapp_websocket_oversize_total",
                                          "Incoming WebSocket messages discarded for exceeding the frame limit", lab);
    app->m_refused = metrics_counter_get(app->o.metrics, "wsapp_websocket_refused_total",
                                         "WebSocket handshakes refused before the upgrade", lab);
    app->m_head_timeouts = metrics_counter_get(app->o.metrics, "wsapp_http_header_timeouts_total",
                                               "Connections answered 408 because their request head took too long",
                                               lab);
    app->m_msg_timeouts = metrics_counter_get(app->o.metrics, "wsapp_websocket_message_timeouts_total",
                                              "WebSocket connections closed 1008 because a message took too long", lab);
    app->m_msg_memory_cuts = metrics_counter_get(
        app->o.metrics, "wsapp_websocket_message_memory_cuts_total",
        "WebSocket connections closed 1009 because the messages in progress held message_memory_bytes", lab);
    app->m_msg_memory = metrics_gauge_get(app->o.metrics, "wsapp_websocket_message_memory_bytes",
                                          "Bytes held by unfinished incoming WebSocket messages", lab);
    ev_timer_init(&app->sweep, wsapp_sweep, (double)WSAPP_SWEEP_MS / 1000.0, (double)WSAPP_SWEEP_MS / 1000.0);
    return app;
}

static int wsapp_listen(wsapp *app, char *err, size_t errlen)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (app->o.reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) {
        snprintf(err, errlen, "SO_REUSEPORT: %s", strerror(errno));
        goto fail;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)app->o.port);
    if (!app->host[0] || strcmp(app->host, "0.0.0.0") == 0) {
        sa.sin_addr.s_addr = htonl(INADDR_ANY);
    } else if (strcmp(app->host, "localhost") == 0) {
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (inet_pton(AF_INET, app->host, &sa.sin_addr) != 1) {
        snprintf(err, errlen, "HOST %s is not an IPv4 address", app->host);
        goto fail;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        snprintf(err, errlen, "bind %s:%d: %s", app->host[0] ? app->host : "0.0.0.0", app->o.port, strerror(errno));
        goto fail;
    }
    if (listen(fd, 4096) < 0 || getsockname(fd, (struct sockaddr *)&sa, &sl) < 0) {
        snprintf(err, errlen, "listen: %s", strerror(errno));
        goto fail;
    }
    app->listen_fd = fd;
    app->port = ntohs(sa.sin_port);
    return 0;
fail:
    close(fd);
    return -1;
}

static void *wsapp_thread(void *arg)
{
    wsapp *app = arg;

    ev_run(app->loop, 0);
    /* The loop takes no more bytes: producers still writing (a replay to
     * a client slower than the stop's grace) must not wait for it. */
    while (app->streaming)
        wsapp_stream_detach(app->streaming);
    atomic_store(&app->done, 1);
    return NULL;
}

static void wsapp_lws_log(int level, const char *line)
{
    size_t n = strlen(line);
    char msg[512];

    /* lws 4.1 logs every adoption with a first read at error level. */
    if (strstr(line, "calling service") || strstr(line, "deferring handling ah"))
        return;
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        n--;
    if (n >= sizeof(msg))
        n = sizeof(msg) - 1;
    memcpy(msg, line, n);
    msg[n] = '\0';
    log_msgf(level & LLL_ERR ? LOG_ERROR : LOG_WARN, "libwebsockets: %s", msg);
}

int wsapp_start(wsapp *app, char *err, size_t errlen)
{
    struct lws_context_creation_info info;
    lws_sock_file_fd_type d;
    void *loops[1];

    if (app->started) {
        snprintf(err, errlen, "already started");
        return -1;
    }
    if (wsapp_listen(app, err, errlen) < 0)
        return -1;
    lws_set_log_level(LLL_ERR | LLL_WARN, wsapp_lws_log);
    app->protocols[0].name = "wsapp";
    app->protocols[0].callback = wsapp_cb;
    app->protocols[0].rx_buffer_size = WSAPP_RX_CHUNK;
    /* Without it lws 4.1 cuts every send to rx_buffer_size and buffers the
     * rest (a malloc, a copy and one more writable turn per KiB): a
     * backlog of frames joined into one write then cost more sends, not
     * fewer. It is a limit, not a buffer. */
    app->protocols[0].tx_packet_size = WSAPP_WRITE_CHUNK;
    app->protocols[1].name = "wsapp-head";
    app->protocols[1].callback = wsapp_raw_cb;
    memset(&info, 0, sizeof(info));
    info.port = CONTEXT_PORT_NO_LISTEN_SERVER;
    info.protocols = app->protocols;
    info.user = app;
    info.max_http_header_data = (unsigned short)(app->o.max_header > 65535 ? 65535 : app->o.max_header);
    info.max_http_header_pool = 256;
    info.timeout_secs = (unsigned int)app->o.http_timeout_s;
    info.keepalive_timeout = app->o.http_timeout_s;
    info.pt_serv_buf_size = 16384;
    info.options = LWS_SERVER_OPTION_DISABLE_IPV6 | LWS_SERVER_OPTION_LIBEV;
    loops[0] = app->loop;
    info.foreign_loops = loops;
    app->ctx = lws_create_context(&info);
    if (!app->ctx) {
        snprintf(err, errlen, "cannot create the libwebsockets context");
        return -1;
    }
    app->vh = lws_get_vhost_by_name(app->ctx, "default");
    d.filefd = app->listen_fd;
    app->listen_wsi = app->vh ? lws_adopt_descriptor_vhost(app->vh, LWS_ADOPT_RAW_FILE_DESC, d, "wsapp-head", NULL)
                              : NULL;
    if (!app->listen_wsi) {
        snprintf(err, errlen, "cannot watch the listening socket");
        return -1;
    }
    ev_timer_start(app->loop, &app->sweep);
    if (pthread_create(&app->thread, NULL, wsapp_thread, app) != 0) {
        snprintf(err, errlen, "cannot start the loop thread");
        return -1;
    }
    app->started = 1;
    return 0;
}

int wsapp_port(const wsapp *app) { return app->port; }
int wsapp_stopping(const wsapp *app) { return atomic_load(&((wsapp *)(uintptr_t)app)->stopping); }

void wsapp_stop(wsapp *app, int grace_ms)
{
    if (!app || !app->started || app->joined)
        return;
    if (!atomic_exchange(&app->stopping, 1)) {
        app->stop_deadline_ms = svc_now_ms() + (grace_ms > 0 ? grace_ms : 0);
        lws_cancel_service(app->ctx);
    }
    /* The loop may be asleep in poll with nothing to do: wake it until the
     * stop sequence has run and its deadline passed. */
    while (!atomic_load(&app->done)) {
        lws_cancel_service(app->ctx);
        usleep(20000);
    }
    pthread_join(app->thread, NULL);
    app->joined = 1;
}

void wsapp_free(wsapp *app)
{
    if (!app)
        return;
    wsapp_stop(app, 0);
    if (app->ctx) {
        lws_context_destroy(app->ctx);
        app->ctx = NULL;
    }
    if (app->loop) {
        ev_ref(app->loop);
        ev_prepare_stop(app->loop, &app->flush);
        ev_idle_stop(app->loop, &app->flush_more);
        ev_loop_destroy(app->loop);
    }
    free(app->dirty);
    /* Posts that never ran still own what they point at. */
    wsapp_run_posts(app);
    if (app->listen_fd >= 0 && !app->started)
        close(app->listen_fd);
    for (int i = 0; i < app->nhttp; i++)
        free(app->http[i].path);
    for (int i = 0; i < app->nws; i++)
        free(app->ws[i].path);
    free(app->scratch);
    free(app->http10);
    pthread_mutex_destroy(&app->post_lock);
    free(app);
}
