/* h1: see h1.h. One request per connection at a time; the worker's epoll
 * set watches the sockets (level-triggered). A busy connection is watched
 * for input, and for output only while a request is partly written, so a
 * request on a reused connection usually costs one send and one recv and
 * no epoll_ctl. Idle connections stay watched for input: any event on one
 * (the peer closed it) closes it.
 *
 * TLS (https) runs through OpenSSL on the same non-blocking socket: after
 * the connect, a handshake state drives SSL_do_handshake on the events it
 * asks for; then SSL_write and SSL_read stand in for send and recv. Read
 * ahead is off, so a record not yet read is still in the socket and epoll
 * reports it; SSL_read is called until it wants more all the same. */
#include "h1.h"

#include "fmt.h"
#include "hash.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define H1_KEY_MAX 600
#define H1_DETAIL_MAX 256 /* CURL_ERROR_SIZE: the caller keeps it where libcurl writes its own */
#define H1_READ_CHUNK 16384

/* ------------------------------------------------------------------ pool */

enum { C_FREE = 0, C_CONNECTING, C_HANDSHAKE, C_BUSY, C_IDLE };

struct h1_tls {
    SSL_CTX *ctx;
};

h1_tls *h1_tls_new(const char *ca_file, char *err, size_t errlen)
{
    h1_tls *t = calloc(1, sizeof(*t));
    int ok;

    if (!t || !(t->ctx = SSL_CTX_new(TLS_client_method()))) {
        snprintf(err, errlen, "out of memory");
        free(t);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    /* A peer that closes without close_notify (most servers after an idle
     * keep-alive) is an end of stream, as for libcurl. */
    SSL_CTX_set_options(t->ctx, SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_RENEGOTIATION);
    /* Not SSL_MODE_RELEASE_BUFFERS: a keep-alive connection would free and
     * allocate its record buffers for every request; a pool holds at most
     * 2 x slots + 8 connections, about 34 KiB each. */
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    ok = ca_file && *ca_file ? SSL_CTX_load_verify_locations(t->ctx, ca_file, NULL)
                             : SSL_CTX_set_default_verify_paths(t->ctx);
    if (ok != 1) {
        snprintf(err, errlen, "cannot load the CA certificates%s%.200s", ca_file && *ca_file ? " of " : "",
                 ca_file && *ca_file ? ca_file : "");
        h1_tls_free(t);
        return NULL;
    }
    return t;
}

void h1_tls_free(h1_tls *t)
{
    if (!t)
        return;
    SSL_CTX_free(t->ctx);
    free(t);
}

struct h1_req {
    h1_req *next;          /* in the done list */
    h1_request rq;
    size_t sent;
    long long deadline;
    int retried;
    int err;
    long status;
    struct h1_conn *conn;  /* NULL once finished */
    char key[H1_KEY_MAX];
    char tls_host[256];    /* "" for plain http */
    char detail[H1_DETAIL_MAX]; /* why a TLS failure happened */
    struct sockaddr_storage addr;
};

typedef struct h1_conn {
    int fd;                /* -1 when the slot is free */
    int state;
    uint32_t events;       /* registered with epoll */
    int reused;            /* a complete response came on it before */
    int got_bytes;         /* the current request saw response bytes */
    uint32_t gen;          /* bumped per socket: stale epoll events are ignored */
    unsigned hash;
    char key[H1_KEY_MAX];
    struct sockaddr_storage addr;
    socklen_t addrlen;
    h1_req *req;
    SSL *ssl;              /* https: the TLS session, NULL for plain http */
    h1_parser p;
} h1_conn;

struct h1_pool {
    int ep;
    int n, max_idle;
    int hi;                /* slots at or past this index were never used */
    int nidle;             /* connections in C_IDLE, of any host */
    h1_conn *conns;
    h1_req *done, *done_tail;
    h1_tls *tls;           /* borrowed; NULL: plain http only */
};

h1_pool *h1_pool_new(int epfd, int max_conns, int max_idle_per_host, h1_tls *tls)
{
    h1_pool *p = calloc(1, sizeof(*p));

    if (!p)
        return NULL;
    p->conns = calloc((size_t)max_conns, sizeof(*p->conns));
    if (!p->conns) {
        free(p);
        return NULL;
    }
    p->ep = epfd;
    p->tls = tls;
    p->n = max_conns;
    p->max_idle = max_idle_per_host;
    for (int i = 0; i < p->n; i++)
        p->conns[i].fd = -1;
    return p;
}

static void conn_close(h1_pool *p, h1_conn *c)
{
    p->nidle -= c->state == C_IDLE;
    /* No close_notify: the socket closes next, and the peer learns the
     * same from that. */
    SSL_free(c->ssl);
    c->ssl = NULL;
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->state = C_FREE;
    c->req = NULL;
    c->events = 0;
}

void h1_pool_free(h1_pool *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n; i++) {
        if (p->conns[i].req)
            free(p->conns[i].req);
        conn_close(p, &p->conns[i]);
    }
    while (p->done) {
        h1_req *r = p->done;

        p->done = r->next;
        free(r);
    }
    free(p->conns);
    free(p);
}

