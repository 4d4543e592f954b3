#include "proxy.h"

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
#include "pxdirect.h"
#include "pxfront.h"

static void pxfront_readable(pxloop *l, pxfront *f);

/* ---- the front (loop mode): kept-alive client connections ------------------
 *
 * libmicrohttpd costs a proxied request more than the proxying does: it
 * suspends and resumes the waiting connection (an epoll_ctl DEL and ADD),
 * reads until EAGAIN after each request, runs its own epoll set and builds
 * its request and response records. So once libmicrohttpd has parsed a
 * connection's direct-path request (GET or DELETE, no body, an http://
 * upstream) and holds nothing read beyond it (httpd_req_take_socket), the
 * loop takes the socket and serves that request and those that follow on
 * the connection itself: a request head is peeked (recv MSG_PEEK) and
 * parsed with h1parse's strict request parser; one that is not a plain
 * direct-path request (a body, another route, an Origin, an upgrade, a
 * head that is incomplete, malformed or large, HTTP/1.0) is left unread
 * and the socket given back to libmicrohttpd (httpd_loop_add_connection),
 * which serves it as any new connection, with the hook, limits, deadlines
 * and errors of its path. One that is plain is read (the head's bytes
 * exactly), forwarded on the direct path, and answered here: the same
 * headers (pxhdr), Date, X-Request-Id, Content-Length or chunked, in one
 * send when it fits. The front keeps what httpd does for a request: the
 * request id, the hook's verdict (proxy_front_guard: the rate limit), the
 * request metrics and access log (httpd_account), the connection and
 * per-address limits (httpd_loop_conn_hold), the idle timeout, and on
 * shutdown the answer to what is in flight. */

/* Frees the front's slot and record; `fd_too` closes the socket. */
static void pxfront_free(pxloop *l, pxfront *f, int fd_too)
{
    epoll_ctl(l->epfd, EPOLL_CTL_DEL, f->fd, NULL);
    httpd_loop_conn_release(l->hl, (const struct sockaddr *)&f->addr);
    if (fd_too)
        close(f->fd);
    buf_free(&f->out);
    l->fronts[f->slot] = NULL;
    l->ffree[l->nffree++] = f->slot;
    l->nfronts--;
    free(f);
}

static pxfront *pxfront_new(pxloop *l, int fd, const struct sockaddr_storage *addr, unsigned int alen)
{
    pxfront *f;
    struct epoll_event ev;

    if (l->nffree == 0) {
        int cap = l->capfronts ? l->capfronts * 2 : 64;
        pxfront **nf = realloc(l->fronts, (size_t)cap * sizeof(*nf));
        int *nfree;

        if (!nf)
            return NULL;
        l->fronts = nf;
        nfree = realloc(l->ffree, (size_t)cap * sizeof(*nfree));
        if (!nfree)
            return NULL;
        l->ffree = nfree;
        for (int i = cap - 1; i >= l->capfronts; i--) {
            l->fronts[i] = NULL;
            l->ffree[l->nffree++] = i;
        }
        l->capfronts = cap;
    }
    if (!l->peek && !(l->peek = malloc(PX_FRONT_HEAD_MAX + 1)))
        return NULL;
    f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    f->fd = fd;
    memcpy(&f->addr, addr, alen);
    f->alen = alen;
    if (addr->ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)addr)->sin6_addr, f->remote,
                  sizeof(f->remote));
    else
        inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)addr)->sin_addr, f->remote,
                  sizeof(f->remote));
    buf_init(&f->out, PX_OUT_MAX + PX_SMALL_MAX + 2 * PX_HDR_MAX);
    f->slot = l->ffree[--l->nffree];
    f->gen = ++l->fgen;
    /* Edge-triggered, registered once: no epoll_ctl per request. Input
     * that comes while a request is in flight is remembered (`readable`)
     * and read once the connection is idle again. */
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = PX_FTAG | ((uint64_t)(f->gen & 0x0fffffffu) << 32) | (uint64_t)(unsigned)f->slot;
    if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        l->ffree[l->nffree++] = f->slot;
        free(f);
        return NULL;
    }
    l->fronts[f->slot] = f;
    l->nfronts++;
    httpd_loop_conn_hold(l->hl, (const struct sockaddr *)&f->addr);
    return f;
}

