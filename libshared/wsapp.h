/* wsapp: one port serving HTTP and WebSocket, over libwebsockets 4.1.
 *
 * A wsapp owns a listening socket (SO_REUSEPORT on request, so several
 * processes share a port), one libwebsockets context and the thread that
 * services it. It gives HTTP what SPEC calls the common behaviour (routes
 * by method and path, a bounded request body with 413, the JSON error body,
 * X-Request-Id, one access-log line per request) and WebSocket routes with
 * an accept hook that runs before the upgrade, per-connection user data, a
 * bounded send queue per connection (a reader that falls behind is dropped,
 * never buffered without bound), pings, timers, and a thread-safe way to
 * run code on the loop.
 *
 * Threads. Every callback (HTTP handlers, WebSocket hooks, timers, posted
 * functions) runs on the loop thread, one at a time: application state that
 * only callbacks touch needs no lock. A callback must not block (no
 * database round trip): a handler that needs one defers its answer
 * (wsapp_req_defer), does the work elsewhere and answers later from the
 * loop through wsapp_post. Only wsapp_post, wsapp_stop, the wsapp_msg
 * reference counts and a stream's producer calls (wsapp_stream_begin,
 * _write, _end) may be used from other threads.
 *
 * Why a listener of our own: lws 4.1 sets SO_REUSEPORT only when it runs
 * several service threads, and it refuses a Sec-WebSocket-Protocol list
 * longer than 127 bytes or a name longer than 63 (a subprotocol carrying a
 * JWT is both). wsapp therefore accepts connections itself, reads the
 * request head (bounded by max_header), moves any Sec-WebSocket-Protocol
 * value into a private header that the accept hook reads
 * (wsapp_req_subprotocols) and hands the socket to lws with those bytes;
 * the accept hook picks the subprotocol to echo (wsapp_req_set_subprotocol).
 *
 * The loop is libev's (epoll), which lws 4.1 runs through its
 * libwebsockets-evlib-ev plugin: lws's own poll(2) loop walks every socket
 * on every turn, which costs too much at 10,000 connections. Timers are
 * libev timers. */
#ifndef AE_WSAPP_H
#define AE_WSAPP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <cjson/cJSON.h>

#include "metrics.h"

typedef struct wsapp wsapp;
typedef struct wsapp_req wsapp_req;   /* one HTTP request, or the handshake of a WebSocket */
typedef struct wsapp_conn wsapp_conn; /* one open WebSocket */
typedef struct wsapp_msg wsapp_msg;   /* an outgoing frame, shared by many connections */
typedef struct wsapp_timer wsapp_timer;

typedef struct {
    const char *service;      /* log and metric label; NULL means "wsapp" */
    const char *host;         /* bind address; NULL or "" means every IPv4 address */
    int port;                 /* 0 picks a free port (wsapp_port) */
    int reuse_port;           /* nonzero: SO_REUSEPORT */
    size_t max_body;          /* HTTP request body; 0 means 1 MiB */
    size_t max_header;        /* request head; 0 means 16 KiB (JWTs in headers and subprotocols) */
    size_t max_frame;         /* an incoming WebSocket message; 0 means 64 KiB */
    size_t send_queue_bytes;  /* queued bytes per connection before it is dropped; 0 means 1 MiB */
    int max_connections;      /* sockets (HTTP and WebSocket) accepted at once; 0 means 20000 */
    int http_timeout_s;       /* idle HTTP keep-alive; 0 means 30 */
    /* A new connection's request head must be complete this long after it
     * opened, else 408 and close (slow-loris); 0 means 10000. */
    int header_timeout_ms;
    /* An incoming WebSocket message must be complete this long after its
     * first byte, else close 1008 (fragments or a frame that never end);
     * 0 means 30000. */
    int message_timeout_ms;
    /* Bytes that the unfinished incoming messages of every connection may
     * hold together: a total over the process (shared by every wsapp in
     * it, each checking it against its own value), since 10,000 peers each
     * holding a nearly whole message of max_frame add up. The connection
     * whose bytes would pass it is closed 1009 (its message dropped, the
     * others' kept); 0 means 64 MiB. Routes without a message hook keep
     * none of what their clients send. */
    size_t message_memory_bytes;
    int access_log;           /* nonzero: one info line per HTTP request and handshake */
    metrics *metrics;         /* NULL means metrics_default() */
} wsapp_opts;