static void complete(h1_pool *p, h1_req *r, int err)
{
    r->err = err;
    r->conn = NULL;
    r->next = NULL;
    if (p->done_tail)
        p->done_tail->next = r;
    else
        p->done = r;
    p->done_tail = r;
}

static int watch(h1_pool *p, h1_conn *c, uint32_t events)
{
    struct epoll_event ev;

    if (c->events == events)
        return 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.u64 = H1_TAG | ((uint64_t)(c->gen & 0x3fffffffu) << 32) | (uint64_t)(c - p->conns);
    if (epoll_ctl(p->ep, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0)
        return -1;
    c->events = events;
    return 0;
}

static void attach(h1_pool *p, h1_req *r, int allow_idle);

/* The request on `c` failed with `err`. A reused connection that failed
 * before any answer was most likely closed by the peer while idle: the
 * request goes once more on a fresh connection. */
static void fail_conn(h1_pool *p, h1_conn *c, int err)
{
    h1_req *r = c->req;
    int stale = c->reused && !c->got_bytes &&
                (err == H1_E_SEND || err == H1_E_RECV || err == H1_E_NOTHING);

    conn_close(p, c);
    if (!r)
        return;
    if (stale && !r->retried) {
        r->retried = 1;
        r->sent = 0;
        attach(p, r, 0);
        return;
    }
    complete(p, r, err);
}

static int idle_count(const h1_pool *p, const h1_conn *c)
{
    int n = 0;

    /* Most answers find fewer idle connections in all than the per-host
     * limit: no need to look for this host's. */
    if (p->nidle < p->max_idle)
        return p->nidle;
    for (int i = 0; i < p->hi; i++) {
        const h1_conn *o = &p->conns[i];

        if (o->state == C_IDLE && o->hash == c->hash && !strcmp(o->key, c->key))
            n++;
    }
    return n;
}

static void done_ok(h1_pool *p, h1_conn *c, int reusable)
{
    h1_req *r = c->req;

    r->status = c->p.status;
    c->req = NULL;
    if (reusable && idle_count(p, c) < p->max_idle) {
        c->state = C_IDLE;
        p->nidle++;
        c->reused = 1;
        if (watch(p, c, EPOLLIN | EPOLLRDHUP) < 0)
            conn_close(p, c);
    } else {
        conn_close(p, c);
    }
    complete(p, r, H1_OK);
}

static void send_some(h1_pool *p, h1_conn *c)
{
    h1_req *r = c->req;

    while (r->sent < r->rq.len) {
        ssize_t n;

        if (c->ssl) {
            int k = SSL_write(c->ssl, r->rq.data + r->sent, (int)(r->rq.len - r->sent > 1 << 30 ? 1 << 30
                                                                                              : r->rq.len - r->sent));

            if (k > 0) {
                r->sent += (size_t)k;
                continue;
            }
            switch (SSL_get_error(c->ssl, k)) {
            case SSL_ERROR_WANT_WRITE:
            case SSL_ERROR_WANT_READ:
                if (watch(p, c, EPOLLIN | EPOLLRDHUP | EPOLLOUT) < 0)
                    fail_conn(p, c, H1_E_SEND);
                return;
            default:
                ERR_clear_error();
                fail_conn(p, c, H1_E_SEND);
                return;
            }
        }
        n = send(c->fd, r->rq.data + r->sent, r->rq.len - r->sent, MSG_NOSIGNAL);
        if (n > 0) {
            r->sent += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (watch(p, c, EPOLLIN | EPOLLRDHUP | EPOLLOUT) < 0)
                fail_conn(p, c, H1_E_SEND);
            return;
        } else {
            fail_conn(p, c, H1_E_SEND);
            return;
        }
    }
    if (watch(p, c, EPOLLIN | EPOLLRDHUP) < 0)
        fail_conn(p, c, H1_E_RECV);
}

static void recv_some(h1_pool *p, h1_conn *c)
{
    char tmp[H1_READ_CHUNK];

    for (;;) {
        ssize_t n;

        if (c->ssl) {
            int k = SSL_read(c->ssl, tmp, (int)sizeof(tmp));

            if (k > 0) {
                n = k;
            } else {
                switch (SSL_get_error(c->ssl, k)) {
                case SSL_ERROR_WANT_READ:
                    return;
                case SSL_ERROR_WANT_WRITE:
                    if (watch(p, c, EPOLLIN | EPOLLRDHUP | EPOLLOUT) < 0)
                        fail_conn(p, c, H1_E_RECV);
                    return;
                case SSL_ERROR_ZERO_RETURN:
                    n = 0; /* close_notify, or an EOF (SSL_OP_IGNORE_UNEXPECTED_EOF) */
                    break;
                default:
                    ERR_clear_error();
                    fail_conn(p, c, H1_E_RECV);
                    return;
                }
            }
        } else {
            n = recv(c->fd, tmp, sizeof(tmp), 0);
        }
        if (n > 0) {
            size_t used = 0;
            int rc;

            c->got_bytes = 1;
            rc = h1_parse(&c->p, tmp, (size_t)n, &used);
            if (rc == H1_PARSE_ERROR) {
                fail_conn(p, c, H1_E_PROTO);
                return;
            }
            if (rc == H1_PARSE_DONE) {
                /* Bytes after the response, or an answer before the whole
                 * request was sent, leave the connection in an unknown
                 * state: it is not reused. */
                done_ok(p, c, used == (size_t)n && c->req->sent == c->req->rq.len && h1_parse_reusable(&c->p));
                return;
            }
            if ((size_t)n < sizeof(tmp) && !c->ssl)
                return; /* level-triggered: epoll says when there is more */
        } else if (n == 0) {
            if (h1_parse_eof(&c->p) == H1_PARSE_DONE)
                done_ok(p, c, 0);
            else
                fail_conn(p, c, !c->got_bytes ? H1_E_NOTHING : h1_parse_in_body(&c->p) ? H1_E_PARTIAL : H1_E_PROTO);
            return;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else {
            fail_conn(p, c, H1_E_RECV);
            return;
        }
    }
}

/* The handshake failed: why, in libcurl's words, so that both clients'
 * error messages read alike. */
static int tls_failure(h1_conn *c)
{
    h1_req *r = c->req;
    long v = SSL_get_verify_result(c->ssl);
    unsigned long e = ERR_peek_last_error();

    if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH) {
        snprintf(r->detail, sizeof(r->detail), "SSL: no alternative certificate subject name matches target host name '%.180s'",
                 r->tls_host);
        ERR_clear_error();
        return H1_E_TLS_VERIFY;
    }
    if (v != X509_V_OK) {
        snprintf(r->detail, sizeof(r->detail), "SSL certificate problem: %s", X509_verify_cert_error_string(v));
        ERR_clear_error();
        return H1_E_TLS_VERIFY;
    }
    if (e) {
        char why[160];

        ERR_error_string_n(e, why, sizeof(why));
        snprintf(r->detail, sizeof(r->detail), "TLS handshake failed: %s", why);
    } else {
        snprintf(r->detail, sizeof(r->detail), "TLS handshake failed: connection closed");
    }
    ERR_clear_error();
    return H1_E_TLS;
}

/* Drives the handshake; on success the request is sent. */
static void handshake(h1_pool *p, h1_conn *c)
{
    int k = SSL_do_handshake(c->ssl);

    if (k == 1) {
        c->state = C_BUSY;
        send_some(p, c);
        return;
    }
    switch (SSL_get_error(c->ssl, k)) {
    case SSL_ERROR_WANT_READ:
        if (watch(p, c, EPOLLIN | EPOLLRDHUP) < 0)
            fail_conn(p, c, H1_E_TLS);
        return;
    case SSL_ERROR_WANT_WRITE:
        if (watch(p, c, EPOLLIN | EPOLLRDHUP | EPOLLOUT) < 0)
            fail_conn(p, c, H1_E_TLS);
        return;
    default:
        fail_conn(p, c, tls_failure(c));
        return;
    }
}

/* Sets up the TLS session of a connected socket: SNI for names, and the
 * name or address the certificate must carry. Returns 0 or -1. */
static int tls_start(h1_pool *p, h1_conn *c)
{
    const char *host = c->req->tls_host;
    unsigned char a[16];
    int ip = inet_pton(AF_INET, host, a) == 1 || inet_pton(AF_INET6, host, a) == 1;

    c->ssl = SSL_new(p->tls->ctx);
    if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1)
        return -1;
    if (ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host) != 1
           : SSL_set_tlsext_host_name(c->ssl, host) != 1 || SSL_set1_host(c->ssl, host) != 1)
        return -1;
    SSL_set_connect_state(c->ssl);
    c->state = C_HANDSHAKE;
    return 0;
}

