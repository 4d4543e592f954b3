#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "buf.h"
#include "jget.h"
#include "fmt.h"
#include "log.h"
#include "svc.h"

#define HTTPD_MAX_ROUTES 128
#define HTTPD_MAX_SEGMENTS 16
#define HTTPD_MAX_PARAMS 8
#define HTTPD_MAX_HEADERS 16
#ifndef HTTPD_CONN_MEMORY
#define HTTPD_CONN_MEMORY 16384
#endif
#define HTTPD_DEFAULT_BODY (1024 * 1024)
#define HTTPD_BODY_CHUNK 4096
#define HTTPD_DEFAULT_HEADER_TIMEOUT_MS 10000
/* A request refused on its headers (401, 429...) with a declared body up to
 * this size is answered after the body, read and thrown away, so that
 * clients which write before they read see the answer; a larger or chunked
 * one is answered at once and its connection closed unread. */
#define HTTPD_REJECT_DRAIN (64 * 1024)

/* One per open connection, for the header deadline (see httpd_reaper). */
typedef struct httpd_conn {
    struct httpd_conn *prev, *next;
    int fd;
    /* Monotonic ms by which the headers of the next request must be in; 0
     * while a request is being served. Written by MHD's threads, read by
     * the reaper. */
    _Atomic long long deadline_ms;
    int reaped;
    /* Loop mode, for httpd_req_take_socket: the bytes of the connection
     * read before libmicrohttpd had it (by a front that gave it back) plus
     * those of the requests it served; `unknown` once a chunked body made
     * the count uncertain. */
    unsigned long long consumed;
    int unknown;
    struct sockaddr_storage addr;
    socklen_t alen;
} httpd_conn;

/* Connections of one address held by a loop, in libmicrohttpd or outside
 * it (httpd_loop_conn_hold), for the per-address limit. */
typedef struct httpd_ipcount {
    struct httpd_ipcount *next;
    unsigned char key[16];
    int klen;
    int n;
} httpd_ipcount;
#define HTTPD_IP_BUCKETS 256

/* Methods get a small index so per-method metrics can be cached. */
enum { M_GET, M_POST, M_PUT, M_PATCH, M_DELETE, M_OPTIONS, M_HEAD, M_OTHER, M_COUNT };
static const char *const method_names[M_COUNT] = {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "OTHER"};

typedef struct {
    int method;
    int nseg;
    int rest; /* last segment takes the rest of the path */
    char *segs[HTTPD_MAX_SEGMENTS];
    httpd_handler fn;
    void *ud;
} httpd_route_t;

struct httpd_loop {
    httpd *srv;
    int idx;
    int ep, evfd;
    pthread_t thread;
    int started;
    struct MHD_Daemon *daemon;
    void *app; /* the hooks' state for this loop */
    /* Connections the loop holds outside libmicrohttpd, and every
     * connection's address (both kinds), for the limits (loop thread). */
    int held;
    httpd_ipcount *ips[HTTPD_IP_BUCKETS];
};

/* The loop the calling thread runs (NULL outside loop mode). */
static __thread httpd_loop *httpd_cur_loop;

#define HTTPD_TAG_MHD (1ULL << 62)
#define HTTPD_TAG_WAKE ((1ULL << 62) + 1)

struct httpd {
    httpd_opts opts;
    char timeout_resp[384]; /* the 408 the reaper writes before it shuts a socket down */
    size_t timeout_resp_len;
    httpd_loop *loops;
    int nloops;
    httpd_loop_hooks lhooks;
    atomic_int loops_stop;
    char service[64];
    char host[256];
    char cors[1024];
    struct MHD_Daemon *daemon;
    int port;
    httpd_route_t routes[HTTPD_MAX_ROUTES];
    int nroutes;
    httpd_hook hook;
    void *hook_ud;
    pthread_mutex_t conns_mu;
    pthread_cond_t reaper_cv;
    httpd_conn *conns;
    pthread_t reaper;
    int reaper_running, reaper_stop;
    metrics_counter *header_timeouts;
    httpd_hook claims, take;
    void *stream_ud;
    httpd_handler fallback;
    void *fallback_ud;
    metrics *reg;
    metrics_histogram *latency;
    /* Counters per (method, status) are cached so the hot path never takes
     * the registry lock after the first request of a kind. */
    _Atomic(metrics_counter *) req_counters[M_COUNT][600];
};

typedef struct {
    const char *name;
    char *value;
} httpd_kv;

/* The state of a deferred request, shared between the MHD thread that owns
 * the connection and the thread that answers (see httpd_req_defer). */
typedef struct {
    pthread_mutex_t mu;
    int suspended; /* MHD_suspend_connection was called and not yet undone */
    int woken;     /* httpd_req_resume came while the connection ran */
    int answered;  /* a response is set: queue it at the next chance */
    int body_done; /* the sink saw the end of the body */
    int kicked;    /* httpd_req_resume came and `resumed` has not run since */
    httpd_body_fn sink;
    httpd_done_fn done;
    void *ud;
    httpd_handler resumed; /* httpd_req_defer_answer's */
    void *resumed_ud;
} httpd_defer;

struct httpd_req {
    httpd *srv;
    struct MHD_Connection *conn;
    const char *method;
    int method_idx;
    const char *path;
    char request_id[72];
    char remote[64];     /* see httpd_req_remote */
    int remote_done;
    struct timespec start;
    char *body;
    size_t body_len, body_cap;
    int too_large;
    int chunked;
    size_t max_body;                /* this request's limit (httpd_req_set_max_body) */
    unsigned long long declared_len; /* Content-Length, when sent */
    unsigned long long discarded;    /* body bytes read and thrown away */
    void *ctx;
    void (*ctx_free)(void *);
    httpd_kv params[HTTPD_MAX_PARAMS];
    int nparams;
    char *param_buf;
    const char *header_names[HTTPD_MAX_HEADERS];
    char *header_values[HTTPD_MAX_HEADERS];
    int nheaders;
    struct MHD_Response *response;
    int status;
    httpd_defer *defer;
    httpd_loop *loop;
    int http10;   /* an HTTP/1.0 request: no chunked answer */
    int detached; /* the socket went to the handler (httpd_req_detach) */
    int handed;   /* ... for good, unanswered and unaccounted (httpd_req_take_socket) */
    size_t head_size; /* libmicrohttpd's size of the request head */
    char raw_target[]; /* the request target as received (see httpd_uri_log) */
};

static int httpd_method_index(const char *m)
{
    for (int i = 0; i < M_OTHER; i++)
        if (strcmp(m, method_names[i]) == 0)
            return i;
    return M_OTHER;
}

/* ---- routes ------------------------------------------------------------ */

static void httpd_route_clear(httpd_route_t *r)
{
    for (int i = 0; i < r->nseg; i++)
        free(r->segs[i]);
    r->nseg = 0;
}

int httpd_route(httpd *srv, const char *method, const char *pattern, httpd_handler fn, void *ud)
{
    httpd_route_t *r;
    const char *p = pattern;

    if (srv->nroutes >= HTTPD_MAX_ROUTES || pattern[0] != '/')
        return -1;
    r = &srv->routes[srv->nroutes];
    memset(r, 0, sizeof(*r));
    r->method = httpd_method_index(method);
    r->fn = fn;
    r->ud = ud;
    while (*p == '/') {
        const char *start = ++p, *end = strchr(start, '/');
        size_t len = end ? (size_t)(end - start) : strlen(start);

        if (len == 0 && !end)
            break;
        if (r->nseg >= HTTPD_MAX_SEGMENTS || r->rest || len == 0)
            goto fail;
        r->segs[r->nseg] = strndup(start, len);
        if (!r->segs[r->nseg])
            goto fail;
        if (len > 5 && strcmp(r->segs[r->nseg] + len - 4, "...}") == 0) {
            r->rest = 1;
            r->segs[r->nseg][len - 4] = '}';
            r->segs[r->nseg][len - 3] = '\0';
        }
        r->nseg++;
        p = start + len;
    }
    srv->nroutes++;
    return 0;
fail:
    httpd_route_clear(r);
    return -1;
}

/* Matches `path` against a route, filling params into a scratch copy of
 * the path. Returns 1 on match. */
