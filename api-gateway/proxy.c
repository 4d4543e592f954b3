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
#include "pxfront.h"



static long long now_ms(void)
{
    return svc_now_ms();
}

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
    metrics_gauge_set(u->breaker_gauge, (double)breaker_state(px->brk, u->name, now_ms()));
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
    breaker_report(r->px->brk, r->up->name, ok, now_ms());
    px_up_breaker_gauge(r->px, r->up);
}

/* ---- header handling (the rules are pxhdr's) ----------------------------- */

static void px_each_header(const void *src, pxhdr_visit visit, void *vud)
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
static void px_headers_done(pxreq *r)
{
    const char *p = r->rh.p ? r->rh.p : "", *end = p + r->rh.len;
    const char *ctype = NULL;
    char ctype_buf[512] = "";
    int sse;

    r->headers_done = 1;
    metrics_histogram_observe(r->up->latency, (double)(now_ms() - r->start_ms) / 1000.0);
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

/* Adds a starting transfer to the loop's running list, with the loop's
 * reference (dropped by px_finish, which unlinks it). */
static void px_link(pxloop *l, pxreq *r)
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

static void px_direct_release(pxloop *l, pxreq *r, int reuse);
static const char *px_direct_strerror(CURLcode rc);

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
        pxfront_stream_end(l, r, rc != CURLE_OK);
    } else if (r->streaming && r->out) {
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

static const char *px_direct_strerror(CURLcode rc)
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
static void px_direct_release(pxloop *l, pxreq *r, int reuse)
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

        r->deadline = now_ms() + ct;
        return; /* sent once connected */
    }
    r->deadline = now_ms() + u->timeout_ms;
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
    r->deadline = now_ms() + r->up->timeout_ms;
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
        r->deadline = now_ms() + r->up->timeout_ms;
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

static void px_direct_event(pxloop *l, uint64_t tag, uint32_t events)
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
        r->deadline = now_ms() + r->up->timeout_ms;
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
static void px_direct_expire(pxloop *l, long long now)
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

static int px_direct_setup(pxreq *r, httpd_req *req, const char *rest)
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
static int px_direct_fits(proxy *px, upstream *u, httpd_req *req)
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
static void px_direct_prepare(upstream *u)
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

static void px_direct_fini(pxloop *l)
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
    /* Commands first: a transfer added now is started by the expiry that
     * follows (libcurl asks for a timeout of 0), not one turn later. */
    px_run_cmds(l);
    curlep_expire(&l->cep, now_ms());
    px_check_done(l);
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
    curlep_init(&l->cep, l->multi, l->epfd, now_ms);
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
    return curlep_wait_ms(&l->cep, now_ms(), ms);
}

static int px_hook_tick(void *app)
{
    pxloop *l = app;

    px_loop_tick(l);
    if (l->nrunning > 0)
        px_direct_expire(l, now_ms());
    pxfront_expire(l, now_ms());
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
        int n = epoll_wait(l->epfd, evs, 64, curlep_wait_ms(&l->cep, now_ms(), 1000));

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
    wait = breaker_allow(px->brk, u->name, now_ms());
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
    r = calloc(1, sizeof(*r));
    if (!r) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return 1;
    }
    pthread_mutex_init(&r->mu, NULL);
    atomic_init(&r->refs, 1); /* the request's, dropped by px_req_done */
    r->px = px;
    r->up = u;
    r->req = req;
    r->declared_len = -1;
    r->start_ms = now_ms();
    /* In loop mode the transfer stays on the request's own thread. */
    r->loop = px->external && httpd_req_loop(req)
                  ? &px->loops[httpd_loop_index(httpd_req_loop(req)) % px->nloops]
                  : &px->loops[atomic_fetch_add(&px->rr, 1) % (unsigned)px->nloops];
    buf_init(&r->rh, PX_HDR_MAX);
    buf_init(&r->body, PX_SMALL_MAX);
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
    long long now = now_ms();

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
    curlep_init(&l->cep, l->multi, l->epfd, now_ms);
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