/* Writes what the socket takes of `out`: 0, or -1 (the client is gone). */
static int pxfront_send(pxfront *f)
{
    size_t off0 = f->out_off;

    while (f->out_off < f->out.len) {
        ssize_t n = send(f->fd, f->out.p + f->out_off, f->out.len - f->out_off, MSG_NOSIGNAL);

        if (n > 0) {
            f->out_off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            /* The rest on EPOLLOUT; the client's stall runs from its last
             * read (pxfront_expire). */
            if (f->out_off > off0 || !f->stall_ms)
                f->stall_ms = svc_now_ms();
            return 0;
        }
        f->dead = 1;
        return -1;
    }
    f->stall_ms = 0;
    /* An idle connection keeps a small buffer for the next answer, not
     * what a large one grew it to. */
    if (f->out.cap > 16384)
        buf_free(&f->out);
    else
        buf_reset(&f->out);
    f->out_off = 0;
    return 0;
}

/* After a write: close, wait for the next request, or for the socket. */
static void pxfront_settle(pxloop *l, pxfront *f)
{
    if (f->dead || (f->closing && !f->cur && f->out_off >= f->out.len)) {
        pxfront_free(l, f, 1);
        return;
    }
    if (f->out_off < f->out.len || f->cur)
        return; /* the rest on EPOLLOUT; the answer still to come */
    f->idle_since = svc_now_ms();
    if (f->hup && !f->readable) {
        pxfront_free(l, f, 1); /* the client half-closed and sent nothing more */
        return;
    }
    if (f->readable) {
        /* A request is waiting (pipelined, or sent early): read it now, or
         * from the tick when this runs inside the answer to the last one. */
        if (l->fdepth < 4) {
            l->fdepth++;
            pxfront_readable(l, f);
            l->fdepth--;
        } else {
            l->fkick = 1;
        }
    }
}

static void pxfront_emit(void *ud, const char *name, const char *value)
{
    buf *b = ud;

    buf_puts(b, name);
    buf_append(b, ": ", 2);
    buf_puts(b, value);
    buf_append(b, "\r\n", 2);
}

/* Appends an answer's head. `len`: the body's length, -1 chunked, -2 none
 * (204, 304). */
static void pxfront_head(pxloop *l, pxfront *f, const pxfinfo *fi, int status, const char *lines, size_t llen,
                         const char *ctype, long long len, const char *xname, const char *xvalue)
{
    const char *reason = MHD_get_reason_phrase_for((unsigned int)status);
    char num[FMT_I64_MAX];
    time_t t = time(NULL);
    buf *b = &f->out;

    if (t != l->date_s) {
        httpd_date(l->date, sizeof(l->date));
        l->date_s = t;
    }
    buf_puts(b, "HTTP/1.1 ");
    fmt_i64(num, status);
    buf_puts(b, num);
    buf_append(b, " ", 1);
    buf_puts(b, reason ? reason : "");
    buf_append(b, "\r\n", 2);
    pxfront_emit(b, "Date", l->date);
    if (lines)
        pxhdr_response(lines, llen, pxfront_emit, b);
    if (ctype)
        pxfront_emit(b, "Content-Type", ctype);
    if (xname)
        pxfront_emit(b, xname, xvalue);
    pxfront_emit(b, "X-Request-Id", fi->rid);
    if (len >= 0) {
        fmt_i64(num, len);
        pxfront_emit(b, "Content-Length", num);
    } else if (len == -1) {
        pxfront_emit(b, "Transfer-Encoding", "chunked");
    }
    if (!fi->keep || atomic_load(&l->px->stopping)) {
        pxfront_emit(b, "Connection", "close");
        f->closing = 1;
    }
    buf_append(b, "\r\n", 2);
}

static void pxfront_account(pxloop *l, const pxfinfo *fi, const char *remote, int status, int aborted)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    httpd_account(httpd_loop_server(l->hl), fi->method, fi->path, status,
                  (double)(now.tv_sec - fi->t0.tv_sec) + (double)(now.tv_nsec - fi->t0.tv_nsec) / 1e9, fi->rid,
                  remote, aborted);
}

/* The request in flight on `f` is over: counted, and the connection
 * free for the next one. Drops the front's reference. */
