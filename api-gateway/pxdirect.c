#include "pxdirect.h"

#include <ctype.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <microhttpd.h>

#include "breaker.h"
#include "buf.h"
#include "curlep.h"
#include "fmt.h"
#include "h1parse.h"
#include "httpstream.h"
#include "log.h"
#include "pxhdr.h"
#include "svc.h"

#include "pxint.h"
#include "pxfront.h"

/* ---- the direct path (loop mode, http://, requests without a body) -------
 *
 * libcurl costs about half of a small proxied request's CPU (its own
 * bookkeeping, a liveness poll() of each reused connection and another
 * after each send); nginx does the exchange in one send and one recv. So in
 * loop mode a request without a body to an http:// upstream is written by
 * the loop itself on a kept-alive connection of its own pool and its answer
 * read with libshared/h1parse. Uploads, https and upstreams that could not
 * be resolved at start stay on libcurl. Everything here runs on the loop's
 * thread (the request's own), so nothing is locked but what the MHD side
 * shares (r->mu). The sockets are watched level-triggered: for input all
 * the time (an idle connection's event means the upstream closed it), for
 * output only while a connect or a partial send is pending. */

const char *px_direct_strerror(CURLcode rc)
{
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT: return "no answer in time";
    case CURLE_COULDNT_CONNECT: return "connection failed";
    case CURLE_SEND_ERROR: return "send failed";
    case CURLE_RECV_ERROR: return "receive failed or a malformed answer";
    case CURLE_GOT_NOTHING: return "closed without answering";
    default: return "failed";
    }
}

static uint64_t px_conn_tag(const pxconn *c)
{
    return PX_TAG | ((uint64_t)(c->gen & 0x1fffffffu) << 32) | (uint64_t)(unsigned)c->slot;
}

/* c->events while the socket is out of the epoll set: a paused transfer
 * whose upstream hung up (level-triggered, the hang-up would be reported
 * on every turn until the client drains). */
#define PX_EV_REMOVED 0xffffffffu