/* Creates the server (not listening). Returns NULL with the reason in err
 * on bad options or OOM. Free with wsapp_free. */
wsapp *wsapp_new(const wsapp_opts *opts, char *err, size_t errlen);

/* Stops (if running) and frees everything, open connections included.
 * NULL is a no-op. */
void wsapp_free(wsapp *app);

/* ---- HTTP ---------------------------------------------------------- */

typedef void (*wsapp_http_fn)(wsapp_req *req, void *ud);

/* Registers a route before wsapp_start. `method` is GET, POST, PUT, PATCH
 * or DELETE (HEAD is served by GET routes, the body left out). `path` is
 * matched exactly, or, when it ends with '*', as a prefix (the '*' left
 * out: "/executions/" then a star matches "/executions/abc"). Exact routes win over
 * prefixes; among prefixes the longest wins. A path with no route is 404,
 * one with routes of other methods only is 405. Returns 0 or -1. */
int wsapp_route(wsapp *app, const char *method, const char *path, wsapp_http_fn fn, void *ud);

/* Registers GET /metrics, answered from the registry of the options. */
int wsapp_route_metrics(wsapp *app);

/* Request accessors. Strings are owned by the request and stay valid until
 * it is answered (for a WebSocket, until the accept hook returns). */
const char *wsapp_req_method(const wsapp_req *req);
const char *wsapp_req_path(const wsapp_req *req);   /* without the query string */
const char *wsapp_req_id(const wsapp_req *req);     /* X-Request-Id: the client's when sane */
const char *wsapp_req_remote(const wsapp_req *req); /* peer IP address */
/* A query argument, %-decoded, or NULL. */
const char *wsapp_req_query(wsapp_req *req, const char *name);
/* A request header by case-insensitive name, or NULL. */
const char *wsapp_req_header(wsapp_req *req, const char *name);
/* The body (NUL-terminated) and its length; "" for none. */
const char *wsapp_req_body(const wsapp_req *req, size_t *len);
/* Parses the body as JSON; on success *out is the caller's (cJSON_Delete).
 * On failure the request has been answered 400 naming the position and -1
 * is returned. */
int wsapp_req_json(wsapp_req *req, cJSON **out);
/* Adds a response header (both copied; at most 16). Returns 0 or -1. */
int wsapp_req_add_header(wsapp_req *req, const char *name, const char *value);

/* Answers. A request is answered once; later answers are ignored. */
void wsapp_respond(wsapp_req *req, int status, const char *content_type, const char *body, size_t len);
/* Takes a malloc'd body (freed with free()). */
void wsapp_respond_take(wsapp_req *req, int status, const char *content_type, char *body, size_t len);
/* Serialises and frees `body` (NULL sends null). */
void wsapp_respond_json(wsapp_req *req, int status, cJSON *body);
/* The common error body; `code` NULL derives it from the status; `details`
 * ownership taken (may be NULL). */
void wsapp_respond_error(wsapp_req *req, int status, const char *code, const char *message, cJSON *details);

/* Called in an HTTP handler: the answer comes later. The request stays
 * alive until it is answered (on the loop thread, e.g. in a wsapp_post
 * function) or until its client goes away: then `on_gone` (may be NULL)
 * is called on the loop, and `req` is freed when it returns, so whoever
 * holds `req` must forget it there. A client that pipelines another
 * request on the connection meanwhile is closed (keep-alive without
 * pipelining, what browsers and curl do, is served). */
