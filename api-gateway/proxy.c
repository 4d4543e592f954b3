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

extern char **environ;

#include "pxint.h"
#include "pxdirect.h"
#include "pxfront.h"



/* ---- configuration ------------------------------------------------------ */

static const char *const reserved_names[] = {"auth", "triggers", "chain_events", "chain-events", "events",
                                             "health", "internal", NULL};

static int is_reserved(const char *name)
{
    for (int i = 0; reserved_names[i]; i++)
        if (strcmp(reserved_names[i], name) == 0)
            return 1;
    return 0;
}

/* Nonzero when `addr` is one of this machine's addresses (or a wildcard). */
static int addr_is_local(const struct sockaddr *sa, struct ifaddrs *ifs)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)sa;
        uint32_t ip = ntohl(a->sin_addr.s_addr);

        if ((ip >> 24) == 127 || ip == 0)
            return 1;
        for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET &&
                ((struct sockaddr_in *)(void *)i->ifa_addr)->sin_addr.s_addr == a->sin_addr.s_addr)
                return 1;
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)(const void *)sa;

        if (IN6_IS_ADDR_LOOPBACK(&a->sin6_addr) || IN6_IS_ADDR_UNSPECIFIED(&a->sin6_addr))
            return 1;
        if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr) && a->sin6_addr.s6_addr[12] == 127)
            return 1;
        for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET6 &&
                memcmp(&((struct sockaddr_in6 *)(void *)i->ifa_addr)->sin6_addr, &a->sin6_addr, 16) == 0)
                return 1;
    }
    return 0;
}

/* Nonzero when the URL's host:port is where this gateway listens. */
static int url_points_here(const char *url, const char *self_host, int self_port)
{
    CURLU *u = curl_url();
    char *host = NULL, *port = NULL;
    struct addrinfo hints, *res = NULL;
    struct ifaddrs *ifs = NULL;
    int here = 0;

    if (!u)
        return 0;
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK)
        goto out;
    if (strtol(port, NULL, 10) != self_port)
        goto out;
    {
        size_t hl = strlen(host);

        if (hl > 2 && host[0] == '[') {
            memmove(host, host + 1, hl - 2);
            host[hl - 2] = '\0';
        }
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, NULL, &hints, &res) != 0)
        goto out;
    getifaddrs(&ifs);
    for (struct addrinfo *ai = res; ai && !here; ai = ai->ai_next) {
        if (addr_is_local(ai->ai_addr, ifs)) {
            here = 1;
        } else if (self_host && *self_host) {
            /* A gateway bound to a public address is reached through it. */
            char a[INET6_ADDRSTRLEN] = "";

            if (ai->ai_family == AF_INET)
                inet_ntop(AF_INET, &((struct sockaddr_in *)(void *)ai->ai_addr)->sin_addr, a, sizeof(a));
            else
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)(void *)ai->ai_addr)->sin6_addr, a, sizeof(a));
            here = strcmp(a, self_host) == 0;
        }
    }
out:
    if (ifs)
        freeifaddrs(ifs);
    if (res)
        freeaddrinfo(res);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return here;
}

void proxy_config_read(cfg *c, proxy_config *o, const char *self_host, int self_port)
{
    memset(o, 0, sizeof(*o));
    o->timeout_ms = cfg_int(c, "PROXY_TIMEOUT_MS", 30000, 1, 3600L * 1000);
    o->connect_timeout_ms = cfg_int(c, "PROXY_CONNECT_TIMEOUT_MS", 5000, 1, 600L * 1000);
    o->client_timeout_ms = cfg_int(c, "PROXY_CLIENT_TIMEOUT_MS", 30000, 1, 3600L * 1000);
    o->breaker_threshold = (int)cfg_int(c, "PROXY_BREAKER_THRESHOLD", 5, 0, 1000000);
    o->breaker_cooldown_ms = cfg_int(c, "PROXY_BREAKER_COOLDOWN_MS", 10000, 1, 3600L * 1000);
    o->loops = (int)cfg_int(c, "PROXY_LOOPS", 1, 1, 64);
    o->max_conns_per_upstream = (int)cfg_int(c, "PROXY_MAX_CONNECTIONS_PER_UPSTREAM", 512, 1, 100000);
    o->max_body = cfg_int(c, "PROXY_MAX_BODY_BYTES", 1024L * 1024 * 1024, 0, 1L << 62);
    o->direct = (int)cfg_int(c, "PROXY_DIRECT", 1, 0, 1);
    o->front = (int)cfg_int(c, "PROXY_FRONT", 1, 0, 1);
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '='), *val;
        size_t nlen;
        struct proxy_upstream_cfg *u;
        char var[80], tvar[96];

        if (!eq)
            continue;
        nlen = (size_t)(eq - *e);
        val = eq + 1;
        if (nlen <= 4 || nlen >= sizeof(var) || memcmp(eq - 4, "_URL", 4) != 0)
            continue;
        if (strncasecmp(val, "http://", 7) != 0 && strncasecmp(val, "https://", 8) != 0)
            continue; /* DATABASE_URL, REDIS_URL...: not HTTP services */
        memcpy(var, *e, nlen);
        var[nlen] = '\0';
        if (strncmp(var, "AE_", 3) == 0 || strncmp(var, "TEST_", 5) == 0)
            continue; /* the stack's and the tests' own addresses */
        if (o->nupstreams >= PROXY_MAX_UPSTREAMS) {
            cfg_error(c, var, val, "at most 64 proxied services");
            continue;
        }
        u = &o->upstreams[o->nupstreams];
        memset(u, 0, sizeof(*u));
        fmt_copy(u->var, sizeof(u->var), var);
        {
            size_t i, n = nlen - 4;
            int ok = n > 0 && n < sizeof(u->name);

            for (i = 0; ok && i < n; i++) {
                char ch = var[i];

                if (!isalnum((unsigned char)ch) && ch != '_')
                    ok = 0;
                u->name[i] = (char)tolower((unsigned char)ch);
            }
            u->name[ok ? n : 0] = '\0';
            if (!ok) {
                cfg_error(c, var, val, "a service name of letters, digits and _");
                continue;
            }
        }
        if (is_reserved(u->name)) {
            cfg_error(c, var, val, "a service name that is not a native route (auth, triggers, chain_events, events, health)");
            continue;
        }
        if (strlen(val) >= sizeof(u->url) || strpbrk(val, " \t\r\n?#")) {
            cfg_error(c, var, val, "an http(s) URL without query or fragment, under 1024 bytes");
            continue;
        }
        fmt_copy(u->url, sizeof(u->url), val);
        while (strlen(u->url) > 8 && u->url[strlen(u->url) - 1] == '/')
            u->url[strlen(u->url) - 1] = '\0';
        {
            CURLU *cu = curl_url();
            int bad = !cu || curl_url_set(cu, CURLUPART_URL, u->url, 0) != CURLUE_OK;

            curl_url_cleanup(cu);
            if (bad) {
                cfg_error(c, var, val, "a valid http(s) URL");
                continue;
            }
        }
        if (url_points_here(u->url, self_host, self_port)) {
            cfg_error(c, var, val, "a URL that is not this gateway itself (it would forward to itself without end)");
            continue;
        }
        snprintf(tvar, sizeof(tvar), "%.*s_TIMEOUT_MS", (int)(nlen - 4), var);
        u->timeout_ms = cfg_int(c, tvar, o->timeout_ms, 1, 3600L * 1000);
        o->nupstreams++;
    }
}