static void pxfront_over(pxloop *l, pxreq *r, int status, int aborted)
{
    pxfront *f = r->front;

    r->front = NULL;
    if (f) {
        pxfront_account(l, &r->fi, f->remote, status, aborted);
        f->cur = NULL;
        if (!r->fi.keep || atomic_load(&r->px->stopping))
            f->closing = 1;
    }
    px_unref(r);
}

/* A whole answer (head and body) to the request in flight, or to one
 * refused before it started (`r` NULL). */
void pxfront_reply(pxloop *l, pxfront *f, pxreq *r, const pxfinfo *fi, int status, const char *lines,
                   size_t llen, const char *ctype, const char *body, size_t blen, const char *xname,
                   const char *xvalue)
{
    int nobody = status == 204 || status == 304;

    pxfront_head(l, f, fi, status, lines, llen, ctype, nobody ? -2 : (long long)blen, xname, xvalue);
    if (!nobody && blen)
        buf_append(&f->out, body, blen);
    if (f->out.truncated)
        f->dead = 1;
    if (r)
        pxfront_over(l, r, status, 0);
    else {
        pxfront_account(l, fi, f->remote, status, 0);
        if (!fi->keep)
            f->closing = 1;
    }
    if (!f->dead)
        pxfront_send(f);
    pxfront_settle(l, f);
}

void pxfront_error(pxloop *l, pxfront *f, pxreq *r, const pxfinfo *fi, int status, const char *code,
                   const char *msg, const char *xname, const char *xvalue)
{
    cJSON *b = httpd_error_body(status, code, msg, NULL, fi->rid);
    char *text = b ? cJSON_PrintUnformatted(b) : NULL;

    cJSON_Delete(b);
    pxfront_reply(l, f, r, fi, status, NULL, 0, "application/json", text ? text : "{}", text ? strlen(text) : 2,
                  xname, xvalue);
    free(text);
}

/* The answer of `r` streams (large, chunked, an event stream): its head. */
void pxfront_stream_start(pxloop *l, pxreq *r, int sse, const char *lines, size_t llen)
{
    pxfront *f = r->front;

    r->f_streaming = 1;
    f->chunked = sse || r->declared_len < 0;
    pxfront_head(l, f, &r->fi, r->status, lines, llen, NULL, f->chunked ? -1 : r->declared_len,
                 sse ? "X-Accel-Buffering" : NULL, "no");
    pxfront_send(f); /* a failure is seen by the next write */
}

/* Body bytes of a streamed answer: 0 taken, 1 not taken (the client is
 * slow: the caller pauses until the front drains), -1 the client is gone. */
int pxfront_stream_write(pxreq *r, const char *data, size_t n)
{
    pxfront *f = r->front;
    char hex[24];

    if (!f || f->dead)
        return -1;
    if (f->out.len - f->out_off > PX_OUT_MAX)
        return 1;
    /* A client that reads slowly never drains `out` whole, and only a whole
     * drain resets it: move the unsent rest to the front, so what is held
     * stays under PX_OUT_MAX plus one write, never the stream's length. */
    if (f->out_off) {
        memmove(f->out.p, f->out.p + f->out_off, f->out.len - f->out_off);
        f->out.len -= f->out_off;
        f->out.p[f->out.len] = '\0';
        f->out_off = 0;
    }
    if (f->chunked) {
        int k = snprintf(hex, sizeof(hex), "%zx\r\n", n);

        buf_append(&f->out, hex, (size_t)k);
    }
    buf_append(&f->out, data, n);
    if (f->chunked)
        buf_append(&f->out, "\r\n", 2);
    if (f->out.truncated || pxfront_send(f) < 0)
        return -1;
    return 0;
}

/* The streamed answer ended (`broken`: cut, so the client must see the
 * connection end rather than a complete answer). */
void pxfront_stream_end(pxloop *l, pxreq *r, int broken)
{
    pxfront *f = r->front;

    if (!f)
        return;
    if (broken)
        f->closing = 1;
    else if (f->chunked)
        buf_append(&f->out, "0\r\n\r\n", 5);
    f->chunked = 0;
    pxfront_over(l, r, r->status, broken);
    if (!f->dead)
        pxfront_send(f);
    pxfront_settle(l, f);
}