void wsapp_req_defer(wsapp_req *req, void (*on_gone)(wsapp_req *req, void *ud), void *ud);

/* ---- streamed answers ------------------------------------------------ */

/* A body produced by another thread as the client reads it, sent chunked
 * (Transfer-Encoding: chunked), for answers too long to build whole in
 * memory (a replay of a long log). At most `max_buffered` bytes wait
 * between the producer and the socket: wsapp_stream_write blocks past that
 * until the client has read enough, so a slow client slows its producer
 * and never grows the process.
 *
 * On the loop, in the handler, wsapp_req_stream prepares one for a request
 * that is then deferred. The producer (one thread, not the loop) calls
 * wsapp_stream_begin with the status, writes, and ends with
 * wsapp_stream_end. Until the begin, the request may still be answered
 * the usual way (an error found before any byte of the body): the stream
 * is then refused, its begin and writes return -1. For a request with a
 * stream, on_gone (wsapp_req_defer) is called when the request is freed,
 * at the end of the body as well as when its client goes away, so its
 * holder clears on_gone (wsapp_req_defer with NULL) when it lets go first.
 * HEAD gets the head alone; the producer's writes then fail. An HTTP/1.0
 * client gets the body unframed, ended by the close. A body that does not
 * move for http_timeout_s (a client that stopped reading, or a producer
 * that wrote nothing) closes the connection, and the loop's end lets every
 * producer go: neither a client nor a stop leaves a producer waiting for
 * ever. */
typedef struct wsapp_stream wsapp_stream;

/* On the loop. Returns the producer's reference, or NULL (OOM, a
 * WebSocket handshake, a request answered already or with a stream
 * already). */
wsapp_stream *wsapp_req_stream(wsapp_req *req, size_t max_buffered);

/* Producer: answers the request with `status` and `content_type` (copied)
 * and the headers added to it so far. Returns 0, or -1 when the request
 * was answered otherwise or its client is gone. */
int wsapp_stream_begin(wsapp_stream *s, int status, const char *content_type);

/* Producer: appends len bytes, blocking while max_buffered bytes wait (a
 * write longer than max_buffered waits for the buffer to be empty).
 * Returns 0, or -1 (stop producing): before a begin, on OOM, for HEAD,
 * once the client is gone or the loop has ended. */
int wsapp_stream_write(wsapp_stream *s, const void *data, size_t len);

/* Producer, also without a begin: no more bytes, and the producer's
 * reference is released (s is not to be used after). With `ok` the body
 * ends properly once what is buffered is sent; without, the connection is
 * cut after it, so that the client sees an unfinished body (a failure
 * halfway, after a 200 went out). Never blocks. */
void wsapp_stream_end(wsapp_stream *s, int ok);

/* ---- WebSocket ----------------------------------------------------- */

typedef struct {
    /* Bytes of user data per connection, zeroed, owned by wsapp, alive from
     * accept to close (wsapp_conn_user). */
    size_t user_size;
    /* Before the upgrade. Return 0 to accept, or answer the request with
     * wsapp_respond_* (401, 403, 503...) and return -1 to refuse; -1
     * without an answer refuses with 403. `user` is the connection's user
     * data, already usable. NULL accepts everything. */
    int (*accept)(wsapp_req *req, void *user, void *ud);
    /* After the upgrade; the connection may send. */
    void (*open)(wsapp_conn *c, void *user, void *ud);
    /* One whole message (fragments joined), text or binary. `data` is
     * valid during the call only. NULL reads and drops them: a one-way
     * stream, whose client's frames mean nothing. */
    void (*message)(wsapp_conn *c, void *user, const char *data, size_t len, int binary, void *ud);
    /* A message larger than max_frame was discarded (the connection stays
     * open). `size` is what had arrived when it was cut. May be NULL.
     * Also called, with the connection then closed 1009, when a message
     * goes on past 16 x max_frame: its end is not waited for. */
    void (*too_big)(wsapp_conn *c, void *user, size_t size, void *ud);
    /* A WebSocket pong arrived. May be NULL. */
    void (*pong)(wsapp_conn *c, void *user, void *ud);
    /* Pre-framed output, for a producer that keeps its frames in memory of
     * its own (shared by many connections) rather than queueing them. Called
     * on the loop when the socket is writable, the wsapp_conn_send queue is
     * empty and wsapp_conn_want_write asked for it (or the last call left a
     * frame partly written). It writes with wsapp_conn_write_raw and returns
     * 0 when it stopped at a frame boundary, 1 when a frame is partly
     * written (no ping or close frame goes out until it returns 0, so on a
     * closing connection it must finish that frame), -1 to close. May be
     * NULL. */
    int (*writable)(wsapp_conn *c, void *user, void *ud);
    /* The connection is gone (closed by either side, dropped, or the server
     * stopping). Called once for each open; `c` is invalid afterwards and
     * the user data freed. Also called for an accepted handshake that
     * never completed, with `c` NULL, so that accept's work is undone. */
    void (*close)(wsapp_conn *c, void *user, void *ud);
} wsapp_ws_handlers;

