#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "log.h"

#define HTTPD_MAX_ROUTES 128
#define HTTPD_MAX_SEGMENTS 16
#define HTTPD_MAX_PARAMS 8
#define HTTPD_MAX_HEADERS 16
#ifndef HTTPD_CONN_MEMORY
#define HTTPD_CONN_MEMORY 16384
#endif
#define HTTPD_DEFAULT_BODY (1024 * 1024)
#define HTTPD_BODY_CHUNK 4096

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

struct httpd {
    httpd_opts opts;
    char service[64];
    char host[256];
    char cors[1024];
    struct MHD_Daemon *daemon;
    int port;
    httpd_route_t routes[HTTPD_MAX_ROUTES];
    int nroutes;
    httpd_hook hook;
    void *hook_ud;
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
    unsigned long long declared_len;
    httpd_kv params[HTTPD_MAX_PARAMS];
    int nparams;
    char *param_buf;
    const char *header_names[HTTPD_MAX_HEADERS];
    char *header_values[HTTPD_MAX_HEADERS];
    int nheaders;
    struct MHD_Response *response;
    int status;
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
    const char *end = NULL;
    size_t pos, line = 1, col = 1;
    cJSON *json;

    *out = NULL;
    if (req->body_len == 0) {
        httpd_respond_error(req, 400, "invalid_request", "request body is empty: expected JSON", NULL);
        return -1;
    }
    json = cJSON_ParseWithLengthOpts(req->body, req->body_len, &end, 0);
    if (json) {
        *out = json;
        return 0;
    }
    pos = end && end >= req->body ? (size_t)(end - req->body) : 0;
    if (pos > req->body_len)
        pos = req->body_len;
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
    snprintf(msg, sizeof(msg), "malformed JSON at position %zu (line %zu, column %zu)", pos, line, col);
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

void httpd_respond_error(httpd_req *req, int status, const char *code, const char *message, cJSON *details)
{
    cJSON *body = cJSON_CreateObject();

    if (!body) {
        cJSON_Delete(details);
        httpd_respond_json(req, status, NULL);
        return;
    }
    cJSON_AddStringToObject(body, "error", code ? code : httpd_status_code(status));
    cJSON_AddStringToObject(body, "message", message ? message : "");
    if (details)
        cJSON_AddItemToObject(body, "details", details);
    cJSON_AddStringToObject(body, "request_id", req->request_id);
    httpd_respond_json(req, status, body);
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

static void httpd_make_request_id(httpd_req *req)
{
    const char *given = httpd_req_header(req, "X-Request-Id");

    if (given && httpd_request_id_sane(given)) {
        snprintf(req->request_id, sizeof(req->request_id), "%s", given);
        return;
    }
    /* 32 hex digits by hand: snprintf was a tenth of the health route. */
    for (int half = 0; half < 2; half++) {
        unsigned long long v = (unsigned long long)httpd_rand64();

        for (int i = 15; i >= 0; i--, v >>= 4)
            req->request_id[half * 16 + i] = "0123456789abcdef"[v & 15];
    }
    req->request_id[32] = '\0';
}

static int httpd_origin_allowed(const httpd *srv, const char *origin)
{
    const char *p = srv->cors;
    size_t olen = strlen(origin);

    if (!srv->cors[0])
        return 0;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);

        while (len && (*p == ' ')) {
            p++;
            len--;
        }
        while (len && p[len - 1] == ' ')
            len--;
        if (len == 1 && p[0] == '*')
            return 1;
        if (len && p[len - 1] == '*') {
            if (olen >= len - 1 && memcmp(origin, p, len - 1) == 0)
                return 1;
        } else if (len == olen && memcmp(origin, p, len) == 0) {
            return 1;
        }
        if (!end)
            break;
        p = end + 1;
    }
    return 0;
}

static void httpd_add_cors(httpd_req *req, struct MHD_Response *resp)
{
    const char *origin = httpd_req_header(req, "Origin");

    if (!origin || !httpd_origin_allowed(req->srv, origin))
        return;
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", origin);
    MHD_add_response_header(resp, "Access-Control-Allow-Credentials", "true");
    MHD_add_response_header(resp, "Access-Control-Expose-Headers", "X-Request-Id, Retry-After");
    MHD_add_response_header(resp, "Vary", "Origin");
}