/* ---- helpers ------------------------------------------------------------ */

/* Gives a finished transfer's handle back to its loop (reset for reuse). */
static void px_spare_easy(pxloop *l, CURL *e)
{
    curl_easy_reset(e);
    pthread_mutex_lock(&l->qmu);
    if (l->nspare < PX_SPARE_EASY) {
        l->spare[l->nspare++] = e;
        e = NULL;
    }
    pthread_mutex_unlock(&l->qmu);
    if (e)
        curl_easy_cleanup(e);
}

static CURL *px_take_easy(pxloop *l)
{
    CURL *e = NULL;

    pthread_mutex_lock(&l->qmu);
    if (l->nspare > 0)
        e = l->spare[--l->nspare];
    pthread_mutex_unlock(&l->qmu);
    return e ? e : curl_easy_init();
}

pxreq *px_req_new(proxy *px, upstream *u, pxloop *l)
{
    pxreq *r = calloc(1, sizeof(*r));

    if (!r)
        return NULL;
    pthread_mutex_init(&r->mu, NULL);
    atomic_init(&r->refs, 1);
    r->px = px;
    r->up = u;
    r->loop = l;
    r->declared_len = -1;
    r->start_ms = svc_now_ms();
    buf_init(&r->rh, PX_HDR_MAX);
    buf_init(&r->body, PX_SMALL_MAX);
    return r;
}

