/* httpd: the HTTP server every service uses, over libmicrohttpd.
 *
 * It owns what SPEC calls the common HTTP behaviour: routing with path
 * parameters and 404/405, a bounded request body (413 before the body is
 * read when Content-Length is too large), X-Request-Id on every response,
 * the JSON error body, CORS, one access-log line per request and request
 * metrics.
 *
 * Handlers run on the server's worker threads (MHD's thread pool), so they
 * may block on the database; each request is handled by one thread. A
 * handler must answer exactly once, synchronously, with one of the
 * httpd_respond_* calls; a handler that does not answer gets a 500.
 *
 * A request that waits on something else (an upstream, an event) does not
 * hold a thread: a stream hook takes it when its headers are in, defers it
 * (httpd_req_defer: the body goes to a sink as it arrives, the connection
 * is suspended while nothing can move) and another thread answers it later
 * and calls httpd_req_resume. Streamed answers are httpstream's. */
#ifndef AE_HTTPD_H
#define AE_HTTPD_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "metrics.h"

typedef struct httpd httpd;
typedef struct httpd_req httpd_req;
typedef struct httpd_loop httpd_loop;

typedef void (*httpd_handler)(httpd_req *req, void *ud);

/* A piece of a deferred request's body (len 0 once, at its end). Runs on
 * the connection's MHD thread. Returns how many bytes it took; the rest is
 * offered again after httpd_req_resume (or HTTPD_BODY_ABORT). */
typedef size_t (*httpd_body_fn)(httpd_req *req, const char *data, size_t len, void *ud);
/* What a body sink returns to have the connection closed at once (a body
 * that goes on too long after its request was refused). */
#define HTTPD_BODY_ABORT ((size_t)-1)

/* The request is over (answered and sent, or the client went away); the
 * request must not be used after it returns. Runs on the MHD thread. */
typedef void (*httpd_done_fn)(httpd_req *req, void *ud);

/* One request header. */
typedef void (*httpd_header_fn)(void *ud, const char *name, const char *value);

struct MHD_Connection;
struct MHD_Response;

/* Called once the headers are in, before any of the body is read and
 * before routing; returns nonzero when it answered the request itself
 * (rate limiting, authentication of a whole prefix). A request answered
 * there never has its body stored: a small declared body is read and
 * thrown away so that the client sees the answer, a larger or chunked one
 * is not read and the connection is closed after the answer. Only the
 * headers, method, path, query and remote address may be used; the body is
 * not there yet. */
typedef int (*httpd_hook)(httpd_req *req, void *ud);

typedef struct {
    const char *service;      /* for logs and metrics labels */
    const char *host;         /* bind address; NULL or "" means every address */
    int port;                 /* 0 picks a free port (see httpd_port) */
    int threads;              /* worker threads; <= 0 means the number of CPUs */
    size_t max_body;          /* bytes; 0 means 1 MiB */
    int connection_timeout_s; /* idle keep-alive connections are closed after it; 0 means 60 */
    /* The whole headers of a request must arrive within this many ms of the
     * connection opening (or of the previous request's end plus the idle
     * time); else the connection is closed (slow-loris). 0 means 10 s, < 0
     * turns it off. */
    int header_timeout_ms;
    int max_connections;        /* 0 means 10000 */
    int max_connections_per_ip; /* more from one address are refused at once; 0 means no limit */
    const char *cors_origins; /* comma list (see httpd_cors_match); NULL disables CORS */
    metrics *metrics;         /* NULL means metrics_default() */
    int access_log;           /* nonzero logs one line per request at info level */
    int reuse_port;           /* SO_REUSEPORT: several processes serve one port */
    /* libmicrohttpd's memory pool per connection (request headers, the
     * answer's headers); 0 means 16 KiB. Held as long as the connection:
     * a server of many idle streams (SSE) may want it smaller, at the cost
     * of the largest request headers it accepts (about half of it). */
    size_t conn_memory;
    /* 0: libmicrohttpd's own thread pool (`threads`). N > 0: N threads of
     * our own, each running an epoll set with one libmicrohttpd daemon
     * (all on the port, SO_REUSEPORT) and what the loop hooks add, so a
     * request and the transfers it waits on share one thread. The
     * connection limits are shared out among the loops. */
    int loops;
} httpd_opts;