/* The client is gone: what it waited for is cancelled. */
static void pxfront_gone(pxloop *l, pxfront *f)
{
    pxreq *r = f->cur;

    f->cur = NULL;
    if (r) {
        pxfront_account(l, &r->fi, f->remote, 499, 1);
        r->front = NULL;
        r->client_gone = 1;
        px_finish(l, r, CURLE_WRITE_ERROR, NULL);
        px_unref(r); /* the front's */
    }
    pxfront_free(l, f, 1);
}

/* Gives the connection (its bytes unread) back to libmicrohttpd. */
static void pxfront_handback(pxloop *l, pxfront *f)
{
    int fd = f->fd;
    struct sockaddr_storage addr = f->addr;
    unsigned int alen = f->alen;

    pxfront_free(l, f, 0);
    if (httpd_loop_add_connection(l->hl, fd, (const struct sockaddr *)&addr, alen) < 0)
        log_warn("proxy: cannot give a connection back to the HTTP server: %s", strerror(errno));
}

/* The head's fields, NUL-terminated in place (pxfront_take): pxhdr keeps
 * pointers to some values until it has seen them all. */
static void pxfront_each(const void *src, pxhdr_visit visit, void *vud)
{
    const h1_head *h = src;

    for (int i = 0; i < h->nfields; i++)
        visit(vud, h->fields[i].name, h->fields[i].value);
}

static int px_direct_fits_front(const h1_head *h)
{
    for (int i = 0; i < h->nfields; i++)
        if (h->fields[i].nlen >= 256 || h->fields[i].vlen > PXHDR_LINE_MAX)
            return 0;
    return (h->mlen == 3 && !memcmp(h->method, "GET", 3)) || (h->mlen == 6 && !memcmp(h->method, "DELETE", 6));
}

/* A complete request head peeked on an idle front connection: served
 * here (1) or not (0: the caller gives the connection back). */