static h1_conn *free_slot(h1_pool *p)
{
    h1_conn *idle = NULL;

    for (int i = 0; i < p->n; i++) {
        if (p->conns[i].state == C_FREE) {
            if (i >= p->hi)
                p->hi = i + 1;
            return &p->conns[i];
        }
        if (!idle && p->conns[i].state == C_IDLE)
            idle = &p->conns[i];
    }
    /* Full: the first idle connection (of any host) makes room. */
    if (idle)
        conn_close(p, idle);
    return idle;
}

static h1_conn *find_idle(h1_pool *p, const h1_req *r, unsigned hash)
{
    socklen_t alen = r->rq.addrlen;

    if (!p->nidle)
        return NULL;
    for (int i = 0; i < p->hi; i++) {
        h1_conn *c = &p->conns[i];

        if (c->state == C_IDLE && c->hash == hash && c->addrlen == alen && !strcmp(c->key, r->key) &&
            !memcmp(&c->addr, &r->addr, alen))
            return c;
    }
    return NULL;
}

static void bind_req(h1_conn *c, h1_req *r)
{
    c->req = r;
    c->got_bytes = 0;
    r->conn = c;
    h1_parser_init(&c->p, r->rq.head_only, r->rq.body, r->rq.on_header, r->rq.ud);
}