/* Registers a WebSocket route for GET `path` (exact, or a prefix with a
 * trailing '*'). The handlers are copied. Returns 0 or -1. */
int wsapp_ws_route(wsapp *app, const char *path, const wsapp_ws_handlers *h, void *ud);

/* In the accept hook: the subprotocols the client offered, comma-separated
 * as sent (NULL when none), and the one to echo in the answer (copied; it
 * must be one of them; NULL echoes none). */
const char *wsapp_req_subprotocols(wsapp_req *req);
int wsapp_req_set_subprotocol(wsapp_req *req, const char *proto);

void *wsapp_conn_user(wsapp_conn *c);
/* The `ud` given to wsapp_ws_route for the connection's route. */
void *wsapp_conn_route_ud(const wsapp_conn *c);
/* A process-unique number for the connection (never 0). */
uint64_t wsapp_conn_id(const wsapp_conn *c);
const char *wsapp_conn_remote(const wsapp_conn *c);

/* A frame to send, built once and shared: it holds the WebSocket header
 * and the payload. Created with one reference; wsapp_conn_send takes its
 * own, so the creator drops its reference with wsapp_msg_unref when done.
 * Returns NULL on OOM or when len exceeds 1 GiB. */
wsapp_msg *wsapp_msg_new(const void *data, size_t len, int binary);
/* The same from a pre-built text whose final length is not yet known:
 * wsapp_msg_new_text reserves `cap` bytes at wsapp_msg_data; set the length
 * with wsapp_msg_set_len before the first send. */
wsapp_msg *wsapp_msg_new_text(size_t cap);
char *wsapp_msg_data(wsapp_msg *m);
void wsapp_msg_set_len(wsapp_msg *m, size_t len);
void wsapp_msg_ref(wsapp_msg *m);
void wsapp_msg_unref(wsapp_msg *m); /* NULL is a no-op */

/* Queues `m` (a reference is taken) on the connection. When the queue
 * would exceed send_queue_bytes the connection is dropped (its close hook
 * follows from the loop) and -1 is returned; -1 also for a closing one. A
 * frame larger than send_queue_bytes is queued when the queue is empty. */
int wsapp_conn_send(wsapp_conn *c, wsapp_msg *m);
/* Copies `len` bytes into a new text frame and queues it. */
int wsapp_conn_send_text(wsapp_conn *c, const char *data, size_t len);
/* Writes the header of an unmasked (server) frame of `len` payload bytes
 * into out (at least 10 bytes); returns its length (2, 4 or 10). */
size_t wsapp_frame_header(unsigned char *out, size_t len, int binary);

/* In the `writable` hook only: writes pre-framed bytes straight to the
 * socket, as many as it takes now, in one system call. Returns the bytes
 * taken (0 when the socket is full: the hook is called again once it is
 * writable), or -1 when the connection failed (it is dropped; its close
 * hook follows). */