/* Creates a server (not listening yet). Returns NULL on bad options or
 * OOM, with the reason in err. Free with httpd_free(). */
httpd *httpd_new(const httpd_opts *opts, char *err, size_t errlen);

/* Stops (if running) and frees. NULL is a no-op. */
void httpd_free(httpd *srv);

/* Registers a route before httpd_start. `method` is GET, POST, PUT, PATCH,
 * DELETE or OPTIONS (HEAD is served by GET routes). `pattern` is a path
 * with `{name}` segments, e.g. "/api/v1/triggers/{id}", and optionally a
 * last `{name...}` segment that takes the rest of the path. Returns 0 or
 * -1 when the table is full or the pattern is malformed. */
int httpd_route(httpd *srv, const char *method, const char *pattern, httpd_handler fn, void *ud);

void httpd_set_hook(httpd *srv, httpd_hook fn, void *ud);

/* Streamed requests (the proxy's). Once a request's headers are in,
 * `claims` says (nonzero) whether it is one: then the server's body limit
 * does not apply to it, and after the preflight and the hook (which may
 * still answer it), `take` must either answer it or call httpd_req_defer.
 * Both run on the MHD thread; `claims` must not answer. */
void httpd_set_stream_hooks(httpd *srv, httpd_hook claims, httpd_hook take, void *ud);

/* Loop mode (opts.loops > 0). Each hook runs on the loop's thread: init
 * once when it starts (returns the loop's state, `app`), event for each
 * epoll event of a descriptor the application added to the loop's set
 * (data.u64 values with bit 62 set are the server's own), timeout to lower
 * the wait (ms; gets the server's, returns the one to use), tick after each
 * turn (returns nonzero when it did work that may have resumed a
 * connection), fini when the loop ends. Set before httpd_start. */
struct epoll_event;
typedef struct {
    void *(*init)(httpd_loop *l, void *ud);
    void (*event)(void *app, const struct epoll_event *ev);
    int (*timeout)(void *app, int ms);
    int (*tick)(void *app);
    void (*fini)(void *app);
    void *ud;
} httpd_loop_hooks;
void httpd_set_loop_hooks(httpd *srv, const httpd_loop_hooks *hooks);
/* The number of loops (0: not loop mode), a loop's epoll set and index,
 * and the loop a request runs on (NULL when not loop mode). */
int httpd_loops(const httpd *srv);
int httpd_loop_epoll(const httpd_loop *l);
int httpd_loop_index(const httpd_loop *l);
httpd_loop *httpd_req_loop(const httpd_req *req);

/* Answers requests whose path matches no route (instead of the 404). */
void httpd_set_fallback(httpd *srv, httpd_handler fn, void *ud);

/* Registers GET /metrics, answered from the server's registry. */
int httpd_route_metrics(httpd *srv);

/* Starts listening. Returns 0, or -1 with the reason in err. */
int httpd_start(httpd *srv, char *err, size_t errlen);

/* The port actually bound (useful with port 0). */
int httpd_port(const httpd *srv);

/* Stops accepting, lets in-flight requests finish for up to grace_ms, then
 * closes everything. */
void httpd_stop(httpd *srv, int grace_ms);

/* --- Requests. Strings returned stay valid until the request completes. */
const char *httpd_req_method(const httpd_req *req);
const char *httpd_req_path(const httpd_req *req);
const char *httpd_req_id(const httpd_req *req);
const char *httpd_req_remote(httpd_req *req);
/* A path parameter captured by the route, or NULL. */
const char *httpd_req_param(const httpd_req *req, const char *name);
/* A query-string argument (decoded), or NULL. */
const char *httpd_req_query(const httpd_req *req, const char *name);
/* A request header (case-insensitive name), or NULL. */
const char *httpd_req_header(const httpd_req *req, const char *name);
/* The request body (NUL-terminated for convenience) and its length. */
const char *httpd_req_body(const httpd_req *req, size_t *len);
/* Parses the body as JSON. On success *out is owned by the caller
 * (cJSON_Delete). On failure the request has been answered with 400 naming
 * the position (or the emptiness) and -1 is returned. */