/* Puts `r` on a connection: an idle one for its key when allowed, else a
 * new one. */
static void attach(h1_pool *p, h1_req *r, int allow_idle)
{
    unsigned hash = hash_fnv1a_str(r->key);
    h1_conn *c = allow_idle ? find_idle(p, r, hash) : NULL;
    int fd, one = 1;

    if (r->tls_host[0] && !p->tls) {
        snprintf(r->detail, sizeof(r->detail), "TLS is not set up");
        complete(p, r, H1_E_TLS);
        return;
    }
    if (c) {
        c->state = C_BUSY;
        p->nidle--;
        bind_req(c, r);
        send_some(p, c);
        return;
    }
    c = free_slot(p);
    if (!c) {
        complete(p, r, H1_E_CONNECT);
        return;
    }
    fd = socket(r->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        complete(p, r, H1_E_CONNECT);
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    if (connect(fd, (const struct sockaddr *)&r->addr, r->rq.addrlen) < 0 && errno != EINPROGRESS) {
        close(fd);
        complete(p, r, H1_E_CONNECT);
        return;
    }
    c->fd = fd;
    c->gen++;
    c->state = C_CONNECTING;
    c->events = 0;
    c->reused = 0;
    c->hash = hash;
    fmt_copy(c->key, sizeof(c->key), r->key);
    memcpy(&c->addr, &r->addr, r->rq.addrlen);
    c->addrlen = r->rq.addrlen;
    bind_req(c, r);
    if (watch(p, c, EPOLLOUT | EPOLLIN | EPOLLRDHUP) < 0)
        fail_conn(p, c, H1_E_CONNECT);
}

int h1_start(h1_pool *p, const h1_request *rq, long long now, h1_req **out)
{
    h1_req *r = calloc(1, sizeof(*r));

    *out = NULL;
    if (!r)
        return -1;
    r->rq = *rq;
    /* A TLS connection is never reused for plain http, nor for another
     * name: its key carries both. */
    if (rq->tls_host && *rq->tls_host)
        snprintf(r->key, sizeof(r->key), "s %.256s %.300s", rq->tls_host, rq->key);
    else
        fmt_copy(r->key, sizeof(r->key), rq->key);
    if (rq->addrlen > sizeof(r->addr)) {
        free(r);
        return -1;
    }
    memcpy(&r->addr, rq->addr, rq->addrlen);
    r->rq.key = r->key;
    r->rq.addr = (const struct sockaddr *)&r->addr;
    fmt_copy(r->tls_host, sizeof(r->tls_host), rq->tls_host ? rq->tls_host : "");
    r->rq.tls_host = NULL; /* r->tls_host is the one to use */
    r->deadline = now + rq->timeout_ms;
    *out = r;
    attach(p, r, 1);
    return 0;
}

void h1_cancel(h1_pool *p, h1_req *r)
{
    if (!r)
        return;
    if (r->conn) {
        r->conn->req = NULL;
        conn_close(p, r->conn);
    } else {
        h1_req **pp = &p->done;

        p->done_tail = NULL;
        while (*pp) {
            if (*pp == r)
                *pp = r->next;
            else {
                p->done_tail = *pp;
                pp = &(*pp)->next;
            }
        }
    }
    free(r);
}

void h1_event(h1_pool *p, uint64_t tag, uint32_t events, long long now)
{
    uint64_t idx = tag & 0xffffffffu;
    h1_conn *c;

    (void)now;
    if (idx >= (uint64_t)p->n)
        return;
    c = &p->conns[idx];
    /* An event queued for a socket that was closed (and its slot reused)
     * earlier in the same epoll batch is not for this one. */
    if (c->fd < 0 || ((tag >> 32) & 0x3fffffffu) != (c->gen & 0x3fffffffu))
        return;
    switch (c->state) {
    case C_IDLE:
        conn_close(p, c); /* closed by the peer, or talking out of turn */
        return;
    case C_CONNECTING: {
        int err = 0;
        socklen_t el = sizeof(err);

        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) {
            fail_conn(p, c, H1_E_CONNECT);
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLIN | EPOLLHUP | EPOLLERR)))
            return;
        if (events & (EPOLLHUP | EPOLLERR)) {
            fail_conn(p, c, H1_E_CONNECT);
            return;
        }
        if (c->req->tls_host[0]) {
            if (tls_start(p, c) < 0) {
                snprintf(c->req->detail, sizeof(c->req->detail), "cannot set up TLS for %.200s", c->req->tls_host);
                ERR_clear_error();
                fail_conn(p, c, H1_E_TLS);
                return;
            }
            handshake(p, c);
            return;
        }
        c->state = C_BUSY;
        send_some(p, c);
        return;
    }
    case C_HANDSHAKE:
        handshake(p, c);
        return;
    case C_BUSY:
        /* TLS may need input to go on writing (a key update). */
        if ((events & (c->ssl ? EPOLLOUT | EPOLLIN : EPOLLOUT)) && c->req->sent < c->req->rq.len) {
            send_some(p, c);
            if (c->state != C_BUSY || !c->req)
                return;
        }
        if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
            recv_some(p, c);
        return;
    default:
        return;
    }
}