static int httpd_route_match(const httpd_route_t *r, const char *path, httpd_req *req)
{
    const char *p = path;
    char *out;
    size_t used = 0;
    int np = 0;

    if (!req->param_buf) {
        req->param_buf = malloc(strlen(path) + 1);
        if (!req->param_buf)
            return 0;
    }
    out = req->param_buf;
    for (int i = 0; i < r->nseg; i++) {
        const char *seg = r->segs[i], *end;
        size_t len;

        if (*p != '/')
            return 0;
        p++;
        end = strchr(p, '/');
        len = (r->rest && i == r->nseg - 1) ? strlen(p) : (end ? (size_t)(end - p) : strlen(p));
        if (seg[0] == '{') {
            if (len == 0 || np >= HTTPD_MAX_PARAMS)
                return 0;
            memcpy(out + used, p, len);
            out[used + len] = '\0';
            req->params[np].name = seg;
            req->params[np].value = out + used;
            np++;
            used += len + 1;
        } else if (strlen(seg) != len || memcmp(seg, p, len) != 0) {
            return 0;
        }
        p += len;
    }
    if (*p != '\0' && strcmp(p, "/") != 0)
        return 0;
    req->nparams = np;
    return 1;
}

static int httpd_param_name_is(const char *seg, const char *name)
{
    size_t n = strlen(name);

    return seg[0] == '{' && strncmp(seg + 1, name, n) == 0 && seg[n + 1] == '}';
}

const char *httpd_req_param(const httpd_req *req, const char *name)
{
    for (int i = 0; i < req->nparams; i++)
        if (httpd_param_name_is(req->params[i].name, name))
            return req->params[i].value;
    return NULL;
}

/* ---- request accessors -------------------------------------------------- */

const char *httpd_req_method(const httpd_req *req) { return req->method; }
const char *httpd_req_path(const httpd_req *req) { return req->path; }
const char *httpd_req_id(const httpd_req *req) { return req->request_id; }
static void httpd_remote(httpd_req *req);

/* Formatted on first use: most requests (health checks, a limiter that is
 * off, no access log) never need the peer's address as text. */
const char *httpd_req_remote(httpd_req *req)
{
    if (!req->remote_done) {
        httpd_remote(req);
        req->remote_done = 1;
    }
    return req->remote;
}

int httpd_req_http10(const httpd_req *req)
{
    return req->http10;
}

const char *httpd_req_target(const httpd_req *req)
{
    return req->raw_target;
}

struct httpd_each_ctx {
    httpd_header_fn fn;
    void *ud;
};

static enum MHD_Result httpd_each_cb(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    struct httpd_each_ctx *c = cls;

    (void)kind;
    c->fn(c->ud, key, value ? value : "");
    return MHD_YES;
}

void httpd_req_each_header(const httpd_req *req, httpd_header_fn fn, void *ud)
{
    struct httpd_each_ctx c = {fn, ud};

    MHD_get_connection_values(req->conn, MHD_HEADER_KIND, httpd_each_cb, &c);
}

struct MHD_Connection *httpd_req_connection(const httpd_req *req)
{
    return req->conn;
}

void httpd_req_set_timeout(httpd_req *req, unsigned int seconds)
{
    MHD_set_connection_option(req->conn, MHD_CONNECTION_OPTION_TIMEOUT, seconds);
}

const char *httpd_req_query(const httpd_req *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, name);
}