static int pxfront_take(pxloop *l, pxfront *f, const h1_head *h)
{
    proxy *px = l->px;
    char target[PX_FRONT_HEAD_MAX], path[PX_FRONT_HEAD_MAX];
    const char *svc, *rest, *idv;
    size_t svlen, plen, idlen = 0;
    upstream *u;
    pxreq *r;
    pxfinfo fi;
    long wait;
    int g, rc;

    if (!px_direct_fits_front(h) || h->minor != 1 || (h->has_len && h->content_length) || h->chunked ||
        h->upgrade || h->expect || h->conn_upgrade || h1_request_field(h, "origin", NULL) ||
        h->tlen >= sizeof(target) || h->tlen < sizeof(PX_PREFIX) || memcmp(h->target, PX_PREFIX, sizeof(PX_PREFIX) - 1))
        return 0;
    memcpy(target, h->target, h->tlen);
    target[h->tlen] = '\0';
    svc = target + sizeof(PX_PREFIX) - 1;
    svlen = strcspn(svc, "/?");
    rest = svc + svlen;
    u = px_find(px, svc, svlen);
    plen = strcspn(target, "?");
    if (!u || !u->direct || memchr(target, '%', plen) || pxhdr_has_dot_segment(rest))
        return 0;
    memcpy(path, target, plen);
    path[plen] = '\0';
    g = px->guard ? px->guard(px->guard_ud, h->mlen == 3 ? "GET" : "DELETE", path, f->remote) : 0;
    if (g < 0)
        return 0;
    /* Served here: the head is read for good. */
    if (recv(f->fd, l->peek, h->head_len, 0) != (ssize_t)h->head_len) {
        f->dead = 1;
        pxfront_settle(l, f);
        return 1;
    }
    /* Nothing followed the head when it was peeked: what comes later
     * brings its own edge. */
    if (f->peeked == h->head_len)
        f->readable = 0;
    /* Each name ends at its colon, each value before its CR or white
     * space: C strings in the buffer from here on. */
    for (int i = 0; i < h->nfields; i++) {
        l->peek[h->fields[i].noff + h->fields[i].nlen] = '\0';
        l->peek[h->fields[i].voff + h->fields[i].vlen] = '\0';
    }
    memset(&fi, 0, sizeof(fi));
    memcpy(fi.method, h->method, h->mlen);
    fmt_copy(fi.path, sizeof(fi.path), path);
    clock_gettime(CLOCK_MONOTONIC, &fi.t0);
    fi.keep = h1_request_keep_alive(h);
    idv = h1_request_field(h, "x-request-id", &idlen);
    {
        char given[72] = "";

        if (idv && idlen < sizeof(given)) {
            memcpy(given, idv, idlen);
            given[idlen] = '\0';
        }
        httpd_request_id_make(given[0] ? given : NULL, fi.rid, sizeof(fi.rid));
    }
    if (g > 0) {
        char secs[FMT_I64_MAX], msg[64];

        fmt_i64(secs, g);
        snprintf(msg, sizeof(msg), "too many requests; retry in %d s", g);
        pxfront_error(l, f, NULL, &fi, 429, "rate_limited", msg, "Retry-After", secs);
        return 1;
    }
    if (atomic_load(&px->stopping)) {
        fi.keep = 0;
        pxfront_error(l, f, NULL, &fi, 503, "unavailable", "the gateway is stopping", NULL, NULL);
        return 1;
    }
    wait = breaker_allow(px->brk, u->name, svc_now_ms());
    if (wait > 0) {
        char secs[FMT_I64_MAX], msg[160];

        px_up_breaker_gauge(px, u);
        fmt_i64(secs, (wait + 999) / 1000);
        snprintf(msg, sizeof(msg), "upstream %s is failing; its circuit breaker is open", u->name);
        pxfront_error(l, f, NULL, &fi, 503, "unavailable", msg, "Retry-After", secs);
        metrics_counter_inc(px_up_counter(px, u, 503));
        return 1;
    }
    r = px_req_new(px, u, l); /* its reference is the front's, dropped by pxfront_over */
    if (!r) {
        pxfront_error(l, f, NULL, &fi, 500, "internal", "out of memory", NULL, NULL);
        return 1;
    }
    r->fi = fi;
    {
        pxhdr_req_info info = {f->remote, r->fi.rid, "http"};

        rc = px_direct_build(r, r->fi.method, rest, pxfront_each, h, &info);
    }
    if (rc < 0) {
        breaker_cancel(px->brk, u->name);
        px_unref(r);
        if (rc == -2)
            pxfront_error(l, f, NULL, &fi, 431, "payload_too_large",
                          "a request header line is too long, or more than 16 Connection headers", NULL, NULL);
        else
            pxfront_error(l, f, NULL, &fi, 500, "internal", "out of memory", NULL, NULL);
        return 1;
    }
    r->front = f;
    f->cur = r;
    px_direct_start(l, r);
    return 1;
}

/* An idle front connection has bytes (or an end): the next request. */
static void pxfront_readable(pxloop *l, pxfront *f)
{
    ssize_t n = recv(f->fd, l->peek, PX_FRONT_HEAD_MAX + 1, MSG_PEEK);

    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        f->readable = 0; /* the next edge says when */
        return;
    }
    if (n <= 0) {
        pxfront_free(l, f, 1); /* the client closed it, idle */
        return;
    }
    f->peeked = (size_t)n;
    h1_request_init(&l->head);
    if (h1_request_parse(&l->head, l->peek, (size_t)n, PX_FRONT_HEAD_MAX) != H1_PARSE_DONE ||
        !pxfront_take(l, f, &l->head))
        pxfront_handback(l, f);
}

void pxfront_event(pxloop *l, uint64_t tag, uint32_t events)
{
    int slot = (int)(tag & 0xffffffffu);
    pxfront *f = slot < l->capfronts ? l->fronts[slot] : NULL;

    if (!f || (f->gen & 0x0fffffffu) != ((tag >> 32) & 0x0fffffffu))
        return; /* closed meanwhile */
    if (events & (EPOLLERR | EPOLLHUP)) {
        pxfront_gone(l, f); /* reset, or closed both ways */
        return;
    }
    if (events & EPOLLIN)
        f->readable = 1;
    if (events & EPOLLRDHUP)
        f->hup = 1;
    if (f->out_off < f->out.len) {
        if (!(events & EPOLLOUT))
            return;
        if (pxfront_send(f) < 0) {
            pxfront_gone(l, f);
            return;
        }
        if (f->out_off < f->out.len)
            return;
        if (f->cur && f->cur->write_paused) {
            pxreq *r = f->cur;

            /* The client took what was waiting: the upstream is read again. */
            r->write_paused = 0;
            px_direct_flush(l, r);
            return;
        }
        pxfront_settle(l, f);
        return;
    }
    if (!f->cur && (f->readable || f->hup))
        pxfront_settle(l, f);
}