long long h1_next_due(const h1_pool *p)
{
    long long due = -1;

    for (int i = 0; i < p->hi; i++) {
        const h1_conn *c = &p->conns[i];

        if (c->req && (due < 0 || c->req->deadline < due))
            due = c->req->deadline;
    }
    return due;
}

void h1_expire(h1_pool *p, long long now)
{
    for (int i = 0; i < p->hi; i++) {
        h1_conn *c = &p->conns[i];

        if (c->req && c->req->deadline <= now) {
            h1_req *r = c->req;

            c->req = NULL;
            conn_close(p, c);
            complete(p, r, H1_E_TIMEOUT);
        }
    }
}

int h1_next_done(h1_pool *p, void **ud, long *status, char *detail, size_t dlen)
{
    h1_req *r = p->done;
    int err;

    if (!r)
        return -1;
    p->done = r->next;
    if (!p->done)
        p->done_tail = NULL;
    *ud = r->rq.ud;
    *status = r->err == H1_OK ? r->status : 0;
    if (dlen)
        fmt_copy(detail, dlen, r->detail);
    err = r->err;
    free(r);
    return err;
}

const char *h1_strerror(int err)
{
    switch (err) {
    case H1_OK:
        return "ok";
    case H1_E_TIMEOUT:
        return "timeout";
    case H1_E_CONNECT:
        return "cannot connect";
    case H1_E_SEND:
        return "send failed";
    case H1_E_RECV:
        return "receive failed";
    case H1_E_NOTHING:
        return "empty reply";
    case H1_E_PROTO:
        return "bad HTTP response";
    case H1_E_PARTIAL:
        return "partial response";
    case H1_E_NOMEM:
        return "out of memory";
    case H1_E_TLS_VERIFY:
        return "certificate not verified";
    case H1_E_TLS:
        return "TLS failed";
    default:
        return "unknown error";
    }
}