const char *httpd_req_header(const httpd_req *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

const char *httpd_req_body(const httpd_req *req, size_t *len)
{
    if (len)
        *len = req->body_len;
    return req->body ? req->body : "";
}

int httpd_req_add_header(httpd_req *req, const char *name, const char *value)
{
    if (req->nheaders >= HTTPD_MAX_HEADERS)
        return -1;
    req->header_values[req->nheaders] = strdup(value);
    if (!req->header_values[req->nheaders])
        return -1;
    req->header_names[req->nheaders++] = name;
    return 0;
}

int httpd_req_json(httpd_req *req, cJSON **out)
{
    const char *why;
    size_t pos, line = 1, col = 1;
    cJSON *json;

    *out = NULL;
    if (req->body_len == 0) {
        httpd_respond_error(req, 400, "invalid_request", "request body is empty: expected JSON", NULL);
        return -1;
    }
    if ((json = jget_parse(req->body, req->body_len, &pos, &why)) != NULL) {
        *out = json;
        return 0;
    }
    for (size_t i = 0; i < pos; i++) {
        if (req->body[i] == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    cJSON *details = cJSON_CreateObject();
    cJSON_AddNumberToObject(details, "position", (double)pos);
    cJSON_AddNumberToObject(details, "line", (double)line);
    cJSON_AddNumberToObject(details, "column", (double)col);
    char msg[128];
    snprintf(msg, sizeof(msg), "%s at position %zu (line %zu, column %zu)", why, pos, line, col);
    httpd_respond_error(req, 400, "invalid_request", msg, details);
    return -1;
}

/* ---- answers ------------------------------------------------------------ */

const char *httpd_status_code(int status)
{
    switch (status) {
    case 400: case 405: case 411: case 415: case 422: return "invalid_request";
    case 401: return "unauthorized";
    case 403: return "forbidden";
    case 404: return "not_found";
    case 409: return "conflict";
    case 413: return "payload_too_large";
    case 429: return "rate_limited";
    case 502: return "bad_gateway";
    case 503: return "unavailable";
    case 504: return "gateway_timeout";
    default: return status >= 500 ? "internal" : "invalid_request";
    }
}

void httpd_req_set_response(httpd_req *req, int status, struct MHD_Response *resp)
{
    if (req->response || !resp) {
        if (resp)
            MHD_destroy_response(resp);
        return;
    }
    req->response = resp;
    req->status = status;
}

static void httpd_set_response(httpd_req *req, int status, const char *content_type, struct MHD_Response *resp)
{
    if (!resp) {
        log_error("cannot allocate a response");
        return;
    }
    if (content_type)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    req->response = resp;
    req->status = status;
}

void httpd_respond_bytes(httpd_req *req, int status, const char *content_type, const char *body, size_t len)
{
    if (req->response)
        return;
    httpd_set_response(req, status, content_type,
                       MHD_create_response_from_buffer(len, (void *)(uintptr_t)body, MHD_RESPMEM_MUST_COPY));
}

void httpd_respond_static(httpd_req *req, int status, const char *content_type, const char *body, size_t len)
{
    if (req->response)
        return;
    httpd_set_response(req, status, content_type,
                       MHD_create_response_from_buffer(len, (void *)(uintptr_t)body, MHD_RESPMEM_PERSISTENT));
}

void httpd_respond_take(httpd_req *req, int status, const char *content_type, char *body, size_t len)
{
    if (req->response) {
        free(body);
        return;
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r)
        free(body);
    httpd_set_response(req, status, content_type, r);
}

void httpd_respond_json(httpd_req *req, int status, cJSON *body)
{
    char *text = body ? cJSON_PrintUnformatted(body) : strdup("null");

    cJSON_Delete(body);
    if (!text) {
        httpd_respond_static(req, 500, "application/json",
                             "{\"error\":\"internal\",\"message\":\"out of memory\"}", 46);
        return;
    }
    httpd_respond_take(req, status, "application/json", text, strlen(text));
}

cJSON *httpd_error_body(int status, const char *code, const char *message, cJSON *details, const char *request_id)
{
    cJSON *body = cJSON_CreateObject();

    if (!body) {
        cJSON_Delete(details);
        return NULL;
    }
    cJSON_AddStringToObject(body, "error", code ? code : httpd_status_code(status));
    cJSON_AddStringToObject(body, "message", message ? message : "");
    if (details)
        cJSON_AddItemToObject(body, "details", details);
    cJSON_AddStringToObject(body, "request_id", request_id ? request_id : "");
    return body;
}

void httpd_respond_error(httpd_req *req, int status, const char *code, const char *message, cJSON *details)
{
    httpd_respond_json(req, status, httpd_error_body(status, code, message, details, req->request_id));
}

void httpd_respond_errorf(httpd_req *req, int status, const char *code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    httpd_respond_error(req, status, code, msg, NULL);
}

/* ---- request ids, CORS, metrics ---------------------------------------- */

static int httpd_request_id_sane(const char *id)
{
    size_t n = 0;

    for (; id[n]; n++) {
        char ch = id[n];
        if (n >= 64 || !((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                         ch == '-' || ch == '_' || ch == '.' || ch == ':'))
            return 0;
    }
    return n > 0;
}

/* A per-thread xorshift generator seeded from the kernel: request ids need
 * to be unique, not secret, and getrandom per request costs a syscall. */
static uint64_t httpd_rand64(void)
{
    static _Thread_local uint64_t state;

    if (state == 0) {
        if (getrandom(&state, sizeof(state), 0) != sizeof(state) || state == 0)
            state = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)&state ^ 0x9e3779b97f4a7c15ULL;
    }
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

void httpd_request_id_make(const char *given, char *out, size_t outlen)
{
    uint64_t v[2];

    if (outlen < 33) {
        if (outlen)
            out[0] = '\0';
        return;
    }
    if (given && httpd_request_id_sane(given) && strlen(given) < outlen) {
        memcpy(out, given, strlen(given) + 1);
        return;
    }
    /* 32 hex digits without snprintf, which was a tenth of the health
     * route. */
    v[0] = httpd_rand64();
    v[1] = httpd_rand64();
    fmt_hex(out, v, sizeof(v));
}

static void httpd_make_request_id(httpd_req *req)
{
    httpd_request_id_make(httpd_req_header(req, "X-Request-Id"), req->request_id, sizeof(req->request_id));
}

/* Nonzero when `rest` (what follows a pattern's prefix) is empty or a port:
 * ':' and 1 to 5 digits. Anything else would let "http://localhost*" admit
 * "http://localhost.evil.com" or "http://localhostevil.com". */
static int httpd_origin_port_only(const char *rest, size_t len)
{
    if (len == 0)
        return 1;
    if (rest[0] != ':' || len < 2 || len > 6)
        return 0;
    for (size_t i = 1; i < len; i++)
        if (rest[i] < '0' || rest[i] > '9')
            return 0;
    return 1;
}

int httpd_cors_match(const char *list, const char *origin)
{
    const char *p = list;
    size_t olen = strlen(origin);
    int any = 0;

    while (p && *p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);

        while (len && (*p == ' ')) {
            p++;
            len--;
        }
        while (len && p[len - 1] == ' ')
            len--;
        if (len == 1 && p[0] == '*') {
            any = 1;
        } else if (len && p[len - 1] == '*') {
            if (olen >= len - 1 && memcmp(origin, p, len - 1) == 0 &&
                httpd_origin_port_only(origin + len - 1, olen - (len - 1)))
                return HTTPD_CORS_CREDENTIALS;
        } else if (len == olen && memcmp(origin, p, len) == 0) {
            return HTTPD_CORS_CREDENTIALS;
        }
        p = end ? end + 1 : NULL;
    }
    return any ? HTTPD_CORS_ANY : HTTPD_CORS_NO;
}

/* The CORS headers of an answer to `req`, each given to fn. */
static void httpd_cors_headers(httpd_req *req, void (*fn)(void *ud, const char *name, const char *value), void *ud)
{
    const char *origin = httpd_req_header(req, "Origin");
    int m = origin ? httpd_cors_match(req->srv->cors, origin) : HTTPD_CORS_NO;

    if (m == HTTPD_CORS_NO)
        return;
    /* "*" admits every origin, so it never comes with credentials: a page
     * anywhere could otherwise read answers made with the user's cookies
     * or HTTP authentication. */
    fn(ud, "Access-Control-Allow-Origin", m == HTTPD_CORS_ANY ? "*" : origin);
    if (m == HTTPD_CORS_CREDENTIALS)
        fn(ud, "Access-Control-Allow-Credentials", "true");
    fn(ud, "Vary", "Origin");
    fn(ud, "Access-Control-Expose-Headers", "X-Request-Id, Retry-After");
}

static void httpd_cors_to_response(void *ud, const char *name, const char *value)
{
    MHD_add_response_header(ud, name, value);
}

static void httpd_add_cors(httpd_req *req, struct MHD_Response *resp)
{
    httpd_cors_headers(req, httpd_cors_to_response, resp);
}

/* Answers a CORS preflight; returns 1 when the request was one. */
static int httpd_preflight(httpd_req *req)
{
    const char *origin = httpd_req_header(req, "Origin");
    const char *want = httpd_req_header(req, "Access-Control-Request-Method");
    const char *hdrs = httpd_req_header(req, "Access-Control-Request-Headers");

    if (req->method_idx != M_OPTIONS || !origin || !want)
        return 0;
    if (httpd_cors_match(req->srv->cors, origin) == HTTPD_CORS_NO) {
        httpd_respond_error(req, 403, "forbidden", "origin not allowed", NULL);
        return 1;
    }
    httpd_respond_static(req, 204, NULL, "", 0);
    httpd_req_add_header(req, "Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS");
    httpd_req_add_header(req, "Access-Control-Allow-Headers",
                         hdrs ? hdrs : "Authorization, Content-Type, X-Request-Id, Last-Event-ID");
    httpd_req_add_header(req, "Access-Control-Max-Age", "600");
    return 1;
}

static metrics_counter *httpd_counter(httpd *srv, int midx, int status)
{
    char labels[96];
    metrics_counter *c;

    if (status < 100 || status >= 600)
        status = 500;
    c = atomic_load_explicit(&srv->req_counters[midx][status], memory_order_relaxed);
    if (c)
        return c;
    snprintf(labels, sizeof(labels), "method=\"%s\",status=\"%d\"", method_names[midx], status);
    c = metrics_counter_get(srv->reg, "http_requests_total", "HTTP requests answered, by method and status.",
                            labels);
    atomic_store_explicit(&srv->req_counters[midx][status], c, memory_order_relaxed);
    return c;
}

/* ---- dispatch ----------------------------------------------------------- */

static void httpd_too_large(httpd_req *req)
{
    httpd_respond_errorf(req, 413, "payload_too_large", "request body exceeds %zu bytes", req->max_body);
}

/* Everything decided on the headers alone, before any of the body is read:
 * a declared body over the limit, CORS preflights, then the hook (rate
 * limit, authentication). A request answered here never has its body
 * stored. */
static void httpd_on_headers(httpd_req *req)
{
    httpd *srv = req->srv;
    /* A streamed request (the proxy's) is not held, so the body limit is
     * not the server's but the taker's own. */
    int claimed = srv->claims && srv->claims(req, srv->stream_ud);

    if (req->too_large && !claimed) {
        httpd_too_large(req);
        return;
    }
    if (httpd_preflight(req))
        return;
    if (srv->hook && srv->hook(req, srv->hook_ud))
        return;
    if (claimed) {
        srv->take(req, srv->stream_ud);
        if (!req->defer && !req->response && !req->handed)
            httpd_respond_error(req, 500, "internal", "stream hook did not answer", NULL);
        return;
    }
    if (req->too_large) /* the hook lowered the limit */
        httpd_too_large(req);
}

static void httpd_dispatch(httpd_req *req)
{
    httpd *srv = req->srv;
    int path_matched = 0, want = req->method_idx == M_HEAD ? M_GET : req->method_idx;
    char allow[128] = "";

    if (req->too_large) {
        httpd_too_large(req);
        return;
    }
    for (int i = 0; i < srv->nroutes; i++) {
        const httpd_route_t *r = &srv->routes[i];

        if (!httpd_route_match(r, req->path, req))
            continue;
        if (r->method == want) {
            r->fn(req, r->ud);
            if (!req->response && !req->detached && !req->defer)
                httpd_respond_error(req, 500, "internal", "handler did not answer", NULL);
            return;
        }
        if (!strstr(allow, method_names[r->method])) {
            size_t n = strlen(allow);
            snprintf(allow + n, sizeof(allow) - n, "%s%s", n ? ", " : "", method_names[r->method]);
        }
        path_matched = 1;
    }
    if (path_matched) {
        httpd_respond_errorf(req, 405, "invalid_request", "method %s is not allowed here", req->method);
        httpd_req_add_header(req, "Allow", allow);
        return;
    }
    if (srv->fallback) {
        srv->fallback(req, srv->fallback_ud);
        if (!req->response)
            httpd_respond_error(req, 500, "internal", "handler did not answer", NULL);
        return;
    }
    httpd_respond_errorf(req, 404, "not_found", "no route for %s %s", req->method, req->path);
}

static enum MHD_Result httpd_queue(httpd_req *req)
{
    enum MHD_Result rc;

    if (!req->response)
        return MHD_NO;
    MHD_add_response_header(req->response, "X-Request-Id", req->request_id);
    for (int i = 0; i < req->nheaders; i++)
        MHD_add_response_header(req->response, req->header_names[i], req->header_values[i]);
    httpd_add_cors(req, req->response);
    rc = MHD_queue_response(req->conn, (unsigned int)req->status, req->response);
    MHD_destroy_response(req->response);
    req->response = NULL;
    return rc;
}

/* ---- detached answers (httpd_req_detach) ------------------------------ */

static void httpd_head_header(void *ud, const char *name, const char *value)
{
    buf *b = ud;

    /* Every value is ours or checked (a sane request id, an allowed
     * origin); a line break would still split the head, so none passes. */
    if (strpbrk(value, "\r\n"))
        return;
    buf_puts(b, name);
    buf_puts(b, ": ");
    buf_puts(b, value);
    buf_puts(b, "\r\n");
}

/* IMF-fixdate (RFC 9110 5.6.7), without the locale strftime would use. */
static void httpd_http_date(char *out, size_t len)
{
    static const char days[] = "SunMonTueWedThuFriSat", months[] = "JanFebMarAprMayJunJulAugSepOctNovDec";
    time_t now = time(NULL);
    struct tm tm;

    gmtime_r(&now, &tm);
    snprintf(out, len, "%.3s, %02d %.3s %04d %02d:%02d:%02d GMT", days + 3 * tm.tm_wday, tm.tm_mday,
             months + 3 * tm.tm_mon, tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

int httpd_req_detach(httpd_req *req, int status, const char *content_type, struct buf *head, int *chunked)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(req->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    const char *reason = MHD_get_reason_phrase_for((unsigned int)status);
    char line[160], date[40];
    int fd, one = 1, zero = 0;

    if (req->response || req->detached || (req->defer && !req->defer->resumed) || !ci)
        return -1;
    *chunked = !req->http10;
    snprintf(line, sizeof(line), "HTTP/1.1 %d %s\r\n", status, reason ? reason : "");
    httpd_http_date(date, sizeof(date));
    if (buf_puts(head, line) < 0)
        return -1;
    httpd_head_header(head, "Date", date);
    if (content_type)
        httpd_head_header(head, "Content-Type", content_type);
    httpd_head_header(head, "X-Request-Id", req->request_id);
    for (int i = 0; i < req->nheaders; i++)
        httpd_head_header(head, req->header_names[i], req->header_values[i]);
    httpd_cors_headers(req, httpd_head_header, head);
    httpd_head_header(head, *chunked ? "Transfer-Encoding" : "Connection", *chunked ? "chunked" : "close");
    buf_puts(head, "\r\n");
    if (head->truncated)
        return -1;
    /* libmicrohttpd keeps its descriptor and closes it when the handler
     * returns MHD_NO; with MHD_USE_TURBO (httpd_start) it neither writes
     * to nor shuts down the socket on the way, so the socket lives on
     * through this copy, and the connection's pool and records are freed
     * at once. Its socket is nonblocking already (O_NONBLOCK belongs to the
     * open file, shared with the copy). */
    fd = fcntl(ci->connect_fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
        return -1;
    /* Each frame goes out when written: no Nagle wait behind an unacked
     * one, no cork left from an earlier answer on the connection. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_CORK, &zero, sizeof(zero));
    req->detached = 1;
    req->status = status;
    return fd;
}

static void httpd_remote(httpd_req *req)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(req->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa = ci ? ci->client_addr : NULL;

    req->remote[0] = '\0';
    if (!sa)
        return;
    if (sa->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, req->remote, sizeof(req->remote));
    else if (sa->sa_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, req->remote,
                  sizeof(req->remote));
}

/* ---- the header deadline ------------------------------------------------ */

/* MHD's connection timeout is an idle timeout: a client that trickles a
 * header line every few seconds keeps a connection (and its memory pool)
 * for ever. So each connection also gets a deadline for the headers of its
 * next request, counted from when it opened or its last request ended (plus
 * the keep-alive idle time), cleared while a request is served. The reaper
 * thread shuts down the socket of a connection past its deadline; MHD then
 * sees the end of the stream and closes it. The list is changed under
 * conns_mu, and MHD reports a connection closed before it closes the
 * socket, so the reaper never shuts down a descriptor reused by another. */

static httpd_conn *httpd_conn_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);

    return ci ? ci->socket_context : NULL;
}

static void httpd_conn_busy(httpd *srv, struct MHD_Connection *conn)
{
    httpd_conn *c = srv->opts.header_timeout_ms > 0 ? httpd_conn_of(conn) : NULL;

    if (c)
        atomic_store_explicit(&c->deadline_ms, 0, memory_order_relaxed);
}

static void httpd_conn_idle(httpd *srv, struct MHD_Connection *conn)
{
    httpd_conn *c = srv->opts.header_timeout_ms > 0 ? httpd_conn_of(conn) : NULL;

    if (c)
        atomic_store_explicit(&c->deadline_ms,
                              svc_now_ms() + srv->opts.connection_timeout_s * 1000LL + srv->opts.header_timeout_ms,
                              memory_order_relaxed);
}

/* ---- connections outside libmicrohttpd (loop mode) ---------------------- */

/* The address bytes that identify a client for the per-address limit. */
static int httpd_ip_key(const struct sockaddr *sa, unsigned char key[16])
{
    if (sa->sa_family == AF_INET) {
        memcpy(key, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
        return 4;
    }
    if (sa->sa_family == AF_INET6) {
        memcpy(key, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, 16);
        return 16;
    }
    return 0;
}

/* Adds `d` to the count of `sa`'s connections on the loop; returns the
 * count before. Loop thread only. */
static int httpd_ip_count(httpd_loop *l, const struct sockaddr *sa, int d)
{
    unsigned char key[16];
    int klen = httpd_ip_key(sa, key), before;
    unsigned h = 2166136261u;
    httpd_ipcount **pp, *e;

    if (!klen)
        return 0;
    for (int i = 0; i < klen; i++)
        h = (h ^ key[i]) * 16777619u;
    pp = &l->ips[h % HTTPD_IP_BUCKETS];
    while (*pp && ((*pp)->klen != klen || memcmp((*pp)->key, key, (size_t)klen)))
        pp = &(*pp)->next;
    e = *pp;
    if (!e) {
        if (d <= 0)
            return 0;
        e = calloc(1, sizeof(*e));
        if (!e)
            return 0;
        memcpy(e->key, key, (size_t)klen);
        e->klen = klen;
        *pp = e;
    }
    before = e->n;
    e->n += d;
    if (e->n <= 0) {
        *pp = e->next;
        free(e);
    }
    return before;
}

/* The kernel's count of bytes received on a socket, less those not read
 * yet: what its readers took so far. -1 when unknown. */
struct httpd_tcp_info {
    struct tcp_info base;
    uint64_t pacing_rate, max_pacing_rate, bytes_acked, bytes_received;
};
_Static_assert(offsetof(struct httpd_tcp_info, bytes_received) == 128, "linux tcp_info layout");

static long long httpd_bytes_read(int fd)
{
    struct httpd_tcp_info ti;
    socklen_t tl = sizeof(ti);
    int inq = 0;

    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) < 0 || tl < sizeof(ti) || ioctl(fd, SIOCINQ, &inq) < 0 ||
        inq < 0 || (uint64_t)inq > ti.bytes_received)
        return -1;
    return (long long)(ti.bytes_received - (uint64_t)inq);
}

static void httpd_loop_conn_started(httpd_loop *l, httpd_conn *c, struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ai = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    long long before = httpd_bytes_read(c->fd);

    /* Nothing of it is libmicrohttpd's yet: what was read before was a
     * front's (a connection given back). */
    if (before < 0)
        c->unknown = 1;
    else
        c->consumed = (unsigned long long)before;
    if (ai && ai->client_addr) {
        socklen_t len = ai->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                              : sizeof(struct sockaddr_in);

        memcpy(&c->addr, ai->client_addr, len);
        c->alen = len;
        httpd_ip_count(l, ai->client_addr, 1);
    }
}

/* libmicrohttpd's accept policy in loop mode: the limits count the
 * connections held outside it too. */
static enum MHD_Result httpd_accept_policy(void *cls, const struct sockaddr *addr, socklen_t addrlen)
{
    httpd_loop *l = cls;
    httpd *srv = l->srv;
    int n = srv->opts.loops, per_ip = srv->opts.max_connections_per_ip;

    (void)addrlen;
    if (per_ip > 0) {
        int cap = (per_ip + n - 1) / n, now = httpd_ip_count(l, addr, 0);

        if (now >= cap)
            return MHD_NO;
    }
    if (l->held > 0) {
        const union MHD_DaemonInfo *info = MHD_get_daemon_info(l->daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        unsigned int cap = (unsigned int)(srv->opts.max_connections + n - 1) / (unsigned int)n;

        if (info && info->num_connections + (unsigned int)l->held >= cap)
            return MHD_NO;
    }
    return MHD_YES;
}

int httpd_loop_conn_hold(httpd_loop *l, const struct sockaddr *addr)
{
    l->held++;
    httpd_ip_count(l, addr, 1);
    return 0;
}

void httpd_loop_conn_release(httpd_loop *l, const struct sockaddr *addr)
{
    l->held--;
    httpd_ip_count(l, addr, -1);
}

int httpd_loop_add_connection(httpd_loop *l, int fd, const struct sockaddr *addr, unsigned int alen)
{
    /* MHD_add_connection closes the socket when it fails. */
    return MHD_add_connection(l->daemon, fd, addr, alen) == MHD_YES ? 0 : -1;
}

httpd *httpd_loop_server(httpd_loop *l)
{
    return l->srv;
}

int httpd_idle_timeout_s(const httpd *srv)
{
    return srv->opts.connection_timeout_s;
}

int httpd_req_take_socket(httpd_req *req, struct sockaddr_storage *addr, unsigned int *alen)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(req->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    httpd_conn *c = httpd_conn_of(req->conn);
    long long got;
    int fd, one = 1, zero = 0;

    if (!req->loop || !c || c->unknown || !c->alen || req->response || req->defer || req->detached || !ci ||
        req->declared_len || req->chunked || !req->head_size)
        return -1;
    /* Everything read from the socket is this request's head and what came
     * before it: libmicrohttpd buffers nothing that would be lost (a
     * pipelined request is still in the kernel, for the taker to read). */
    got = httpd_bytes_read(ci->connect_fd);
    if (got < 0 || (unsigned long long)got != c->consumed + req->head_size)
        return -1;
    fd = fcntl(ci->connect_fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
        return -1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_CORK, &zero, sizeof(zero));
    memcpy(addr, &c->addr, c->alen);
    *alen = c->alen;
    req->handed = 1;
    return fd;
}

static void httpd_notify_conn(void *cls, struct MHD_Connection *conn, void **socket_context,
                              enum MHD_ConnectionNotificationCode toe)
{
    httpd *srv = cls;
    httpd_conn *c = *socket_context;

    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);

        c = calloc(1, sizeof(*c));
        if (!c || !ci) {
            free(c);
            return; /* untracked: only MHD's idle timeout applies */
        }
        c->fd = ci->connect_fd;
        atomic_init(&c->deadline_ms, svc_now_ms() + srv->opts.header_timeout_ms);
        if (httpd_cur_loop)
            httpd_loop_conn_started(httpd_cur_loop, c, conn);
        pthread_mutex_lock(&srv->conns_mu);
        c->next = srv->conns;
        if (srv->conns)
            srv->conns->prev = c;
        srv->conns = c;
        pthread_mutex_unlock(&srv->conns_mu);
        *socket_context = c;
        return;
    }
    if (!c)
        return;
    if (httpd_cur_loop && c->alen)
        httpd_ip_count(httpd_cur_loop, (const struct sockaddr *)&c->addr, -1);
    pthread_mutex_lock(&srv->conns_mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&srv->conns_mu);
    free(c);
    *socket_context = NULL;
}

/* RFC 9110 15.5.9: a server that gives up waiting for a request says so
 * with 408 and closes. Built once: the reaper only copies it out. */
static void httpd_timeout_response(httpd *srv)
{
    char msg[96];
    cJSON *b;
    char *text;
    int n;

    snprintf(msg, sizeof(msg), "the request headers were not complete within %d ms", srv->opts.header_timeout_ms);
    b = httpd_error_body(408, "request_timeout", msg, NULL, "");
    text = b ? cJSON_PrintUnformatted(b) : NULL;
    cJSON_Delete(b);
    n = text ? snprintf(srv->timeout_resp, sizeof(srv->timeout_resp),
                        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                        "Connection: close\r\n\r\n%s",
                        strlen(text), text)
             : -1;
    free(text);
    srv->timeout_resp_len = n > 0 && (size_t)n < sizeof(srv->timeout_resp) ? (size_t)n : 0;
}

static void *httpd_reaper(void *arg)
{
    httpd *srv = arg;
    long long tick = srv->opts.header_timeout_ms / 4;

    if (tick > 1000)
        tick = 1000;
    if (tick < 20)
        tick = 20;
    pthread_mutex_lock(&srv->conns_mu);
    while (!srv->reaper_stop) {
        struct timespec ts;
        long long now = svc_now_ms();

        for (httpd_conn *c = srv->conns; c; c = c->next) {
            long long d = atomic_load_explicit(&c->deadline_ms, memory_order_relaxed);

            if (d && d <= now && !c->reaped) {
                c->reaped = 1;
                /* No response is being written (the headers are not in):
                 * the 408 cannot interleave with one. Best effort, as the
                 * socket may be full. */
                (void)send(c->fd, srv->timeout_resp, srv->timeout_resp_len, MSG_DONTWAIT | MSG_NOSIGNAL);
                shutdown(c->fd, SHUT_RDWR);
                metrics_counter_inc(srv->header_timeouts);
            }
        }
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)(tick % 1000) * 1000000L;
        ts.tv_sec += (time_t)(tick / 1000) + ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&srv->reaper_cv, &srv->conns_mu, &ts);
    }
    pthread_mutex_unlock(&srv->conns_mu);
    return NULL;
}

static void httpd_reaper_stop(httpd *srv)
{
    if (!srv->reaper_running)
        return;
    pthread_mutex_lock(&srv->conns_mu);
    srv->reaper_stop = 1;
    pthread_cond_signal(&srv->reaper_cv);
    pthread_mutex_unlock(&srv->conns_mu);
    pthread_join(srv->reaper, NULL);
    srv->reaper_running = 0;
}

/* MHD's URI log callback sees the request target before MHD decodes the
 * path and splits off the query, which is what the proxy must forward; the
 * request is allocated here with a copy of it. */
static void *httpd_uri_log(void *cls, const char *uri, struct MHD_Connection *conn)
{
    size_t n = strlen(uri);
    httpd_req *req = calloc(1, sizeof(*req) + n + 1);

    (void)cls;
    (void)conn;
    if (req)
        memcpy(req->raw_target, uri, n + 1);
    return req;
}

static httpd_req *httpd_req_init(httpd_req *req, httpd *srv, struct MHD_Connection *conn, const char *url,
                                 const char *method)
{
    const char *clen;

    req->srv = srv;
    req->loop = httpd_cur_loop;
    req->conn = conn;
    req->method = method;
    req->method_idx = httpd_method_index(method);
    req->path = url;
    clock_gettime(CLOCK_MONOTONIC, &req->start);
    httpd_make_request_id(req);
    req->max_body = srv->opts.max_body;
    clen = httpd_req_header(req, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (clen) {
        char *end;
        unsigned long long n = strtoull(clen, &end, 10);

        if (*end == '\0')
            req->declared_len = n;
        req->too_large = req->declared_len > req->max_body;
    } else {
        const char *te = httpd_req_header(req, MHD_HTTP_HEADER_TRANSFER_ENCODING);

        req->chunked = te && strcasestr(te, "chunked") != NULL;
    }
    return req;
}

void httpd_req_set_max_body(httpd_req *req, size_t max)
{
    if (max == 0 || max > req->srv->opts.max_body)
        max = req->srv->opts.max_body;
    req->max_body = max;
    if (req->declared_len > max)
        req->too_large = 1;
}

void httpd_req_set_ctx(httpd_req *req, void *ctx, void (*free_fn)(void *))
{
    if (req->ctx && req->ctx_free)
        req->ctx_free(req->ctx);
    req->ctx = ctx;
    req->ctx_free = free_fn;
}

void *httpd_req_ctx(const httpd_req *req)
{
    return req->ctx;
}

static int httpd_append_body(httpd_req *req, const char *data, size_t len)
{
    size_t max = req->max_body;

    if (req->body_len + len > max) {
        req->too_large = 1;
        req->discarded = req->body_len + len;
        free(req->body);
        req->body = NULL;
        req->body_len = req->body_cap = 0;
        return 0;
    }
    if (req->body_len + len + 1 > req->body_cap) {
        size_t cap = req->body_cap ? req->body_cap : HTTPD_BODY_CHUNK;
        char *nb;

        while (cap < req->body_len + len + 1)
            cap *= 2;
        if (cap > max + 1)
            cap = max + 1;
        nb = realloc(req->body, cap);
        if (!nb)
            return -1;
        req->body = nb;
        req->body_cap = cap;
    }
    memcpy(req->body + req->body_len, data, len);
    req->body_len += len;
    req->body[req->body_len] = '\0';
    return 0;
}

/* A body declared too large is answered at once, which makes MHD close the
 * connection without reading it. Up to this size it is read and thrown
 * away instead, so that clients which write the whole body before reading
 * (most of them) see the 413 rather than a reset, and keep-alive survives.
 * Memory stays bounded either way: discarded bytes are never stored. */
static unsigned long long httpd_drain_max(const httpd *srv)
{
    unsigned long long cap = (unsigned long long)srv->opts.max_body * 8;

    return cap < 64ULL * 1024 * 1024 ? cap : 64ULL * 1024 * 1024;
}

/* Whether a request answered on its headers is answered at once (MHD then
 * closes the connection without reading the body) rather than after its
 * body has been read and thrown away. */
static int httpd_answer_now(const httpd_req *req)
{
    if (req->too_large)
        return req->chunked || req->declared_len > httpd_drain_max(req->srv);
    return req->chunked || req->declared_len > HTTPD_REJECT_DRAIN;
}

/* Body bytes of a request that is already answered or over its limit: read
 * and thrown away up to a bound, after which the connection is cut (MHD
 * 0.9.75 cannot queue a response in the middle of an upload). */
static enum MHD_Result httpd_discard(httpd_req *req, size_t len)
{
    unsigned long long cap = req->too_large ? httpd_drain_max(req->srv) : HTTPD_REJECT_DRAIN;

    req->discarded += len;
    return req->discarded > cap ? MHD_NO : MHD_YES;
}

static enum MHD_Result httpd_count_clen(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    (void)kind;
    (void)value;
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0)
        (*(int *)cls)++;
    return MHD_YES;
}

/* Why the request's framing is ambiguous, or NULL. A body whose length two
 * parties could read differently is how requests are smuggled past a front
 * proxy or into ours (RFC 9112 6.1, 6.3): Content-Length with
 * Transfer-Encoding, two Content-Lengths, one that is not a plain number,
 * or a coding other than chunked (which MHD would not decode). Such a
 * request is refused and its connection closed, so nothing after it on the
 * connection is read as a request. */
static const char *httpd_framing_error(const httpd_req *req)
{
    const char *clen = httpd_req_header(req, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te = httpd_req_header(req, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    int nclen = 0;

    MHD_get_connection_values(req->conn, MHD_HEADER_KIND, httpd_count_clen, &nclen);
    if (clen && te)
        return "Content-Length and Transfer-Encoding together";
    if (nclen > 1)
        return "more than one Content-Length";
    if (clen && (!*clen || strspn(clen, "0123456789") != strlen(clen)))
        return "Content-Length is not a number";
    if (te && strcasecmp(te, "chunked") != 0)
        return "Transfer-Encoding other than chunked";
    return NULL;
}

static enum MHD_Result httpd_deferred_step(httpd_req *req, const char *data, size_t *len);

static enum MHD_Result httpd_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                    const char *version, const char *upload_data, size_t *upload_data_size,
                                    void **req_cls)
{
    httpd *srv = cls;
    httpd_req *req = *req_cls;

    if (!req)
        return MHD_NO;
    if (req->defer)
        return httpd_deferred_step(req, upload_data, upload_data_size);
    if (!req->srv) {
        /* Headers are complete. A request refused on them (413, a
         * preflight, the hook) keeps its answer for the end, since
         * answering now makes MHD close the connection, which costs
         * keep-alive; unless the body is large or chunked, which must then
         * not be read at all. A request the stream hooks took (deferred)
         * gets its body through the sink. */
        const char *bad;

        httpd_req_init(req, srv, conn, url, method);
        req->http10 = version && strcmp(version, MHD_HTTP_VERSION_1_0) == 0;
        if (req->loop) {
            const union MHD_ConnectionInfo *hs =
                MHD_get_connection_info(conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);

            req->head_size = hs ? hs->header_size : 0;
        }
        httpd_conn_busy(srv, conn);
        if ((bad = httpd_framing_error(req))) {
            httpd_respond_error(req, 400, "invalid_request", bad, NULL);
            httpd_req_add_header(req, MHD_HTTP_HEADER_CONNECTION, "close");
            return httpd_queue(req);
        }
        httpd_on_headers(req);
        /* The socket went to the stream hook for good (httpd_req_take_socket):
         * MHD_NO makes libmicrohttpd close its descriptor, unwritten. */
        if (req->handed)
            return MHD_NO;
        if (req->defer)
            return req->response ? httpd_queue(req) : MHD_YES;
        if (req->response && (req->declared_len || req->chunked) && httpd_answer_now(req))
            return httpd_queue(req);
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t len = *upload_data_size;

        *upload_data_size = 0;
        if (req->status || req->too_large)
            return httpd_discard(req, len);
        if (httpd_append_body(req, upload_data, len) < 0)
            return MHD_NO;
        return req->too_large ? httpd_discard(req, 0) : MHD_YES;
    }
    if (req->response) /* answered on the headers */
        return httpd_queue(req);
    if (req->status) /* already queued */
        return MHD_YES;
    httpd_dispatch(req);
    if (req->defer && !req->response) { /* httpd_req_defer_answer */
        size_t none = 0;

        return httpd_deferred_step(req, NULL, &none);
    }
    /* A detached request has no answer: MHD_NO makes libmicrohttpd close
     * its connection without a byte written (see httpd_req_detach). */
    return httpd_queue(req);
}

/* ---- deferred requests -------------------------------------------------- */

void httpd_req_defer(httpd_req *req, httpd_body_fn sink, httpd_done_fn done, void *ud)
{
    httpd_defer *d;

    if (req->defer)
        return;
    d = calloc(1, sizeof(*d));
    if (!d) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    pthread_mutex_init(&d->mu, NULL);
    d->sink = sink;
    d->done = done;
    d->ud = ud;
    req->defer = d;
}

int httpd_req_defer_answer(httpd_req *req, httpd_handler resumed, void *ud)
{
    if (req->defer || req->response || req->detached)
        return -1;
    httpd_req_defer(req, NULL, NULL, NULL);
    if (!req->defer)
        return -1; /* answered with a 500 */
    req->defer->resumed = resumed;
    req->defer->resumed_ud = ud;
    return 0;
}

void httpd_req_resume(httpd_req *req)
{
    httpd_defer *d = req->defer;

    pthread_mutex_lock(&d->mu);
    if (req->response)
        d->answered = 1;
    d->kicked = 1;
    if (d->suspended) {
        d->suspended = 0;
        MHD_resume_connection(req->conn);
    } else {
        d->woken = 1;
    }
    pthread_mutex_unlock(&d->mu);
}

/* Suspends unless a wake-up came since the last step (it would be lost). */
static void httpd_defer_wait(httpd_req *req, httpd_defer *d)
{
    if (d->woken) {
        d->woken = 0;
        return;
    }
    d->suspended = 1;
    MHD_suspend_connection(req->conn);
}

/* One access-handler call of a deferred request: body pieces go to the
 * sink (a piece it does not take suspends the connection until resumed),
 * and once the body is in, the answer is queued as soon as it is set. */
static enum MHD_Result httpd_deferred_step(httpd_req *req, const char *data, size_t *len)
{
    httpd_defer *d = req->defer;
    int answered, kicked;

    if (*len) {
        size_t took = d->sink && !d->body_done ? d->sink(req, data, *len, d->ud) : *len;

        if (took == HTTPD_BODY_ABORT)
            return MHD_NO;
        if (took > *len)
            took = *len;
        *len -= took;
        if (*len) {
            pthread_mutex_lock(&d->mu);
            httpd_defer_wait(req, d);
            pthread_mutex_unlock(&d->mu);
        }
        return MHD_YES;
    }
    if (!d->body_done) {
        d->body_done = 1;
        if (d->sink)
            d->sink(req, NULL, 0, d->ud);
    }
    pthread_mutex_lock(&d->mu);
    answered = d->answered;
    kicked = d->resumed && d->kicked && !answered;
    if (kicked) {
        d->kicked = 0;
        d->woken = 0; /* this wake-up is being served now */
    } else if (!answered) {
        httpd_defer_wait(req, d);
    }
    pthread_mutex_unlock(&d->mu);
    if (kicked) {
        /* The route's second half, on this (the connection's) thread. */
        d->resumed(req, d->resumed_ud);
        if (req->detached)
            return MHD_NO; /* see httpd_req_detach */
        if (!req->response)
            httpd_respond_error(req, 500, "internal", "handler did not answer", NULL);
        return httpd_queue(req);
    }
    if (answered)
        return httpd_queue(req);
    return MHD_YES;
}

/* One request's metrics and access-log line: libmicrohttpd's completion
 * callback and requests served outside it (httpd_account) both end here. */
static void account(httpd *srv, int midx, const char *path, int status, double secs, const char *request_id,
                    const char *remote, int aborted)
{
    metrics_counter_inc(httpd_counter(srv, midx, status ? status : 499));
    metrics_histogram_observe(srv->latency, secs);
    if (srv->opts.access_log && log_enabled(LOG_INFO)) {
        char epath[512], eid[160];

        log_event(LOG_INFO, "request",
                  "\"method\":\"%s\",\"path\":\"%s\",\"status\":%d,\"duration_ms\":%.3f,\"request_id\":\"%s\","
                  "\"remote\":\"%s\"%s",
                  method_names[midx], log_escape(epath, sizeof(epath), path), status, secs * 1000.0,
                  log_escape(eid, sizeof(eid), request_id), remote, aborted ? ",\"aborted\":true" : "");
    }
}

static void httpd_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                            enum MHD_RequestTerminationCode toe)
{
    httpd *srv = cls;
    httpd_req *req = *req_cls;
    struct timespec now;
    double secs;

    if (!req)
        return;
    httpd_conn_idle(srv, conn);
    if (!req->srv) {
        free(req);
        *req_cls = NULL;
        return;
    }
    if (req->defer) {
        if (req->defer->done)
            req->defer->done(req, req->defer->ud);
        pthread_mutex_destroy(&req->defer->mu);
        free(req->defer);
    }
    if (req->loop) {
        httpd_conn *c = httpd_conn_of(conn);

        if (c && req->chunked)
            c->unknown = 1;
        else if (c)
            c->consumed += req->head_size + req->declared_len;
    }
    if (req->handed)
        goto release; /* the taker accounts it (httpd_account) */
    clock_gettime(CLOCK_MONOTONIC, &now);
    secs = (double)(now.tv_sec - req->start.tv_sec) + (double)(now.tv_nsec - req->start.tv_nsec) / 1e9;
    account(srv, req->method_idx, req->path, req->status, secs, req->request_id, httpd_req_remote(req),
            !(toe == MHD_REQUEST_TERMINATED_COMPLETED_OK || req->detached));
release:
    if (req->response)
        MHD_destroy_response(req->response);
    for (int i = 0; i < req->nheaders; i++)
        free(req->header_values[i]);
    if (req->ctx && req->ctx_free)
        req->ctx_free(req->ctx);
    free(req->param_buf);
    free(req->body);
    free(req);
    *req_cls = NULL;
}

void httpd_account(httpd *srv, const char *method, const char *path, int status, double secs, const char *request_id,
                   const char *remote, int aborted)
{
    account(srv, httpd_method_index(method), path, status, secs, request_id, remote, aborted);
}

void httpd_date(char *out, size_t len)
{
    httpd_http_date(out, len);
}

static void httpd_metrics_handler(httpd_req *req, void *ud)
{
    httpd *srv = ud;
    char *text = NULL;
    size_t len = 0;

    if (metrics_render(srv->reg, &text, &len) < 0) {
        httpd_respond_error(req, 500, "internal", "cannot render metrics", NULL);
        return;
    }
    httpd_respond_take(req, 200, METRICS_CONTENT_TYPE, text, len);
}

int httpd_route_metrics(httpd *srv)
{
    return httpd_route(srv, "GET", "/metrics", httpd_metrics_handler, srv);
}

/* ---- lifecycle ---------------------------------------------------------- */

httpd *httpd_new(const httpd_opts *opts, char *err, size_t errlen)
{
    httpd *srv;

    if (!opts || opts->port < 0 || opts->port > 65535) {
        snprintf(err, errlen, "invalid port");
        return NULL;
    }
    srv = calloc(1, sizeof(*srv));
    if (!srv) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    srv->opts = *opts;
    snprintf(srv->service, sizeof(srv->service), "%s", opts->service ? opts->service : "ae");
    snprintf(srv->host, sizeof(srv->host), "%s", opts->host ? opts->host : "");
    snprintf(srv->cors, sizeof(srv->cors), "%s", opts->cors_origins ? opts->cors_origins : "");
    srv->opts.service = srv->service;
    srv->opts.host = srv->host;
    srv->opts.cors_origins = srv->cors;
    if (srv->opts.max_body == 0)
        srv->opts.max_body = HTTPD_DEFAULT_BODY;
    if (srv->opts.connection_timeout_s <= 0)
        srv->opts.connection_timeout_s = 60;
    if (srv->opts.max_connections <= 0)
        srv->opts.max_connections = 10000;
    if (srv->opts.header_timeout_ms == 0)
        srv->opts.header_timeout_ms = HTTPD_DEFAULT_HEADER_TIMEOUT_MS;
    if (srv->opts.max_connections_per_ip < 0)
        srv->opts.max_connections_per_ip = 0;
    pthread_mutex_init(&srv->conns_mu, NULL);
    pthread_cond_init(&srv->reaper_cv, NULL);
    if (srv->opts.threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        srv->opts.threads = n > 0 ? (int)n : 1;
    }
    srv->reg = opts->metrics ? opts->metrics : metrics_default();
    srv->latency = metrics_histogram_get(srv->reg, "http_request_duration_seconds",
                                         "Time from request start to response queued.", NULL,
                                         metrics_latency_buckets, metrics_latency_nbuckets);
    srv->header_timeouts = metrics_counter_get(srv->reg, "http_header_timeouts_total",
                                               "Connections closed because a request's headers took too long.", NULL);
    httpd_timeout_response(srv);
    return srv;
}

static int httpd_bind_addr(const httpd *srv, struct sockaddr_storage *ss, char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL;
    char port[16];
    int rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    snprintf(port, sizeof(port), "%d", srv->opts.port);
    rc = getaddrinfo(srv->host[0] ? srv->host : NULL, port, &hints, &res);
    if (rc != 0 || !res) {
        snprintf(err, errlen, "cannot resolve bind address %s: %s", srv->host, gai_strerror(rc));
        return -1;
    }
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    return 0;
}

/* ---- loop mode ---------------------------------------------------------- */

/* One thread per loop: an epoll set holding its own libmicrohttpd daemon
 * (external polling, all daemons on one port with SO_REUSEPORT) and
 * whatever the hooks add (the proxy's libcurl sockets), so that a request
 * and the work it waits on stay on one thread. */
static void *httpd_loop_main(void *arg)
{
    httpd_loop *l = arg;
    httpd *srv = l->srv;
    struct epoll_event evs[64];

    httpd_cur_loop = l;
    if (srv->lhooks.init)
        l->app = srv->lhooks.init(l, srv->lhooks.ud);
    while (!atomic_load(&srv->loops_stop)) {
        MHD_UNSIGNED_LONG_LONG to = 0;
        int t = 1000, n, run = 0;

        if (MHD_get_timeout(l->daemon, &to) == MHD_YES && to < (MHD_UNSIGNED_LONG_LONG)t)
            t = (int)to;
        if (srv->lhooks.timeout)
            t = srv->lhooks.timeout(l->app, t);
        n = epoll_wait(l->ep, evs, 64, t);
        if (n <= 0)
            run = 1;
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == HTTPD_TAG_MHD) {
                run = 1;
            } else if (evs[i].data.u64 == HTTPD_TAG_WAKE) {
                uint64_t v;

                if (read(l->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                    log_warn("httpd: loop wake-up: %s", strerror(errno));
            } else if (srv->lhooks.event) {
                srv->lhooks.event(l->app, &evs[i]);
            }
        }
        if (run)
            MHD_run(l->daemon);
        /* A connection the tick resumed is served by another run now:
         * libmicrohttpd does not wake its own epoll set for a resume made
         * from its own thread. */
        if (srv->lhooks.tick && srv->lhooks.tick(l->app))
            MHD_run(l->daemon);
    }
    if (srv->lhooks.fini)
        srv->lhooks.fini(l->app);
    return NULL;
}

static int httpd_start_loops(httpd *srv, struct sockaddr_storage *ss, unsigned int flags, char *err, size_t errlen)
{
    int n = srv->opts.loops;
    unsigned int per = (unsigned int)(srv->opts.max_connections + n - 1) / (unsigned int)n;
    /* Connections of one address spread over the loops (the kernel hashes
     * each connection's ports), so each daemon takes its share. */
    unsigned int per_ip = srv->opts.max_connections_per_ip
                              ? (unsigned int)(srv->opts.max_connections_per_ip + n - 1) / (unsigned int)n
                              : 0;

    srv->loops = calloc((size_t)n, sizeof(*srv->loops));
    if (!srv->loops) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    srv->nloops = n;
    for (int i = 0; i < n; i++) {
        httpd_loop *l = &srv->loops[i];
        const union MHD_DaemonInfo *info;
        struct epoll_event ev;

        l->srv = srv;
        l->idx = i;
        l->ep = epoll_create1(EPOLL_CLOEXEC);
        l->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        l->daemon = MHD_start_daemon(
            flags, (uint16_t)srv->opts.port, httpd_accept_policy, l, httpd_access, srv, MHD_OPTION_SOCK_ADDR,
            (struct sockaddr *)ss, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)srv->opts.connection_timeout_s,
            MHD_OPTION_CONNECTION_LIMIT, per, MHD_OPTION_NOTIFY_COMPLETED, httpd_completed, srv,
            MHD_OPTION_NOTIFY_CONNECTION, httpd_notify_conn, srv, MHD_OPTION_URI_LOG_CALLBACK, httpd_uri_log, srv,
            MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_ip, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
            srv->opts.conn_memory ? srv->opts.conn_memory : (size_t)HTTPD_CONN_MEMORY,
            MHD_OPTION_LISTENING_ADDRESS_REUSE, 1U, MHD_OPTION_END);
        if (l->ep < 0 || l->evfd < 0 || !l->daemon) {
            snprintf(err, errlen, "cannot listen on %s:%d: %s", srv->host[0] ? srv->host : "*", srv->opts.port,
                     strerror(errno));
            return -1;
        }
        info = MHD_get_daemon_info(l->daemon, MHD_DAEMON_INFO_BIND_PORT);
        if (i == 0) {
            srv->port = info ? info->port : srv->opts.port;
            /* Port 0: the others join the port the first one got. */
            if (ss->ss_family == AF_INET6)
                ((struct sockaddr_in6 *)(void *)ss)->sin6_port = htons((uint16_t)srv->port);
            else
                ((struct sockaddr_in *)(void *)ss)->sin_port = htons((uint16_t)srv->port);
        }
        if (i == 0)
            srv->daemon = l->daemon;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.u64 = HTTPD_TAG_WAKE;
        epoll_ctl(l->ep, EPOLL_CTL_ADD, l->evfd, &ev);
        info = MHD_get_daemon_info(l->daemon, MHD_DAEMON_INFO_EPOLL_FD);
        ev.data.u64 = HTTPD_TAG_MHD;
        if (!info || epoll_ctl(l->ep, EPOLL_CTL_ADD, info->epoll_fd, &ev) < 0) {
            snprintf(err, errlen, "cannot watch libmicrohttpd's epoll set");
            return -1;
        }
    }
    for (int i = 0; i < n; i++) {
        if (pthread_create(&srv->loops[i].thread, NULL, httpd_loop_main, &srv->loops[i]) != 0) {
            snprintf(err, errlen, "cannot start the HTTP loops");
            return -1;
        }
        srv->loops[i].started = 1;
    }
    return 0;
}