long wsapp_conn_write_raw(wsapp_conn *c, const struct iovec *iov, int iovcnt);
/* Asks for the `writable` hook to be called once the socket can take
 * bytes. Cheap to call again while a call is pending. */
void wsapp_conn_want_write(wsapp_conn *c);

/* Bytes queued and not yet written. */
size_t wsapp_conn_queued(const wsapp_conn *c);
/* Sends a WebSocket ping (payload: none). */
void wsapp_conn_ping(wsapp_conn *c);
/* Closes with `code` (1000..4999) and a reason (cut to 123 bytes) once the
 * frames already queued are written; a peer that does not take them within
 * 10 seconds is dropped without the close frame. Idempotent. */
void wsapp_conn_close(wsapp_conn *c, int code, const char *reason);
/* Drops the connection at once, without a close frame (for a peer that
 * stopped reading, so a close handshake would never finish); its close
 * hook follows from the loop. */
void wsapp_conn_abort(wsapp_conn *c);
/* Monotonic ms of the last frame (any kind, pongs included) received. */
long long wsapp_conn_last_rx_ms(const wsapp_conn *c);

/* Calls fn for every open WebSocket of the app (any route: a module tells
 * its own by wsapp_conn_route_ud, since `user` is another module's data on
 * another route). fn may close the connection it is given, not others. */
void wsapp_foreach_conn(wsapp *app, void (*fn)(wsapp_conn *c, void *user, void *ud), void *ud);
/* Open WebSocket connections. */
int wsapp_conn_count(const wsapp *app);

/* ---- loop ---------------------------------------------------------- */

/* Runs fn(ud) on the loop thread soon. Safe from any thread (it wakes the
 * loop with lws_cancel_service). Functions posted before wsapp_stop that
 * have not run when the loop ends are run with `app` stopping (they must
 * still free what ud holds). Returns 0 or -1 (OOM). */
int wsapp_post(wsapp *app, void (*fn)(wsapp *app, void *ud), void *ud);

/* A timer on the loop: created idle, armed with wsapp_timer_set (a
 * re-arm replaces the previous deadline). Use on the loop thread (or
 * before wsapp_start). Free with wsapp_timer_free (NULL no-op). */
wsapp_timer *wsapp_timer_new(wsapp *app, void (*fn)(wsapp_timer *t, void *ud), void *ud);
void wsapp_timer_set(wsapp_timer *t, long ms);
void wsapp_timer_cancel(wsapp_timer *t);
void wsapp_timer_free(wsapp_timer *t);

/* A descriptor the loop watches (a client library's socket, such as an
 * asynchronous libpq connection's): fn runs on the loop when it is
 * readable, and when writable while wsapp_io_want_write is on. The
 * descriptor stays the caller's (wsapp_io_free does not close it; free the
 * watch before closing it). Create, change and free on the loop thread. */
typedef struct wsapp_io wsapp_io;
wsapp_io *wsapp_io_new(wsapp *app, int fd, void (*fn)(wsapp_io *w, int readable, int writable, void *ud), void *ud);
void wsapp_io_want_write(wsapp_io *w, int on);
void wsapp_io_free(wsapp_io *w); /* NULL is a no-op */

/* Binds and starts the loop thread. Returns 0 or -1 with the reason. */
int wsapp_start(wsapp *app, char *err, size_t errlen);
/* The port bound (after wsapp_start). */
int wsapp_port(const wsapp *app);
/* Nonzero once wsapp_stop began (for handlers and timers). */
int wsapp_stopping(const wsapp *app);
/* Graceful stop, from any thread but the loop's: stops accepting, closes
 * every WebSocket with 1001, lets HTTP requests in flight finish for up to
 * grace_ms, then ends the loop and joins its thread. Idempotent. */
void wsapp_stop(wsapp *app, int grace_ms);

#endif