void px_unref(pxreq *r)
{
    if (atomic_fetch_sub(&r->refs, 1) != 1)
        return;
    if (r->easy)
        px_spare_easy(r->loop, r->easy);
    curl_slist_free_all(r->hdrs);
    free(r->url);
    free(r->in);
    buf_free(&r->rh);
    buf_free(&r->body);
    buf_free(&r->out_req);
    buf_free(&r->stage);
    httpstream_release(r->out);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

static void loop_post(pxreq *r, int cmd)
{
    pxloop *l = r->loop;
    uint64_t one = 1;
    int wake = 0;

    pthread_mutex_lock(&l->qmu);
    if (!r->cmds) {
        atomic_fetch_add(&r->refs, 1);
        r->cmd_next = l->cmdq;
        l->cmdq = r;
        wake = 1;
    }
    r->cmds |= cmd;
    pthread_mutex_unlock(&l->qmu);
    /* On the loop's own thread the tick after this turn runs the command:
     * no wake-up needed. */
    if (wake && l->external && pthread_equal(pthread_self(), l->owner))
        wake = 0;
    if (wake && write(l->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
        log_warn("proxy: cannot wake the loop: %s", strerror(errno));
}

metrics_counter *px_up_counter(proxy *px, upstream *u, int status)
{
    metrics_counter *c;
    char labels[160], esc[96];

    if (status < 100 || status >= 600)
        status = 599;
    c = atomic_load_explicit(&u->by_status[status], memory_order_relaxed);
    if (c)
        return c;
    snprintf(labels, sizeof(labels), "service=\"%s\",status=\"%d\"", metrics_escape_label(esc, sizeof(esc), u->name),
             status);
    c = metrics_counter_get(px->reg, "proxy_requests_total", "Proxied requests, by service and status answered.",
                            labels);
    atomic_store_explicit(&u->by_status[status], c, memory_order_relaxed);
    return c;
}

void px_up_breaker_gauge(proxy *px, upstream *u)
{
    metrics_gauge_set(u->breaker_gauge, (double)breaker_state(px->brk, u->name, svc_now_ms()));
}

/* ---- answers (loop thread) ----------------------------------------------- */

/* Hands the answer set on r->req to its connection. Loop thread, r->mu
 * held. */
static void px_resume_answer_locked(pxreq *r)
{
    httpd_req *req = r->req;

    r->req = NULL;
    if (req) {
        httpd_req_resume(req);
        atomic_store_explicit(&r->loop->wrote, 1, memory_order_relaxed);
    }
}

static void px_fail(pxreq *r, int status, const char *code, const char *fmt, const char *arg)
{
    if (r->front) {
        char msg[512];

        snprintf(msg, sizeof(msg), fmt, arg);
        metrics_counter_inc(px_up_counter(r->px, r->up, status));
        pxfront_error(r->loop, r->front, r, &r->fi, status, code, msg, NULL, NULL);
        return;
    }
    pthread_mutex_lock(&r->mu);
    if (r->req) {
        httpd_respond_errorf(r->req, status, code, fmt, arg);
        px_resume_answer_locked(r);
    }
    pthread_mutex_unlock(&r->mu);
    metrics_counter_inc(px_up_counter(r->px, r->up, status));
}

static void px_breaker(pxreq *r, int ok)
{
    if (r->breaker_reported)
        return;
    r->breaker_reported = 1;
    breaker_report(r->px->brk, r->up->name, ok, svc_now_ms());
    px_up_breaker_gauge(r->px, r->up);
}

/* ---- header handling (the rules are pxhdr's) ----------------------------- */

void px_each_header(const void *src, pxhdr_visit visit, void *vud)
{
    httpd_req_each_header(src, visit, vud);
}

static int px_add_line(void *ud, const char *line)
{
    pxreq *r = ud;
    struct curl_slist *l = curl_slist_append(r->hdrs, line);

    if (!l)
        return -1;
    r->hdrs = l;
    return 0;
}

static void px_add_resp_header(void *ud, const char *name, const char *value)
{
    MHD_add_response_header(ud, name, value);
}

static void px_add_stream_header(void *ud, const char *name, const char *value)
{
    httpstream_add_header(ud, name, value);
}

/* ---- libcurl callbacks (loop thread) -------------------------------------- */

static size_t px_read_cb(char *dst, size_t size, size_t nitems, void *ud)
{
    pxreq *r = ud;
    size_t want = size * nitems, n;
    httpd_req *wake = NULL;

    pthread_mutex_lock(&r->mu);
    n = r->in_len - r->in_off;
    if (n == 0) {
        if (r->in_eof || r->client_gone) {
            pthread_mutex_unlock(&r->mu);
            return r->in_eof ? 0 : CURL_READFUNC_ABORT;
        }
        r->read_paused = 1;
        pthread_mutex_unlock(&r->mu);
        return CURL_READFUNC_PAUSE;
    }
    if (n > want)
        n = want;
    memcpy(dst, r->in + r->in_off, n);
    r->in_off += n;
    if (r->in_off == r->in_len)
        r->in_off = r->in_len = 0;
    if (r->body_blocked && r->req) {
        r->body_blocked = 0;
        wake = r->req;
    }
    if (wake) {
        httpd_req_resume(wake);
        atomic_store_explicit(&r->loop->wrote, 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}

static void px_stream_drain(void *ud);
static void px_stream_close(void *ud);

/* Starts the answer once the response headers are in. */
void px_headers_done(pxreq *r)
{
    const char *p = r->rh.p ? r->rh.p : "", *end = p + r->rh.len;
    const char *ctype = NULL;
    char ctype_buf[512] = "";
    int sse;

    r->headers_done = 1;
    metrics_histogram_observe(r->up->latency, (double)(svc_now_ms() - r->start_ms) / 1000.0);
    px_breaker(r, !(r->status >= 502 && r->status <= 504));
    /* The header that decides how the rest is handled. */
    for (const char *l = p; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l)), *colon = memchr(l, ':', (size_t)(nl - l));

        if (colon && (size_t)(colon - l) == 12 && strncasecmp(l, "content-type", 12) == 0) {
            const char *v = colon + 1;

            while (*v == ' ')
                v++;
            snprintf(ctype_buf, sizeof(ctype_buf), "%.*s", (int)(nl - v), v);
            ctype = ctype_buf;
        }
        l = nl + 1;
    }
    sse = ctype && strncasecmp(ctype, "text/event-stream", 17) == 0;
    /* 204 and 304 have no body, whatever their headers say. */
    r->streaming = r->status != 204 && r->status != 304 &&
                   (sse || r->declared_len < 0 || r->declared_len > PX_SMALL_MAX);
    if (!r->streaming)
        return; /* answered whole at the end */
    if (r->front) {
        metrics_counter_inc(px_up_counter(r->px, r->up, r->status));
        pxfront_stream_start(r->loop, r, sse, p, (size_t)(end - p));
        return;
    }
    pthread_mutex_lock(&r->mu);
    if (r->req) {
        r->out = httpstream_new(r->req, r->status, NULL, sse ? -1 : r->declared_len, PX_OUT_MAX, 16384);
        if (!r->out) {
            httpd_respond_error(r->req, 500, "internal", "out of memory", NULL);
            px_resume_answer_locked(r);
            pthread_mutex_unlock(&r->mu);
            return;
        }
        pxhdr_response(p, (size_t)(end - p), px_add_stream_header, r->out);
        if (sse)
            httpstream_add_header(r->out, "X-Accel-Buffering", "no");
        atomic_fetch_add(&r->refs, 1); /* the stream's callbacks */
        httpstream_set_callbacks(r->out, px_stream_drain, px_stream_close, r);
        metrics_counter_inc(px_up_counter(r->px, r->up, r->status));
        px_resume_answer_locked(r);
    }
    pthread_mutex_unlock(&r->mu);
}

static size_t px_header_cb(char *data, size_t size, size_t nitems, void *ud)
{
    pxreq *r = ud;
    size_t n = size * nitems, keep = 0;
    long long num = 0;

    switch (pxhdr_response_line(data, n, &num, &keep)) {
    case PXHDR_STATUS: /* a 1xx interim answer's headers are dropped */
        buf_reset(&r->rh);
        r->declared_len = -1;
        r->status = (int)num;
        break;
    case PXHDR_END:
        if (r->status >= 200 && !r->headers_done)
            px_headers_done(r);
        break;
    case PXHDR_LENGTH:
        r->declared_len = num;
        break;
    case PXHDR_DROP:
        break;
    case PXHDR_KEEP:
        if (r->rh.len + keep + 1 > PX_HDR_MAX)
            return 0; /* fails the transfer: 502 */
        buf_append(&r->rh, data, keep);
        buf_append(&r->rh, "\n", 1);
        break;
    }
    return n;
}

static size_t px_write_cb(char *data, size_t size, size_t nitems, void *ud)
{
    pxreq *r = ud;
    size_t n = size * nitems;
    int rc;

    if (!r->streaming) {
        if (buf_append(&r->body, data, n) < 0 || r->body.truncated)
            return 0;
        return n;
    }
    if (!r->out)
        return 0;
    rc = httpstream_write(r->out, data, n);
    atomic_store_explicit(&r->loop->wrote, 1, memory_order_relaxed);
    if (rc == 1) {
        r->write_paused = 1;
        return CURL_WRITEFUNC_PAUSE;
    }
    return rc == 0 ? n : 0;
}

/* ---- stream callbacks (MHD thread) ---------------------------------------- */

static void px_stream_drain(void *ud)
{
    loop_post(ud, CMD_UNPAUSE_WRITE);
}

static void px_stream_close(void *ud)
{
    pxreq *r = ud;

    pthread_mutex_lock(&r->mu);
    r->client_gone = 1;
    pthread_mutex_unlock(&r->mu);
    loop_post(r, CMD_CANCEL);
    px_unref(r);
}

/* ---- the loop ------------------------------------------------------------ */

void px_client_timed_out(proxy *px, const upstream *u)
{
    metrics_counter_inc(px->client_timeouts);
    if (log_enabled(LOG_WARN))
        log_warn("proxy: %s%sa client took no byte of its answer for %ld ms: its connection is closed and the "
                 "upstream released (PROXY_CLIENT_TIMEOUT_MS)", u ? u->name : "", u ? ": " : "",
                 px->cfg.client_timeout_ms);
}

/* Cuts the libmicrohttpd answers whose client took no byte for
 * PROXY_CLIENT_TIMEOUT_MS while bytes wait for it, whether the transfer is
 * paused for it (libcurl does not time a paused transfer out, nor does the
 * direct path) or the upstream trickles (libmicrohttpd's idle timeout would
 * close it later, without a word). The front watches its own connections
 * in pxfront_expire. */
static void px_client_expire(pxloop *l, long long now)
{
    pxreq *r, *next;

    if (now < l->next_cscan)
        return;
    l->next_cscan = now + 250;
    for (r = l->running; r; r = next) {
        long long since;

        next = r->next;
        if (r->front || !r->out)
            continue;
        since = httpstream_waiting_since(r->out);
        if (!since || now - since < l->px->cfg.client_timeout_ms)
            continue;
        px_client_timed_out(l->px, r->up);
        httpstream_cut(r->out);
        pthread_mutex_lock(&r->mu);
        r->client_gone = 1;
        pthread_mutex_unlock(&r->mu);
        px_finish(l, r, CURLE_WRITE_ERROR, NULL);
    }
}

/* Adds a starting transfer to the loop's running list, with the loop's
 * reference (dropped by px_finish, which unlinks it). */
void px_link(pxloop *l, pxreq *r)
{
    r->next = l->running;
    if (l->running)
        l->running->prev = r;
    l->running = r;
    l->nrunning++;
    atomic_fetch_add(&r->refs, 1);
}

static void px_unlink(pxloop *l, pxreq *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->running = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->next = r->prev = NULL;
    l->nrunning--;
}


/* A streamed answer whose headers the client has: a silent upstream cuts
 * it, and the client sees only its end. */
static void px_stream_cut_log(const pxreq *r, CURLcode rc)
{
    if (rc == CURLE_OPERATION_TIMEDOUT && log_enabled(LOG_WARN))
        log_warn("proxy: %s: no byte from the upstream for %ld ms after its headers: the stream to the client is "
                 "cut (PROXY_TIMEOUT_MS)", r->up->name, r->up->timeout_ms);
}

/* The transfer is over: answer what is still unanswered, release it. */
void px_finish(pxloop *l, pxreq *r, CURLcode rc, const char *why)
{
    int gone;

    /* An answer to a libmicrohttpd connection needs another run of it; the
     * front writes its own. */
    if (!r->front)
        l->finished++;
    px_unlink(l, r);
    if (r->direct)
        px_direct_release(l, r, 0);
    else
        curl_multi_remove_handle(l->multi, r->easy);
    pthread_mutex_lock(&r->mu);
    r->finished = 1;
    gone = r->client_gone;
    /* A body still arriving is thrown away from now on. */
    if (r->body_blocked && r->req) {
        r->body_blocked = 0;
        httpd_req_resume(r->req);
    }
    pthread_mutex_unlock(&r->mu);
    if (gone && rc != CURLE_OK) {
        /* The client left first: nobody to answer, and no verdict on the
         * upstream (a probe it let through may be tried again). */
        if (!r->headers_done)
            breaker_cancel(r->px->brk, r->up->name);
        if (r->out)
            httpstream_end(r->out, 1);
    } else if (r->front && r->f_streaming) {
        px_stream_cut_log(r, rc);
        pxfront_stream_end(l, r, rc != CURLE_OK);
    } else if (r->streaming && r->out) {
        px_stream_cut_log(r, rc);
        httpstream_end(r->out, rc != CURLE_OK);
    } else if (rc == CURLE_OK && r->headers_done && r->front) {
        metrics_counter_inc(px_up_counter(r->px, r->up, r->status));
        pxfront_reply(l, r->front, r, &r->fi, r->status, r->rh.p ? r->rh.p : "", r->rh.len, NULL,
                      r->body.p ? r->body.p : "", r->body.len, NULL, NULL);
    } else if (rc == CURLE_OK && r->headers_done) {
        struct MHD_Response *resp;
        size_t len = r->body.len;
        char *body = len ? buf_take(&r->body) : NULL;

        resp = MHD_create_response_from_buffer(len, body ? body : (void *)"", body ? MHD_RESPMEM_MUST_FREE
                                                                             : MHD_RESPMEM_PERSISTENT);
        if (resp)
            pxhdr_response(r->rh.p ? r->rh.p : "", r->rh.len, px_add_resp_header, resp);
        else
            free(body);

        pthread_mutex_lock(&r->mu);
        if (r->req) {
            if (resp)
                httpd_req_set_response(r->req, r->status, resp);
            else
                httpd_respond_error(r->req, 500, "internal", "out of memory", NULL);
            px_resume_answer_locked(r);
        } else if (resp) {
            MHD_destroy_response(resp);
        }
        pthread_mutex_unlock(&r->mu);
        metrics_counter_inc(px_up_counter(r->px, r->up, r->status));
    } else if (r->headers_done) {
        /* Broke after the headers: the client gets a 502 all the same. */
        px_fail(r, 502, "bad_gateway", "upstream %s broke off its answer", r->up->name);
    } else {
        int timeout = rc == CURLE_OPERATION_TIMEDOUT;

        px_breaker(r, 0);
        if (why)
            px_fail(r, 503, "unavailable", "%s", why);
        else if (timeout)
            px_fail(r, 504, "gateway_timeout", "upstream %s did not answer in time", r->up->name);
        else
            px_fail(r, 502, "bad_gateway", "upstream %s cannot be reached", r->up->name);
        if (log_enabled(LOG_WARN))
            log_warn("proxy: %s: %s", r->up->name,
                     why ? why : r->direct ? px_direct_strerror(rc) : curl_easy_strerror(rc));
    }
    px_unref(r);
}

static void px_check_done(pxloop *l)
{
    CURLMsg *m;
    int left;

    while ((m = curl_multi_info_read(l->multi, &left))) {
        pxreq *r = NULL;

        if (m->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        if (r)
            px_finish(l, r, m->data.result, NULL);
    }
}


void proxy_set_front_guard(proxy *px, proxy_front_guard fn, void *ud)
{
    px->guard = fn;
    px->guard_ud = ud;
}

static void px_run_cmds(pxloop *l)
{
    pxreq *q;

    pthread_mutex_lock(&l->qmu);
    q = l->cmdq;
    l->cmdq = NULL;
    pthread_mutex_unlock(&l->qmu);
    while (q) {
        pxreq *r = q;
        int cmds;

        q = r->cmd_next;
        pthread_mutex_lock(&l->qmu);
        cmds = r->cmds;
        r->cmds = 0;
        pthread_mutex_unlock(&l->qmu);
        if (cmds & CMD_ADD) {
            if (atomic_load(&l->stop) || curl_multi_add_handle(l->multi, r->easy) != CURLM_OK) {
                px_link(l, r);
                px_finish(l, r, CURLE_FAILED_INIT, "the gateway is stopping");
            } else {
                px_link(l, r);
            }
        }
        if (r->next || r->prev || l->running == r) {
            if (cmds & CMD_CANCEL) {
                px_finish(l, r, CURLE_WRITE_ERROR, NULL);
            } else {
                int pause = 0;

                if (cmds & CMD_UNPAUSE_READ) {
                    pthread_mutex_lock(&r->mu);
                    r->read_paused = 0;
                    pthread_mutex_unlock(&r->mu);
                    pause = 1;
                }
                if ((cmds & CMD_UNPAUSE_WRITE) && r->write_paused && r->direct) {
                    r->write_paused = 0;
                    px_direct_flush(l, r);
                } else if ((cmds & CMD_UNPAUSE_WRITE) && r->write_paused) {
                    r->write_paused = 0;
                    pause = 1;
                }
                if (pause && !r->direct)
                    curl_easy_pause(r->easy, (r->write_paused ? CURLPAUSE_RECV : 0) | CURLPAUSE_CONT);
            }
        }
        px_unref(r); /* the queue's */
    }
}

/* One turn's work after the loop's events: libcurl's timers, finished
 * transfers, commands from other threads. */
static void px_loop_tick(pxloop *l)
{
    long long now;

    /* Commands first: a transfer added now is started by the expiry that
     * follows (libcurl asks for a timeout of 0), not one turn later. */
    px_run_cmds(l);
    now = svc_now_ms();
    curlep_expire(&l->cep, now);
    px_check_done(l);
    if (l->nrunning > 0)
        px_client_expire(l, now);
}

static void px_loop_event(pxloop *l, const struct epoll_event *ev)
{
    if (l->external && (ev->data.u64 & PX_FTAG) && !(ev->data.u64 & PX_TAG)) {
        pxfront_event(l, ev->data.u64, ev->events);
        return;
    }
    if (ev->data.u64 & PX_TAG) {
        px_direct_event(l, ev->data.u64, ev->events);
        return;
    }
    if (ev->data.fd == l->evfd) {
        uint64_t v;

        if (read(l->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
            log_warn("proxy: eventfd read: %s", strerror(errno));
        return;
    }
    curlep_event(&l->cep, ev->data.fd, ev->events);
}

/* ---- loop mode: the loops are httpd's (see proxy.h) ---------------------- */

static void *px_hook_init(httpd_loop *hl, void *ud)
{
    proxy *px = ud;
    pxloop *l = &px->loops[httpd_loop_index(hl) % px->nloops];
    struct epoll_event ev;

    l->epfd = httpd_loop_epoll(hl);
    l->hl = hl;
    l->owner = pthread_self();
    l->external = 1;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.fd = l->evfd;
    epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->evfd, &ev);
    curlep_init(&l->cep, l->multi, l->epfd, svc_now_ms);
    return l;
}

static void px_hook_event(void *app, const struct epoll_event *ev)
{
    px_loop_event(app, ev);
}

static int px_hook_timeout(void *app, int ms)
{
    pxloop *l = app;

    /* Direct transfers' deadlines are checked every 50 ms or so. */
    if (l->nrunning > 0 && ms > 100)
        ms = 100;
    return curlep_wait_ms(&l->cep, svc_now_ms(), ms);
}

static int px_hook_tick(void *app)
{
    pxloop *l = app;

    px_loop_tick(l);
    if (l->nrunning > 0)
        px_direct_expire(l, svc_now_ms());
    pxfront_expire(l, svc_now_ms());
    /* A transfer that answered or wrote to a stream resumed a connection,
     * which libmicrohttpd serves only on another run. */
    int work = l->finished > 0 || atomic_exchange_explicit(&l->wrote, 0, memory_order_relaxed);

    l->finished = 0;
    return work;
}

static void px_hook_fini(void *app)
{
    pxloop *l = app;

    /* The server stops: what still runs is answered now. */
    atomic_store(&l->stop, 1);
    px_loop_tick(l);
    while (l->running)
        px_finish(l, l->running, CURLE_FAILED_INIT, "the gateway is stopping");
    pxfront_fini(l);
    px_direct_fini(l);
}

void proxy_loop_hooks(proxy *px, httpd_loop_hooks *h)
{
    memset(h, 0, sizeof(*h));
    h->init = px_hook_init;
    h->event = px_hook_event;
    h->timeout = px_hook_timeout;
    h->tick = px_hook_tick;
    h->fini = px_hook_fini;
    h->ud = px;
}

static void *px_loop_main(void *ud)
{
    pxloop *l = ud;
    struct epoll_event evs[64];

    for (;;) {
        int n = epoll_wait(l->epfd, evs, 64, curlep_wait_ms(&l->cep, svc_now_ms(), 1000));

        for (int i = 0; i < n; i++)
            px_loop_event(l, &evs[i]);
        px_loop_tick(l);
        if (atomic_load(&l->stop)) {
            /* Stopping: whatever still runs is answered now. */
            while (l->running)
                px_finish(l, l->running, CURLE_FAILED_INIT, "the gateway is stopping");
            break;
        }
    }
    return NULL;
}

/* ---- the MHD side ---------------------------------------------------------- */

static size_t px_body_sink(httpd_req *req, const char *data, size_t len, void *ud)
{
    pxreq *r = ud;
    size_t took;
    int unpause = 0, answered = 0;

    (void)req;
    pthread_mutex_lock(&r->mu);
    if (r->too_large) {
        r->discarded += (long long)len;
        pthread_mutex_unlock(&r->mu);
        return r->discarded > PX_DISCARD_MAX ? HTTPD_BODY_ABORT : len;
    }
    if (r->finished || r->client_gone) {
        pthread_mutex_unlock(&r->mu);
        return len;
    }
    /* in_total counts what was taken (a piece taken in part is offered
     * again); the piece offered is body all the same. */
    if (len && r->px->cfg.max_body > 0 && r->in_total + (long long)len > r->px->cfg.max_body) {
        /* A chunked upload has no declared length to refuse on its headers:
         * it is refused once it passes the limit. The transfer stops, the
         * rest is thrown away, and the 413 goes out once the body ends. */
        r->too_large = 1;
        r->client_gone = 1;
        if (r->req) {
            httpd_respond_errorf(r->req, 413, "payload_too_large", "request body exceeds %lld bytes",
                                 r->px->cfg.max_body);
            px_resume_answer_locked(r);
            answered = 1;
        }
        pthread_mutex_unlock(&r->mu);
        if (answered)
            metrics_counter_inc(px_up_counter(r->px, r->up, 413));
        loop_post(r, CMD_CANCEL);
        return len;
    }
    if (len == 0) {
        r->in_eof = 1;
        unpause = r->read_paused;
        r->read_paused = 0;
        pthread_mutex_unlock(&r->mu);
        if (unpause)
            loop_post(r, CMD_UNPAUSE_READ);
        return 0;
    }
    if (!r->in) {
        r->in = malloc(PX_IN_MAX);
        if (!r->in) {
            pthread_mutex_unlock(&r->mu);
            return len;
        }
    }
    if (r->in_off && r->in_len + len > PX_IN_MAX) {
        memmove(r->in, r->in + r->in_off, r->in_len - r->in_off);
        r->in_len -= r->in_off;
        r->in_off = 0;
    }
    took = PX_IN_MAX - r->in_len < len ? PX_IN_MAX - r->in_len : len;
    memcpy(r->in + r->in_len, data, took);
    r->in_len += took;
    r->in_total += (long long)took;
    if (took < len)
        r->body_blocked = 1;
    if (took && r->read_paused) {
        r->read_paused = 0;
        unpause = 1;
    }
    pthread_mutex_unlock(&r->mu);
    if (unpause)
        loop_post(r, CMD_UNPAUSE_READ);
    return took;
}

static void px_req_done(httpd_req *req, void *ud)
{
    pxreq *r = ud;
    int cancel;

    (void)req;
    pthread_mutex_lock(&r->mu);
    r->req = NULL;
    cancel = !r->finished;
    if (cancel)
        r->client_gone = 1;
    pthread_mutex_unlock(&r->mu);
    if (cancel)
        loop_post(r, CMD_CANCEL);
    px_unref(r);
}

upstream *px_find(proxy *px, const char *name, size_t n)
{
    for (int i = 0; i < px->nups; i++)
        if (strlen(px->ups[i].name) == n && memcmp(px->ups[i].name, name, n) == 0)
            return &px->ups[i];
    return NULL;
}

static int method_proxied(const char *m)
{
    return !strcmp(m, "GET") || !strcmp(m, "POST") || !strcmp(m, "PUT") || !strcmp(m, "PATCH") ||
           !strcmp(m, "DELETE");
}

/* 0; -1 out of memory; -2 a header line too long (pxhdr_request). */
static int px_setup(pxreq *r, httpd_req *req, const char *rest)
{
    const char *method = httpd_req_method(req), *clen = httpd_req_header(req, "Content-Length");
    const char *te = httpd_req_header(req, "Transfer-Encoding");
    pxhdr_req_info info = {httpd_req_remote(req), httpd_req_id(req), "http"};
    size_t ulen = strlen(r->up->url) + strlen(rest) + 2;
    long long cl = clen ? strtoll(clen, NULL, 10) : 0;
    CURL *e;
    int rc;

    r->url = malloc(ulen);
    if (!r->url)
        return -1;
    snprintf(r->url, ulen, "%s%s%s", r->up->url, rest[0] == '/' ? "" : "/", rest);
    r->has_body = cl > 0 || te || !strcmp(method, "POST") || !strcmp(method, "PUT") || !strcmp(method, "PATCH");
    rc = pxhdr_request(px_each_header, req, &info, px_add_line, r);
    if (rc < 0)
        return rc;
    e = r->easy = px_take_easy(r->loop);
    if (!e)
        return -1;
    curl_easy_setopt(e, CURLOPT_URL, r->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, px_header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, px_write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS,
                     r->px->cfg.connect_timeout_ms < r->up->timeout_ms ? r->px->cfg.connect_timeout_ms
                                                                       : r->up->timeout_ms);
    /* The timeout is one of silence, not of the whole exchange: a stream
     * (SSE) may last for hours as long as bytes keep coming. */
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, (r->up->timeout_ms + 999) / 1000);
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_CONTENT_DECODING, 0L);
    curl_easy_setopt(e, CURLOPT_HTTP_TRANSFER_DECODING, 1L);
    curl_easy_setopt(e, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
    if (r->has_body) {
        curl_easy_setopt(e, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(e, CURLOPT_READFUNCTION, px_read_cb);
        curl_easy_setopt(e, CURLOPT_READDATA, r);
        curl_easy_setopt(e, CURLOPT_INFILESIZE_LARGE, (curl_off_t)(te && !clen ? -1 : cl));
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    } else if (strcmp(method, "GET") != 0) {
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }
    return 0;
}

/* The upstream of a request target, and where its rest starts. */
static upstream *px_route(proxy *px, httpd_req *req, const char **rest)
{
    const char *target = httpd_req_target(req), *svc;

    if (strncmp(target, PX_PREFIX, sizeof(PX_PREFIX) - 1) != 0 || !method_proxied(httpd_req_method(req)))
        return NULL;
    svc = target + sizeof(PX_PREFIX) - 1;
    *rest = svc + strcspn(svc, "/?");
    return px_find(px, svc, (size_t)(*rest - svc));
}

int proxy_claims(httpd_req *req, void *ud)
{
    const char *rest;

    return px_route(ud, req, &rest) != NULL;
}

int proxy_take(httpd_req *req, void *ud)
{
    proxy *px = ud;
    const char *rest = NULL;
    upstream *u = px_route(px, req, &rest);
    pxreq *r;
    long wait;
    int rc;
    const char *clen;

    if (!u) {
        httpd_respond_error(req, 500, "internal", "no upstream", NULL);
        return 1;
    }
    if (atomic_load(&px->stopping)) {
        httpd_respond_error(req, 503, "unavailable", "the gateway is stopping", NULL);
        return 1;
    }
    if (pxhdr_has_dot_segment(rest)) {
        httpd_respond_error(req, 400, "invalid_request", "the path may not contain . or .. segments", NULL);
        metrics_counter_inc(px_up_counter(px, u, 400));
        return 1;
    }
    clen = httpd_req_header(req, "Content-Length");
    if (clen && px->cfg.max_body > 0 && strtoll(clen, NULL, 10) > px->cfg.max_body) {
        httpd_respond_errorf(req, 413, "payload_too_large", "request body exceeds %lld bytes", px->cfg.max_body);
        metrics_counter_inc(px_up_counter(px, u, 413));
        return 1;
    }
    wait = breaker_allow(px->brk, u->name, svc_now_ms());
    if (wait > 0) {
        char secs[FMT_I64_MAX];

        px_up_breaker_gauge(px, u);
        httpd_respond_errorf(req, 503, "unavailable", "upstream %s is failing; its circuit breaker is open",
                             u->name);
        fmt_i64(secs, (wait + 999) / 1000);
        httpd_req_add_header(req, "Retry-After", secs);
        metrics_counter_inc(px_up_counter(px, u, 503));
        return 1;
    }
    /* In loop mode the transfer stays on the request's own thread. */
    r = px_req_new(px, u,
                   px->external && httpd_req_loop(req)
                       ? &px->loops[httpd_loop_index(httpd_req_loop(req)) % px->nloops]
                       : &px->loops[atomic_fetch_add(&px->rr, 1) % (unsigned)px->nloops]);
    if (!r) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return 1;
    }
    r->req = req; /* its reference is dropped by px_req_done */
    rc = px_direct_fits(px, u, req) ? px_direct_setup(r, req, rest) : px_setup(r, req, rest);
    if (rc < 0) {
        breaker_cancel(px->brk, u->name);
        px_unref(r);
        if (rc == -2)
            httpd_respond_errorf(req, 431, "payload_too_large",
                                 "a request header line exceeds %d bytes, or more than 16 Connection headers",
                                 PXHDR_LINE_MAX - 1);
        else
            httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return 1;
    }
    if (r->direct && px->external) {
        int a = pxfront_adopt(r->loop, r, req);

        if (a > 0) {
            px_direct_start(r->loop, r);
            return 1;
        }
        if (a < 0) {
            breaker_cancel(px->brk, u->name);
            px_unref(r);
            return 1;
        }
    }
    httpd_req_defer(req, r->has_body ? px_body_sink : NULL, px_req_done, r);
    if (r->direct)
        px_direct_start(r->loop, r);
    else
        loop_post(r, CMD_ADD);
    return 1;
}

void proxy_fallback(httpd_req *req, void *ud)
{
    const char *path = httpd_req_path(req);

    (void)ud;
    if (strncmp(path, PX_PREFIX, sizeof(PX_PREFIX) - 1) == 0 && path[sizeof(PX_PREFIX) - 1]) {
        const char *svc = path + sizeof(PX_PREFIX) - 1;
        size_t n = strcspn(svc, "/");
        char var[96];
        size_t i;

        for (i = 0; i < n && i < 64; i++) {
            char ch = svc[i];

            var[i] = isalnum((unsigned char)ch) ? (char)toupper((unsigned char)ch) : '_';
        }
        var[i] = '\0';
        httpd_respond_errorf(req, 404, "not_found", "no service %s is configured: set %s_URL to proxy it", var,
                             var);
        return;
    }
    httpd_respond_errorf(req, 404, "not_found", "no route for %s", path);
}

cJSON *proxy_health(proxy *px)
{
    cJSON *arr = cJSON_CreateArray();
    long long now = svc_now_ms();

    for (int i = 0; px && i < px->nups; i++) {
        cJSON *o = cJSON_CreateObject();
        int st = breaker_state(px->brk, px->ups[i].name, now);

        cJSON_AddStringToObject(o, "name", px->ups[i].name);
        cJSON_AddStringToObject(o, "url", px->ups[i].url);
        cJSON_AddStringToObject(o, "breaker", breaker_state_name(st));
        cJSON_AddItemToArray(arr, o);
        metrics_gauge_set(px->ups[i].breaker_gauge, (double)st);
    }
    return arr;
}

/* ---- lifecycle ------------------------------------------------------------ */

static int loop_init(proxy *px, pxloop *l, int external, char *err, size_t errlen)
{
    struct epoll_event ev;

    l->px = px;
    pthread_mutex_init(&l->qmu, NULL);
    l->epfd = external ? -1 : epoll_create1(EPOLL_CLOEXEC);
    l->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    l->multi = curl_multi_init();
    if ((!external && l->epfd < 0) || l->evfd < 0 || !l->multi) {
        snprintf(err, errlen, "cannot create the proxy's event loop: %s", strerror(errno));
        return -1;
    }
    curl_multi_setopt(l->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)px->cfg.max_conns_per_upstream);
    /* Idle connections kept for reuse: enough for every upstream's share. */
    curl_multi_setopt(l->multi, CURLMOPT_MAXCONNECTS, (long)(px->nups > 0 ? px->nups : 1) * 256);
    if (external)
        return 0; /* the epoll set and the thread are httpd's (px_hook_init) */
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.fd = l->evfd;
    epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->evfd, &ev);
    curlep_init(&l->cep, l->multi, l->epfd, svc_now_ms);
    if (pthread_create(&l->thread, NULL, px_loop_main, l) != 0) {
        snprintf(err, errlen, "cannot start the proxy's event loop");
        return -1;
    }
    l->started = 1;
    return 0;
}

proxy *proxy_new(const proxy_config *pc, metrics *reg, char *err, size_t errlen)
{
    proxy *px = calloc(1, sizeof(*px));

    if (!px) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    px->cfg = *pc;
    px->reg = reg ? reg : metrics_default();
    px->brk = breaker_new(pc->breaker_threshold, pc->breaker_cooldown_ms);
    if (!px->brk)
        goto oom;
    for (int i = 0; i < pc->nupstreams; i++) {
        upstream *u = &px->ups[px->nups++];
        char labels[128], esc[96];

        fmt_copy(u->name, sizeof(u->name), pc->upstreams[i].name);
        fmt_copy(u->var, sizeof(u->var), pc->upstreams[i].var);
        fmt_copy(u->url, sizeof(u->url), pc->upstreams[i].url);
        u->timeout_ms = pc->upstreams[i].timeout_ms;
        u->index = i;
        if (pc->direct && pc->httpd_loops > 0)
            px_direct_prepare(u);
        snprintf(labels, sizeof(labels), "service=\"%s\"", metrics_escape_label(esc, sizeof(esc), u->name));
        u->latency = metrics_histogram_get(px->reg, "proxy_upstream_duration_seconds",
                                           "Time from a proxied request to its upstream's response headers.",
                                           labels, metrics_latency_buckets, metrics_latency_nbuckets);
        u->breaker_gauge = metrics_gauge_get(px->reg, "proxy_breaker_state",
                                             "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open.", labels);
        metrics_gauge_set(u->breaker_gauge, 0);
        log_event(LOG_INFO, "proxy_service", "\"service\":\"%s\",\"variable\":\"%s\"", u->name, u->var);
    }
    px->client_timeouts = metrics_counter_get(px->reg, "proxy_client_timeouts_total",
                                              "Proxied answers cut because the client took no byte of them for "
                                              "PROXY_CLIENT_TIMEOUT_MS.",
                                              NULL);
    px->external = pc->httpd_loops > 0;
    px->nloops = px->external ? pc->httpd_loops : pc->loops > 0 ? pc->loops : 1;
    px->loops = calloc((size_t)px->nloops, sizeof(*px->loops));
    if (!px->loops)
        goto oom;
    for (int i = 0; i < px->nloops; i++)
        if (loop_init(px, &px->loops[i], px->external, err, errlen) < 0) {
            proxy_free(px);
            return NULL;
        }
    return px;
oom:
    snprintf(err, errlen, "out of memory");
    proxy_free(px);
    return NULL;
}

void proxy_stop(proxy *px, int grace_ms)
{
    if (!px)
        return;
    atomic_store(&px->stopping, 1);
    for (int waited = 0; waited < grace_ms; waited += 20) {
        int busy = 0;

        for (int i = 0; i < px->nloops; i++)
            busy += px->loops[i].nrunning;
        if (!busy)
            break;
        usleep(20 * 1000);
    }
    for (int i = 0; i < px->nloops; i++) {
        pxloop *l = &px->loops[i];
        uint64_t one = 1;

        if (!l->started)
            continue;
        atomic_store(&l->stop, 1);
        if (write(l->evfd, &one, sizeof(one)) < 0)
            log_warn("proxy: cannot wake the loop: %s", strerror(errno));
        pthread_join(l->thread, NULL);
        l->started = 0;
        /* A request posted while the loop ended is answered here. */
        px_run_cmds(l);
    }
}

void proxy_free(proxy *px)
{
    if (!px)
        return;
    proxy_stop(px, 0);
    for (int i = 0; px->loops && i < px->nloops; i++) {
        pxloop *l = &px->loops[i];

        while (l->nspare > 0)
            curl_easy_cleanup(l->spare[--l->nspare]);
        if (l->multi)
            curl_multi_cleanup(l->multi);
        if (l->epfd > 0 && !px->external)
            close(l->epfd);
        if (l->evfd > 0)
            close(l->evfd);
        pthread_mutex_destroy(&l->qmu);
    }
    free(px->loops);
    breaker_free(px->brk);
    free(px);
}