/* Answers a CORS preflight; returns 1 when the request was one. */
static int httpd_preflight(httpd_req *req)
{
    const char *origin = httpd_req_header(req, "Origin");
    const char *want = httpd_req_header(req, "Access-Control-Request-Method");
    const char *hdrs = httpd_req_header(req, "Access-Control-Request-Headers");

    if (req->method_idx != M_OPTIONS || !origin || !want)
        return 0;
    if (!httpd_origin_allowed(req->srv, origin)) {
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

static void httpd_dispatch(httpd_req *req)
{
    httpd *srv = req->srv;
    int path_matched = 0, want = req->method_idx == M_HEAD ? M_GET : req->method_idx;
    char allow[128] = "";

    if (req->too_large) {
        httpd_respond_errorf(req, 413, "payload_too_large", "request body exceeds %zu bytes", srv->opts.max_body);
        return;
    }
    if (httpd_preflight(req))
        return;
    if (srv->hook && srv->hook(req, srv->hook_ud))
        return;
    for (int i = 0; i < srv->nroutes; i++) {
        const httpd_route_t *r = &srv->routes[i];

        if (!httpd_route_match(r, req->path, req))
            continue;
        if (r->method == want) {
            r->fn(req, r->ud);
            if (!req->response)
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

static httpd_req *httpd_req_new(httpd *srv, struct MHD_Connection *conn, const char *url, const char *method)
{
    httpd_req *req = calloc(1, sizeof(*req));
    const char *clen;

    if (!req)
        return NULL;
    req->srv = srv;
    req->conn = conn;
    req->method = method;
    req->method_idx = httpd_method_index(method);
    req->path = url;
    clock_gettime(CLOCK_MONOTONIC, &req->start);
    httpd_make_request_id(req);
    clen = httpd_req_header(req, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (clen) {
        char *end;
        unsigned long long n = strtoull(clen, &end, 10);
        if (*end == '\0' && n > srv->opts.max_body) {
            req->too_large = 1;
            req->declared_len = n;
        }
    }
    return req;
}

static int httpd_append_body(httpd_req *req, const char *data, size_t len)
{
    size_t max = req->srv->opts.max_body;

    if (req->too_large)
        return 0;
    if (req->body_len + len > max) {
        req->too_large = 1;
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

static enum MHD_Result httpd_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                    const char *version, const char *upload_data, size_t *upload_data_size,
                                    void **req_cls)
{
    httpd *srv = cls;
    httpd_req *req = *req_cls;

    (void)version;
    if (!req) {
        /* The first call only sets up: answering now makes MHD close the
         * connection after the response, which costs keep-alive. The one
         * exception is a body declared too large, which must not be read. */
        req = httpd_req_new(srv, conn, url, method);
        if (!req)
            return MHD_NO;
        *req_cls = req;
        if (req->too_large && req->declared_len > httpd_drain_max(srv)) {
            httpd_dispatch(req);
            return httpd_queue(req);
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (httpd_append_body(req, upload_data, *upload_data_size) < 0)
            return MHD_NO;
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (req->status)
        return MHD_YES;
    httpd_dispatch(req);
    return httpd_queue(req);
}

static void httpd_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                            enum MHD_RequestTerminationCode toe)
{
    httpd *srv = cls;
    httpd_req *req = *req_cls;
    struct timespec now;
    double secs;

    (void)conn;
    if (!req)
        return;
    clock_gettime(CLOCK_MONOTONIC, &now);
    secs = (double)(now.tv_sec - req->start.tv_sec) + (double)(now.tv_nsec - req->start.tv_nsec) / 1e9;
    metrics_counter_inc(httpd_counter(srv, req->method_idx, req->status ? req->status : 499));
    metrics_histogram_observe(srv->latency, secs);
    if (srv->opts.access_log && log_enabled(LOG_INFO)) {
        char epath[512], eid[160];
        log_event(LOG_INFO, "request",
                  "\"method\":\"%s\",\"path\":\"%s\",\"status\":%d,\"duration_ms\":%.3f,\"request_id\":\"%s\","
                  "\"remote\":\"%s\"%s",
                  method_names[req->method_idx], log_escape(epath, sizeof(epath), req->path), req->status,
                  secs * 1000.0, log_escape(eid, sizeof(eid), req->request_id), httpd_req_remote(req),
                  toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : ",\"aborted\":true");
    }
    if (req->response)
        MHD_destroy_response(req->response);
    for (int i = 0; i < req->nheaders; i++)
        free(req->header_values[i]);
    free(req->param_buf);
    free(req->body);
    free(req);
    *req_cls = NULL;
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
    if (srv->opts.threads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        srv->opts.threads = n > 0 ? (int)n : 1;
    }
    srv->reg = opts->metrics ? opts->metrics : metrics_default();
    srv->latency = metrics_histogram_get(srv->reg, "http_request_duration_seconds",
                                         "Time from request start to response queued.", NULL,
                                         metrics_latency_buckets, metrics_latency_nbuckets);
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

int httpd_start(httpd *srv, char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_TURBO;
    const union MHD_DaemonInfo *info;

    if (httpd_bind_addr(srv, &ss, err, errlen) < 0)
        return -1;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* Without the reuse option MHD sets SO_REUSEADDR, so a restarted service
     * binds at once; passing 0 would turn that off. SO_REUSEPORT is opt-in
     * because it lets a second process silently share the port. */
    srv->daemon = MHD_start_daemon(
        flags, (uint16_t)srv->opts.port, NULL, NULL, httpd_access, srv, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)srv->opts.threads, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)srv->opts.connection_timeout_s, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned int)srv->opts.max_connections, MHD_OPTION_NOTIFY_COMPLETED, httpd_completed, srv,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTPD_CONN_MEMORY,
        srv->opts.reuse_port ? MHD_OPTION_LISTENING_ADDRESS_REUSE : MHD_OPTION_END, 1U, MHD_OPTION_END);
    if (!srv->daemon) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", srv->host[0] ? srv->host : "*", srv->opts.port,
                 strerror(errno));
        return -1;
    }
    info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : srv->opts.port;
    return 0;
}

int httpd_port(const httpd *srv)
{
    return srv->port;
}

void httpd_stop(httpd *srv, int grace_ms)
{
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
}

void httpd_set_hook(httpd *srv, httpd_hook fn, void *ud)
{
    srv->hook = fn;
    srv->hook_ud = ud;
}

void httpd_free(httpd *srv)
{
    if (!srv)
        return;
    httpd_stop(srv, 0);
    for (int i = 0; i < srv->nroutes; i++)
        httpd_route_clear(&srv->routes[i]);
    free(srv);
}