/* The client took no byte for PROXY_CLIENT_TIMEOUT_MS: its connection is
 * reset (what the kernel still holds for it is dropped with it) and what it
 * waited for is cancelled. */
static void pxfront_timed_out(pxloop *l, pxfront *f)
{
    struct linger lg = {1, 0};

    px_client_timed_out(l->px, f->cur ? f->cur->up : NULL);
    setsockopt(f->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    pxfront_gone(l, f);
}

/* Idle connections past the idle timeout are closed, as libmicrohttpd
 * closes its own; when stopping, every idle one is. Those whose client
 * stopped reading are cut. */
void pxfront_expire(pxloop *l, long long now)
{
    int stopping = atomic_load(&l->px->stopping) || atomic_load(&l->stop);
    long long idle_ms;

    if (l->fkick) {
        l->fkick = 0;
        for (int i = 0; i < l->capfronts; i++)
            if (l->fronts[i] && !l->fronts[i]->cur && l->fronts[i]->readable)
                pxfront_settle(l, l->fronts[i]);
    }
    if (!l->nfronts || (now < l->next_fscan && !stopping))
        return;
    l->next_fscan = now + 250;
    idle_ms = (long long)httpd_idle_timeout_s(httpd_loop_server(l->hl)) * 1000;
    for (int i = 0; i < l->capfronts; i++) {
        pxfront *f = l->fronts[i];

        if (!f)
            continue;
        if (f->stall_ms && now - f->stall_ms >= l->px->cfg.client_timeout_ms)
            pxfront_timed_out(l, f);
        else if (!f->cur && f->out_off >= f->out.len && (stopping || now - f->idle_since >= idle_ms))
            pxfront_free(l, f, 1);
        else if (stopping)
            f->closing = 1;
    }
}

/* From proxy_take: the request's connection becomes a front connection
 * when libmicrohttpd lets it go; then the request is the front's (1). 0:
 * it stays libmicrohttpd's; -1: the socket was taken but cannot be held
 * (out of memory), so it is closed and the request dropped. */
int pxfront_adopt(pxloop *l, pxreq *r, httpd_req *req)
{
    struct sockaddr_storage addr;
    unsigned int alen = 0;
    const char *conn = httpd_req_header(req, "Connection");
    pxfront *f;
    int fd;

    if (!r->px->cfg.front || !l->hl || httpd_req_header(req, "Origin") || httpd_req_http10(req) ||
        (conn && pxhdr_listed_in(conn, "close", 5)) || atomic_load(&r->px->stopping))
        return 0;
    fd = httpd_req_take_socket(req, &addr, &alen);
    if (fd < 0)
        return 0;
    f = pxfront_new(l, fd, &addr, alen);
    if (!f) {
        /* Handed over already: the client sees the connection close. */
        close(fd);
        return -1;
    }
    memset(&r->fi, 0, sizeof(r->fi));
    fmt_copy(r->fi.method, sizeof(r->fi.method), httpd_req_method(req));
    fmt_copy(r->fi.path, sizeof(r->fi.path), httpd_req_path(req));
    fmt_copy(r->fi.rid, sizeof(r->fi.rid), httpd_req_id(req));
    clock_gettime(CLOCK_MONOTONIC, &r->fi.t0);
    r->fi.keep = 1;
    r->req = NULL;
    r->front = f;
    f->cur = r;
    return 1;
}

void pxfront_fini(pxloop *l)
{
    for (int i = 0; i < l->capfronts; i++) {
        pxfront *f = l->fronts[i];

        if (!f)
            continue;
        if (f->out_off < f->out.len)
            pxfront_send(f); /* best effort: the loop ends */
        if (f->cur)
            pxfront_gone(l, f);
        else
            pxfront_free(l, f, 1);
    }
    free(l->fronts);
    free(l->ffree);
    free(l->peek);
    l->fronts = NULL;
    l->ffree = NULL;
    l->peek = NULL;
    l->capfronts = l->nffree = 0;
}