static void px_conn_watch(pxloop *l, pxconn *c, uint32_t events)
{
    struct epoll_event ev;

    if (c->events == events)
        return;
    memset(&ev, 0, sizeof(ev));
    ev.events = events;
    ev.data.u64 = px_conn_tag(c);
    if (epoll_ctl(l->epfd, c->events == PX_EV_REMOVED ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->events = events;
}

static void px_conn_close(pxloop *l, pxconn *c)
{
    if (c->events != PX_EV_REMOVED)
        epoll_ctl(l->epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    l->nopen[c->up]--;
    l->conns[c->slot] = NULL;
    l->free_slots[l->nfree++] = c->slot;
    free(c);
}

/* A new connection to `u`, connecting (non-blocking). NULL on failure. */
static pxconn *px_conn_open(pxloop *l, upstream *u)
{
    pxconn *c;
    struct epoll_event ev;
    int one = 1, slot;

    if (l->nfree == 0) {
        int cap = l->capconns ? l->capconns * 2 : 64;
        pxconn **nc = realloc(l->conns, (size_t)cap * sizeof(*nc));
        int *nf;

        if (!nc)
            return NULL;
        l->conns = nc;
        nf = realloc(l->free_slots, (size_t)cap * sizeof(*nf));
        if (!nf)
            return NULL;
        l->free_slots = nf;
        for (int i = cap - 1; i >= l->capconns; i--) {
            l->conns[i] = NULL;
            l->free_slots[l->nfree++] = i;
        }
        l->capconns = cap;
    }
    c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->fd = socket(u->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        free(c);
        return NULL;
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(c->fd, (const struct sockaddr *)&u->addr, u->addrlen) < 0) {
        if (errno != EINPROGRESS) {
            close(c->fd);
            free(c);
            return NULL;
        }
        c->connecting = 1;
    }
    slot = l->free_slots[--l->nfree];
    c->slot = slot;
    c->gen = ++l->gen;
    c->up = u->index;
    c->events = EPOLLIN | (c->connecting ? EPOLLOUT : 0);
    memset(&ev, 0, sizeof(ev));
    ev.events = c->events;
    ev.data.u64 = px_conn_tag(c);
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        close(c->fd);
        free(c);
        l->free_slots[l->nfree++] = slot;
        return NULL;
    }
    l->conns[slot] = c;
    l->nopen[c->up]++;
    return c;
}

/* Detaches the request's connection: kept idle when `reuse`, else closed. */
void px_direct_release(pxloop *l, pxreq *r, int reuse)
{
    pxconn *c = r->conn;

    if (!c)
        return;
    r->conn = NULL;
    c->owner = NULL;
    if (reuse && !c->connecting && l->nidle[c->up] < PX_IDLE_MAX && !atomic_load(&l->stop)) {
        c->reused = 1;
        px_conn_watch(l, c, EPOLLIN);
        c->next_idle = l->idle[c->up];
        l->idle[c->up] = c;
        l->nidle[c->up]++;
        return;
    }
    px_conn_close(l, c);
}

static void px_direct_header(void *ud, const char *line, size_t n)
{
    pxreq *r = ud;
    size_t keep = 0;
    long long num = 0;

    if (r->conn && r->conn->p.status < 200)
        return; /* an interim answer's headers */
    switch (pxhdr_response_line(line, n, &num, &keep)) {
    case PXHDR_LENGTH:
        r->declared_len = num;
        break;
    case PXHDR_KEEP:
        if (r->rh.len + keep + 1 <= PX_HDR_MAX) {
            buf_append(&r->rh, line, keep);
            buf_append(&r->rh, "\n", 1);
        }
        break;
    default:
        break;
    }
}

static void px_direct_send(pxloop *l, pxreq *r);

/* Binds a connection (an idle one unless `fresh`) and sends. */
static void px_direct_attach(pxloop *l, pxreq *r, int fresh)
{
    upstream *u = r->up;
    pxconn *c = NULL;

    if (!fresh && l->idle[u->index]) {
        c = l->idle[u->index];
        l->idle[u->index] = c->next_idle;
        l->nidle[u->index]--;
        c->next_idle = NULL;
    } else if (l->nopen[u->index] < r->px->cfg.max_conns_per_upstream) {
        c = px_conn_open(l, u);
    } else {
        /* Every connection this loop may open to it is busy: our limit,
         * not the upstream's failure, so no verdict for the breaker. */
        breaker_cancel(r->px->brk, u->name);
        r->breaker_reported = 1;
        px_finish(l, r, CURLE_FAILED_INIT, "too many requests in flight to this upstream");
        return;
    }
    if (!c) {
        px_finish(l, r, CURLE_COULDNT_CONNECT, NULL);
        return;
    }
    c->owner = r;
    r->conn = c;
    r->sent = 0;
    r->got_bytes = 0;
    buf_reset(&r->rh);
    r->declared_len = -1;
    h1_parser_init(&c->p, 0, &r->stage, px_direct_header, r);
    if (c->connecting) {
        long ct = r->px->cfg.connect_timeout_ms < u->timeout_ms ? r->px->cfg.connect_timeout_ms : u->timeout_ms;

        r->deadline = svc_now_ms() + ct;
        return; /* sent once connected */
    }
    r->deadline = svc_now_ms() + u->timeout_ms;
    px_direct_send(l, r);
}

/* A reused connection failed before any answer (the upstream closed it
 * while idle): once more on a fresh one, else `rc`. */
static void px_direct_retry_or_fail(pxloop *l, pxreq *r, CURLcode rc)
{
    int again = r->conn && r->conn->reused && !r->got_bytes && !r->retried;

    px_direct_release(l, r, 0);
    if (again) {
        r->retried = 1;
        px_direct_attach(l, r, 1);
        return;
    }
    px_finish(l, r, rc, NULL);
}

static void px_direct_send(pxloop *l, pxreq *r)
{
    pxconn *c = r->conn;

    while (r->sent < r->out_req.len) {
        ssize_t n = send(c->fd, r->out_req.p + r->sent, r->out_req.len - r->sent, MSG_NOSIGNAL);

        if (n > 0) {
            r->sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            px_conn_watch(l, c, EPOLLIN | EPOLLOUT);
            return;
        }
        px_direct_retry_or_fail(l, r, CURLE_SEND_ERROR);
        return;
    }
    px_conn_watch(l, c, EPOLLIN);
}

/* The response is complete and its body handed on. */
static void px_direct_complete(pxloop *l, pxreq *r)
{
    px_finish(l, r, r->headers_done ? CURLE_OK : CURLE_RECV_ERROR, NULL);
}

/* Hands the staged body bytes on: whole for a small answer, to the stream
 * otherwise (a full stream pauses the reading until it drains). */
void px_direct_flush(pxloop *l, pxreq *r)
{
    if (r->stage.len) {
        if (!r->streaming) {
            if (buf_append(&r->body, r->stage.p, r->stage.len) < 0 || r->body.truncated) {
                px_finish(l, r, CURLE_RECV_ERROR, NULL);
                return;
            }
        } else {
            int rc = r->front ? pxfront_stream_write(r, r->stage.p, r->stage.len)
                     : r->out  ? httpstream_write(r->out, r->stage.p, r->stage.len)
                               : -1;

            if (!r->front)
                atomic_store_explicit(&l->wrote, 1, memory_order_relaxed);
            if (rc == 1) {
                r->write_paused = 1;
                if (r->conn)
                    px_conn_watch(l, r->conn, 0);
                return;
            }
            if (rc < 0) {
                px_finish(l, r, CURLE_WRITE_ERROR, NULL);
                return;
            }
        }
        buf_reset(&r->stage);
    }
    if (r->done_pending) {
        px_direct_complete(l, r);
        return;
    }
    if (r->conn && (r->conn->events == 0 || r->conn->events == PX_EV_REMOVED))
        px_conn_watch(l, r->conn, EPOLLIN | (r->sent < r->out_req.len ? EPOLLOUT : 0));
    r->deadline = svc_now_ms() + r->up->timeout_ms;
}

/* After the parser took bytes: answer from the headers on, hand the body
 * on, finish on the end of the response. */
static void px_direct_parsed(pxloop *l, pxreq *r, int rc, int reusable)
{
    pxconn *c = r->conn;

    if (rc == H1_PARSE_ERROR) {
        if (log_enabled(LOG_WARN))
            log_warn("proxy: %s: %s", r->up->name, c->p.err);
        px_finish(l, r, CURLE_RECV_ERROR, NULL);
        return;
    }
    if (!r->headers_done && h1_parse_head_done(&c->p)) {
        r->status = (int)c->p.status;
        if (c->p.chunked)
            r->declared_len = -1; /* Transfer-Encoding wins over Content-Length */
        px_headers_done(r);
        if (!r->conn)
            return;
    }
    if (rc == H1_PARSE_DONE) {
        /* The connection is done with; the request may still wait for a
         * slow client to take the last bytes. */
        px_direct_release(l, r, reusable && r->sent == r->out_req.len);
        r->done_pending = 1;
    }
    px_direct_flush(l, r);
}

static void px_direct_read(pxloop *l, pxreq *r)
{
    pxconn *c = r->conn;
    char tmp[PX_READ_CHUNK];
    ssize_t n = recv(c->fd, tmp, sizeof(tmp), 0);

    if (n > 0) {
        size_t used = 0;
        int rc = h1_parse(&c->p, tmp, (size_t)n, &used);

        if (r->stage.truncated)
            rc = H1_PARSE_ERROR;
        r->got_bytes = 1;
        r->deadline = svc_now_ms() + r->up->timeout_ms;
        px_direct_parsed(l, r, rc, rc == H1_PARSE_DONE && used == (size_t)n && h1_parse_reusable(&c->p));
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;
    if (!r->got_bytes) {
        px_direct_retry_or_fail(l, r, n == 0 ? CURLE_GOT_NOTHING : CURLE_RECV_ERROR);
        return;
    }
    if (n == 0 && h1_parse_eof(&c->p) == H1_PARSE_DONE) {
        px_direct_parsed(l, r, H1_PARSE_DONE, 0);
        return;
    }
    px_finish(l, r, CURLE_RECV_ERROR, NULL);
}

void px_direct_event(pxloop *l, uint64_t tag, uint32_t events)
{
    int slot = (int)(tag & 0xffffffffu);
    pxconn *c = slot < l->capconns ? l->conns[slot] : NULL;
    pxreq *r;

    if (!c || (c->gen & 0x1fffffffu) != ((tag >> 32) & 0x1fffffffu))
        return; /* closed meanwhile */
    r = c->owner;
    if (!r) {
        /* Idle: the upstream closed it (or sent what nobody asked for). */
        pxconn **pp = &l->idle[c->up];

        while (*pp && *pp != c)
            pp = &(*pp)->next_idle;
        if (*pp) {
            *pp = c->next_idle;
            l->nidle[c->up]--;
        }
        px_conn_close(l, c);
        return;
    }
    if (r->write_paused) {
        if (events & (EPOLLHUP | EPOLLERR)) {
            epoll_ctl(l->epfd, EPOLL_CTL_DEL, c->fd, NULL);
            c->events = PX_EV_REMOVED;
        }
        return; /* read again once the client drained */
    }
    if (c->connecting) {
        int err = 0;
        socklen_t len = sizeof(err);

        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
            px_finish(l, r, CURLE_COULDNT_CONNECT, NULL);
            return;
        }
        c->connecting = 0;
        r->deadline = svc_now_ms() + r->up->timeout_ms;
        px_direct_send(l, r);
        return;
    }
    if ((events & EPOLLOUT) && r->sent < r->out_req.len) {
        px_direct_send(l, r);
        if (r->conn != c)
            return;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
        px_direct_read(l, r);
}

/* Times out direct transfers whose upstream has been silent too long (or
 * did not connect in time); not those waiting for a slow client. */
void px_direct_expire(pxloop *l, long long now)
{
    pxreq *r, *next;

    if (now < l->next_scan)
        return;
    l->next_scan = now + 50;
    for (r = l->running; r; r = next) {
        next = r->next;
        if (r->direct && !r->write_paused && !r->done_pending && r->deadline && r->deadline <= now)
            px_finish(l, r, CURLE_OPERATION_TIMEDOUT, NULL);
    }
}

/* Builds the request bytes: request line, Host, the client's headers as
 * pxhdr emits them (libcurl's deletion markers "Name:" left out, "Name;"
 * sent as an empty value). 0, -1 out of memory, -2 a line too long. */
static int px_direct_line(void *ud, const char *line)
{
    pxreq *r = ud;
    size_t n = strlen(line);

    if (n && line[n - 1] == ':')
        return 0; /* "Expect:", "Accept:": libcurl's way of not sending one */
    if (n && line[n - 1] == ';') {
        if (buf_append(&r->out_req, line, n - 1) < 0 || buf_append(&r->out_req, ":\r\n", 3) < 0)
            return -1;
        return 0;
    }
    if (buf_append(&r->out_req, line, n) < 0 || buf_append(&r->out_req, "\r\n", 2) < 0)
        return -1;
    return 0;
}

/* The request's bytes for the upstream: request line, Host, the headers
 * pxhdr makes of `src`'s (each), the end of the head. 0, -1 out of
 * memory, -2 a header line too long (pxhdr_request). */
int px_direct_build(pxreq *r, const char *method, const char *rest, pxhdr_each each, const void *src,
                    const pxhdr_req_info *info)
{
    int rc;

    buf_init(&r->out_req, 256 * 1024);
    buf_init(&r->stage, 2 * PX_READ_CHUNK);
    if (buf_puts(&r->out_req, method) < 0 || buf_append(&r->out_req, " ", 1) < 0 ||
        buf_puts(&r->out_req, r->up->base) < 0 || (rest[0] != '/' && buf_append(&r->out_req, "/", 1) < 0) ||
        buf_puts(&r->out_req, rest) < 0 || buf_puts(&r->out_req, " HTTP/1.1\r\nHost: ") < 0 ||
        buf_puts(&r->out_req, r->up->hostport) < 0 || buf_append(&r->out_req, "\r\n", 2) < 0)
        return -1;
    rc = pxhdr_request(each, src, info, px_direct_line, r);
    if (rc < 0)
        return rc;
    if (buf_append(&r->out_req, "\r\n", 2) < 0 || r->out_req.truncated)
        return -1;
    r->direct = 1;
    return 0;
}

int px_direct_setup(pxreq *r, httpd_req *req, const char *rest)
{
    pxhdr_req_info info = {httpd_req_remote(req), httpd_req_id(req), "http"};

    return px_direct_build(r, httpd_req_method(req), rest, px_each_header, req, &info);
}

/* Starts a direct transfer on the request's own loop (we are on its
 * thread, inside libmicrohttpd's run). */
void px_direct_start(pxloop *l, pxreq *r)
{
    px_link(l, r);
    if (atomic_load(&l->stop)) {
        px_finish(l, r, CURLE_FAILED_INIT, "the gateway is stopping");
        return;
    }
    px_direct_attach(l, r, 0);
}

/* Whether a request goes the direct way: loop mode, an upstream resolved
 * at start, and no body (no Content-Length above 0, no Transfer-Encoding,
 * not a method that carries one). */
int px_direct_fits(proxy *px, upstream *u, httpd_req *req)
{
    const char *m = httpd_req_method(req), *clen;

    if (!px->external || !px->cfg.direct || !u->direct || httpd_req_header(req, "Transfer-Encoding"))
        return 0;
    if (strcmp(m, "GET") != 0 && strcmp(m, "DELETE") != 0)
        return 0;
    clen = httpd_req_header(req, "Content-Length");
    return !clen || strcmp(clen, "0") == 0;
}

/* Resolves an upstream's address for the direct path once, at start (a
 * name is looked up here, never per request). An upstream that cannot be
 * resolved now, or is https, stays on libcurl. */
void px_direct_prepare(upstream *u)
{
    CURLU *cu = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
    struct addrinfo hints, *res = NULL;

    u->direct = 0;
    if (!cu || curl_url_set(cu, CURLUPART_URL, u->url, 0) != CURLUE_OK ||
        curl_url_get(cu, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK || strcasecmp(scheme, "http") != 0 ||
        curl_url_get(cu, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(cu, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK ||
        curl_url_get(cu, CURLUPART_PATH, &path, 0) != CURLUE_OK)
        goto out;
    {
        char h[256];
        size_t hl = strlen(host);

        if (hl >= sizeof(h))
            goto out;
        if (hl > 2 && host[0] == '[') {
            memcpy(h, host + 1, hl - 2);
            h[hl - 2] = '\0';
        } else {
            memcpy(h, host, hl + 1);
        }
        memset(&hints, 0, sizeof(hints));
        hints.ai_socktype = SOCK_STREAM;
        if (getaddrinfo(h, port, &hints, &res) != 0 || !res || res->ai_addrlen > sizeof(u->addr))
            goto out;
    }
    memcpy(&u->addr, res->ai_addr, res->ai_addrlen);
    u->addrlen = res->ai_addrlen;
    {
        /* Host as libcurl sends it: the port only when it is not 80. */
        char *given_port = NULL;
        int has_port = curl_url_get(cu, CURLUPART_PORT, &given_port, 0) == CURLUE_OK && strcmp(given_port, "80");

        snprintf(u->hostport, sizeof(u->hostport), "%s%s%s", host, has_port ? ":" : "", has_port ? given_port : "");
        curl_free(given_port);
    }
    /* The base path without its trailing slash ("/" alone: none). */
    fmt_copy(u->base, sizeof(u->base), strcmp(path, "/") == 0 ? "" : path);
    u->direct = 1;
out:
    if (res)
        freeaddrinfo(res);
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_url_cleanup(cu);
}

void px_direct_fini(pxloop *l)
{
    for (int i = 0; i < l->capconns; i++)
        if (l->conns[i])
            px_conn_close(l, l->conns[i]);
    memset(l->idle, 0, sizeof(l->idle));
    memset(l->nidle, 0, sizeof(l->nidle));
    free(l->conns);
    free(l->free_slots);
    l->conns = NULL;
    l->free_slots = NULL;
    l->capconns = l->nfree = 0;
}