static void httpd_stop_loops(httpd *srv, int grace_ms)
{
    for (int i = 0; i < srv->nloops; i++)
        if (srv->loops[i].daemon)
            MHD_quiesce_daemon(srv->loops[i].daemon);
    for (int waited = 0; waited < grace_ms; waited += 20) {
        unsigned int conns = 0;

        for (int i = 0; i < srv->nloops; i++) {
            const union MHD_DaemonInfo *info =
                srv->loops[i].daemon ? MHD_get_daemon_info(srv->loops[i].daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS)
                                     : NULL;
            conns += info ? info->num_connections : 0;
        }
        if (conns == 0)
            break;
        usleep(20 * 1000);
    }
    atomic_store(&srv->loops_stop, 1);
    for (int i = 0; i < srv->nloops; i++) {
        httpd_loop *l = &srv->loops[i];
        uint64_t one = 1;

        if (l->started) {
            if (write(l->evfd, &one, sizeof(one)) < 0)
                log_warn("httpd: cannot wake a loop: %s", strerror(errno));
            pthread_join(l->thread, NULL);
            l->started = 0;
        }
        if (l->daemon)
            MHD_stop_daemon(l->daemon);
        l->daemon = NULL;
        for (int b = 0; b < HTTPD_IP_BUCKETS; b++)
            while (l->ips[b]) {
                httpd_ipcount *next = l->ips[b]->next;

                free(l->ips[b]);
                l->ips[b] = next;
            }
        if (l->ep >= 0)
            close(l->ep);
        if (l->evfd >= 0)
            close(l->evfd);
        l->ep = l->evfd = -1;
    }
    srv->daemon = NULL;
    free(srv->loops);
    srv->loops = NULL;
    srv->nloops = 0;
}