int httpd_req_json(httpd_req *req, cJSON **out);

/* Lowers this request's body limit below the server's (from the hook: a
 * route that takes small bodies, e.g. before the client is authenticated).
 * 0 or more than the server's limit keeps the server's. */
void httpd_req_set_max_body(httpd_req *req, size_t max);

/* Attaches one pointer to the request (e.g. what the hook learnt about the
 * client); `free_fn` (may be NULL) is called on it when the request ends or
 * is given another. */
void httpd_req_set_ctx(httpd_req *req, void *ctx, void (*free_fn)(void *));
void *httpd_req_ctx(const httpd_req *req);

/* The request target as the client sent it (path not decoded, with the
 * query string). */
const char *httpd_req_target(const httpd_req *req);
/* Nonzero for an HTTP/1.0 request. */
int httpd_req_http10(const httpd_req *req);
/* Calls fn for every request header, in the order received. */
void httpd_req_each_header(const httpd_req *req, httpd_header_fn fn, void *ud);
/* Idle timeout of this connection (0: none); from the MHD thread only. */
void httpd_req_set_timeout(httpd_req *req, unsigned int seconds);

/* --- Deferred requests (see the top). From the stream hook only: the
 * request's body goes to `sink` (NULL throws it away) and its answer comes
 * later, from any thread: one httpd_respond_* call (or
 * httpd_req_set_response) followed by httpd_req_resume. `done` (may be
 * NULL) runs when the request is over; until then the request stays valid,
 * and it stays valid at least until the answer is resumed. */
void httpd_req_defer(httpd_req *req, httpd_body_fn sink, httpd_done_fn done, void *ud);
/* The same from a route handler (the request complete), for an answer
 * that waits on another thread (SSE's connect script, pipelined with
 * others'): the handler returns without answering, and once any thread
 * calls httpd_req_resume, `resumed` runs on the connection's thread and
 * answers there, with httpd_respond_* or httpd_req_detach (once). Until
 * then the connection is suspended and the request stays valid. Returns
 * 0, or -1 when it cannot (answered already, or answered now with a 500:
 * out of memory). */
int httpd_req_defer_answer(httpd_req *req, httpd_handler resumed, void *ud);
/* Wakes a deferred request: a sink that refused bytes is offered them
 * again, and a set answer is queued. Any thread; after the call that
 * resumes an answer the caller must not touch the request again. */
void httpd_req_resume(httpd_req *req);

/* For httpstream: the MHD connection, and setting a ready MHD response
 * (ownership taken; ignored, and destroyed, when one is set already). */
struct MHD_Connection *httpd_req_connection(const httpd_req *req);
void httpd_req_set_response(httpd_req *req, int status, struct MHD_Response *resp);

/* Takes the connection's socket away from the server, for an answer the
 * caller writes itself for as long as it likes (SSE streams: one write per
 * event, no libmicrohttpd connection, pool or suspend/resume behind each).
 * From a route handler only (the request complete, not answered, not
 * deferred) or from httpd_req_defer_answer's `resumed`. Appends to `head` what must be written first: the status
 * line, Date, Content-Type, X-Request-Id, the headers added with
 * httpd_req_add_header, CORS, and either "Transfer-Encoding: chunked"
 * (*chunked set: the body must be sent as chunks) or, for an HTTP/1.0
 * client, "Connection: close" (the body runs to the close). Returns the
 * descriptor (nonblocking, close-on-exec, TCP_NODELAY; the caller's to
 * close), after which the handler returns without answering: the server
 * forgets the connection without writing to it. -1 when it cannot (the
 * request is then still the handler's to answer). The request counts as
 * answered with `status`. */
struct buf;
int httpd_req_detach(httpd_req *req, int status, const char *content_type, struct buf *head, int *chunked);

/* --- A keep-alive front of the caller's own (loop mode: the proxy serves
 * a kept-alive connection's bodiless requests itself, without
 * libmicrohttpd's per-request costs). */