void httpd_set_loop_hooks(httpd *srv, const httpd_loop_hooks *hooks)
{
    srv->lhooks = *hooks;
}

int httpd_loops(const httpd *srv)
{
    return srv->opts.loops;
}

int httpd_loop_epoll(const httpd_loop *l)
{
    return l->ep;
}

int httpd_loop_index(const httpd_loop *l)
{
    return l->idx;
}

httpd_loop *httpd_req_loop(const httpd_req *req)
{
    return req->loop;
}

int httpd_start(httpd *srv, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    /* Suspend/resume lets a request wait on another event loop (the proxy's
     * transfers) without holding a thread; SSE streams leave it (httpd_req_detach). */
    /* MHD_USE_TURBO also keeps libmicrohttpd from shutting a socket down when
     * it closes a connection, which httpd_req_detach relies on. */
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_TURBO | MHD_ALLOW_SUSPEND_RESUME;
    const union MHD_DaemonInfo *info;

    if (httpd_bind_addr(srv, &ss, err, errlen) < 0)
        return -1;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    if (srv->opts.loops > 0) {
        if (httpd_start_loops(srv, &ss, (flags & ~(unsigned)MHD_USE_INTERNAL_POLLING_THREAD) | MHD_USE_ITC, err,
                              errlen) < 0)
            return -1;
        goto started;
    }
    /* Without the reuse option MHD sets SO_REUSEADDR, so a restarted service
     * binds at once; passing 0 would turn that off. SO_REUSEPORT is opt-in
     * because it lets a second process silently share the port. */
    srv->daemon = MHD_start_daemon(
        flags, (uint16_t)srv->opts.port, NULL, NULL, httpd_access, srv, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)srv->opts.threads, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)srv->opts.connection_timeout_s, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned int)srv->opts.max_connections, MHD_OPTION_NOTIFY_COMPLETED, httpd_completed, srv,
        MHD_OPTION_NOTIFY_CONNECTION, httpd_notify_conn, srv, MHD_OPTION_URI_LOG_CALLBACK, httpd_uri_log, srv,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned int)srv->opts.max_connections_per_ip,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT,
        srv->opts.conn_memory ? srv->opts.conn_memory : (size_t)HTTPD_CONN_MEMORY,
        srv->opts.reuse_port ? MHD_OPTION_LISTENING_ADDRESS_REUSE : MHD_OPTION_END, 1U, MHD_OPTION_END);
    if (!srv->daemon) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", srv->host[0] ? srv->host : "*", srv->opts.port,
                 strerror(errno));
        return -1;
    }
    info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : srv->opts.port;
started:
    if (srv->opts.header_timeout_ms > 0) {
        srv->reaper_stop = 0;
        if (pthread_create(&srv->reaper, NULL, httpd_reaper, srv) != 0) {
            snprintf(err, errlen, "cannot start the header-deadline thread");
            httpd_stop(srv, 0);
            return -1;
        }
        srv->reaper_running = 1;
    }
    return 0;
}

int httpd_port(const httpd *srv)
{
    return srv->port;
}

void httpd_stop(httpd *srv, int grace_ms)
{
    if (srv && srv->nloops) {
        httpd_stop_loops(srv, grace_ms);
        httpd_reaper_stop(srv);
        return;
    }
    if (!srv || !srv->daemon)
        return;
    MHD_quiesce_daemon(srv->daemon);
    for (int waited = 0; waited < grace_ms; waited += 20) {
        const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        if (!info || info->num_connections == 0)
            break;
        usleep(20 * 1000);
    }
    MHD_stop_daemon(srv->daemon);
    srv->daemon = NULL;
    httpd_reaper_stop(srv);
}

void httpd_set_hook(httpd *srv, httpd_hook fn, void *ud)
{
    srv->hook = fn;
    srv->hook_ud = ud;
}

void httpd_set_stream_hooks(httpd *srv, httpd_hook claims, httpd_hook take, void *ud)
{
    srv->claims = claims;
    srv->take = take;
    srv->stream_ud = ud;
}

void httpd_set_fallback(httpd *srv, httpd_handler fn, void *ud)
{
    srv->fallback = fn;
    srv->fallback_ud = ud;
}

void httpd_free(httpd *srv)
{
    if (!srv)
        return;
    httpd_stop(srv, 0);
    for (int i = 0; i < srv->nroutes; i++)
        httpd_route_clear(&srv->routes[i]);
    /* MHD reports every connection closed when it stops; this is only in
     * case one was not. */
    while (srv->conns) {
        httpd_conn *next = srv->conns->next;

        free(srv->conns);
        srv->conns = next;
    }
    pthread_cond_destroy(&srv->reaper_cv);
    pthread_mutex_destroy(&srv->conns_mu);
    free(srv);
}