/* Takes the connection's socket for good, nothing written, from the stream
 * hook (`take`): the request is neither answered nor counted here (the
 * taker answers it on the socket and calls httpd_account). Only for a
 * bodiless request when libmicrohttpd holds no byte of the connection
 * beyond its head (checked against the kernel's count of bytes received),
 * so nothing pipelined behind it is lost. Returns the descriptor
 * (nonblocking, close-on-exec, TCP_NODELAY) and the client's address, or
 * -1 (the request is still the hook's). The caller holds the connection
 * against the limits with httpd_loop_conn_hold. */
struct sockaddr;
struct sockaddr_storage;
int httpd_req_take_socket(httpd_req *req, struct sockaddr_storage *addr, unsigned int *alen);
/* A connection held outside libmicrohttpd counts against the connection
 * and per-address limits of its loop until released. Loop thread only. */
int httpd_loop_conn_hold(httpd_loop *l, const struct sockaddr *addr);
void httpd_loop_conn_release(httpd_loop *l, const struct sockaddr *addr);
/* Gives a socket (its unread bytes) to the loop's libmicrohttpd as a new
 * connection from `addr` (release the hold first). Loop thread only.
 * Returns 0, or -1 with the socket closed. */
int httpd_loop_add_connection(httpd_loop *l, int fd, const struct sockaddr *addr, unsigned int alen);
httpd *httpd_loop_server(httpd_loop *l);
/* The idle keep-alive timeout (s). */
int httpd_idle_timeout_s(const httpd *srv);
/* Counts a request answered outside libmicrohttpd in the request metrics
 * and the access log, as httpd does its own. */
void httpd_account(httpd *srv, const char *method, const char *path, int status, double secs, const char *request_id,
                   const char *remote, int aborted);
/* The current IMF-fixdate (RFC 9110 5.6.7). */
void httpd_date(char *out, size_t len);

/* Adds a header to the response to come (copied). Up to 16 per request. */
int httpd_req_add_header(httpd_req *req, const char *name, const char *value);

/* --- Answers. Each request is answered once; later calls are ignored. */

/* Serialises `body` (ownership taken, NULL sends "null"). */
void httpd_respond_json(httpd_req *req, int status, cJSON *body);
/* Sends `len` bytes copied from `body`. */
void httpd_respond_bytes(httpd_req *req, int status, const char *content_type, const char *body, size_t len);
/* Sends `body` without copying; it must outlive the server (string literals). */
void httpd_respond_static(httpd_req *req, int status, const char *content_type, const char *body, size_t len);
/* Sends a malloc'd buffer; ownership taken (freed with free()). */
void httpd_respond_take(httpd_req *req, int status, const char *content_type, char *body, size_t len);
/* The common error body {"error","message","details"?,"request_id"}. `code`
 * NULL derives it from the status. `details` ownership taken (may be NULL). */
void httpd_respond_error(httpd_req *req, int status, const char *code, const char *message, cJSON *details);
/* printf-style message variant of httpd_respond_error without details. */
void httpd_respond_errorf(httpd_req *req, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* CORS: how an Origin fares against a comma list of allowed origins. An
 * entry is an exact origin ("https://app.example.com"), a prefix with a
 * trailing '*' that matches only a port or nothing ("http://localhost*"
 * admits "http://localhost" and "http://localhost:3000", never
 * "http://localhost.evil.com"), or "*" alone: every origin, answered with
 * "Access-Control-Allow-Origin: *" and without credentials. An exact or
 * prefix match wins over "*". */
enum { HTTPD_CORS_NO = 0, HTTPD_CORS_CREDENTIALS = 1, HTTPD_CORS_ANY = 2 };
int httpd_cors_match(const char *list, const char *origin);

/* The common error body as a new object (the caller's, cJSON_Delete), for
 * servers other than httpd (wsapp). `details` ownership taken. NULL on
 * OOM. */
cJSON *httpd_error_body(int status, const char *code, const char *message, cJSON *details, const char *request_id);

/* Writes into `out` (outlen >= 33; 72 holds any sane id) the request id to
 * use: `given` (the client's X-Request-Id) when sane (1..64 of A-Z a-z 0-9
 * - _ . :), else 32 random hex digits. */
void httpd_request_id_make(const char *given, char *out, size_t outlen);

/* The error code SPEC uses for an HTTP status ("not_found" for 404...). */
const char *httpd_status_code(int status);

#endif
