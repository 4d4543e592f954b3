/* sse: Server-Sent Events of SPEC 2b, GET /api/v1/events/{client_id}, with
 * publishing (Redis `sse:{client_id}`, POST /internal/v1/sse/{client_id})
 * and the human-in-the-loop answers (POST /api/v1/events/{client_id}/response).
 *
 * Every event is stored in Redis before it is delivered (sse_store.c): a
 * script gives it the client's next id, appends the formatted frame to the
 * client's bounded buffer and publishes it on one channel that every
 * gateway instance reads, so any instance that holds the client delivers
 * it and a client that reconnects elsewhere replays what it missed. A raw
 * `PUBLISH sse:{client_id}` from a backend is stored by exactly one instance
 * (the one holding the Redis lock `sse:ingest:lock`).
 *
 * Threads: the hub thread (sse_hub.c) owns the subscription, heartbeats and
 * the ingest lock; stream handlers run on MHD threads, defer their request
 * and queue the connect script for the connect thread (sse_connect.c),
 * which pipelines them on one Redis connection and resumes each request;
 * its second half, on its MHD thread again, builds the replay. Then the
 * stream's socket leaves libmicrohttpd (httpd_req_detach) for one of
 * the writer threads (sse_out.c), which owns it from there: each writer an
 * epoll set of its streams, fed through an inbox. The client table is
 * shared, under striped locks. */
#ifndef AE_SSE_H
#define AE_SSE_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "cfg.h"
#include "httpd.h"
#include "metrics.h"
#include "rconn.h"

typedef struct sse sse;

#define SSE_CLIENT_ID_MAX 128
#define SSE_DELIVER_CHANNEL "gw:sse:deliver"

typedef struct {
    long heartbeat_ms;        /* SSE_HEARTBEAT_SECONDS (30) */
    int buffer_events;        /* SSE_BUFFER_EVENTS (100) */
    long buffer_ttl_s;        /* SSE_BUFFER_TTL_SECONDS (300) */
    long client_buffer_bytes; /* SSE_CLIENT_BUFFER_BYTES: more waiting for one client drops it */
    long write_timeout_s;     /* SSE_WRITE_TIMEOUT_SECONDS: a client that takes nothing this long is closed */
    int send_buffer_bytes;    /* SSE_SEND_BUFFER_BYTES: SO_SNDBUF of each stream's socket (0: the kernel's) */
    long answer_ttl_s;        /* HITL_ANSWER_TTL_SECONDS: how long an answer is remembered for idempotency */
    int writers;              /* SSE_WRITERS: writer threads (0: one per CPU, at most 8) */
    long max_streams;         /* streams held at most (the gateway's MAX_CONNECTIONS) */
    int max_per_ip;           /* streams per client address (MAX_CONNECTIONS_PER_IP; 0: no limit) */
    rconn_opts redis;
    char internal_token[512];
} sse_config;

/* Reads the settings (the Redis ones through rconn). */
void sse_config_read(cfg *c, sse_config *out, const char *internal_token);

/* Creates the hub and starts its thread. NULL on failure (err). */
sse *sse_new(const sse_config *sc, metrics *reg, char *err, size_t errlen);

/* Registers the three routes. Returns 0 or -1. */
int sse_routes(sse *s, httpd *srv);

/* Streams held by this instance. */
long sse_clients(sse *s);

/* Ends every stream (clients reconnect elsewhere) and stops the hub; new
 * streams get 503. Call before httpd_stop. */
void sse_stop(sse *s);

void sse_free(sse *s);

/* ---- Between the modules of sse (not for other callers). ---- */

/* Nonzero when `id` is a client id we accept: 1..128 of [A-Za-z0-9_.-]. */
int sse_client_id_ok(const char *id);

/* Longest idempotency key a publisher may give. */
#define SSE_IDEM_KEY_MAX 255

/* Nonzero for an idempotency key we accept: 1..255 of printable ASCII
 * (0x20-0x7e): it goes into a Redis key name. */
int sse_idem_key_ok(const char *key);

/* Stores and publishes one event (the store script); `data_json` is JSON
 * text without raw newlines. `idem_key` (NULL: none; checked with
 * sse_idem_key_ok) makes it once per key and client within the buffer's
 * TTL. On success returns 0 with the id in *id and *replayed set when the
 * key had already stored it (nothing stored now: *id is the first id). */
int sse_store_publish(sse *s, rconn *r, const char *client_id, const char *event_type, const char *data_json,
                      const char *idem_key, long long *id, int *replayed);

/* Appends the connect script to `ctx`'s pipeline (redisAppendCommandArgv).
 * Returns 0 or -1. */
int sse_store_connect_append(sse *s, redisContext *ctx, const char *client_id, const char *last_event_id,
                             long online_ttl_s);
/* Its reply (`rep`, taken): returned when it is [established id, effective
 * last id, lost, last, [frames...]] (freed by the caller with
 * freeReplyObject), else freed and NULL. */
redisReply *sse_store_connect_check(void *rep);

/* ---- sse_connect.c: the connect thread. ---- */

typedef struct sse_connector sse_connector;
typedef struct sse_stream sse_stream;

/* One stream's connect, from its handler to its second half. The
 * connector fills `rep` (NULL: failed) and resumes `req`; the job is then
 * the request's thread's again. */
typedef struct sse_connect_job {
    struct sse_connect_job *next;
    httpd_req *req;
    sse_stream *st;
    sse *s;
    long online_ttl_s;
    int has_last;
    char cid[SSE_CLIENT_ID_MAX + 1];
    char last[24];
    redisReply *rep;
} sse_connect_job;

sse_connector *sse_connector_new(sse *s, char *err, size_t errlen);
/* Queues a job (any thread). -1 once stopping: the job is not taken. */
int sse_connector_submit(sse_connector *c, sse_connect_job *j);
/* Fails what is queued (each request resumed with rep NULL) and stops. */
void sse_connector_stop(sse_connector *c);
void sse_connector_free(sse_connector *c);

enum { SSE_ANSWER_FAILED = -1, SSE_ANSWER_STORED, SSE_ANSWER_RETRY, SSE_ANSWER_CONFLICT, SSE_ANSWER_UNKNOWN_CLIENT };

/* Stores a HITL answer once (see SPEC 2b); returns one of SSE_ANSWER_*. */
int sse_store_answer(sse *s, rconn *r, const char *client_id, const char *question_id, const char *answer_json,
                     int held_here);

/* The Redis connection of the calling thread (created on first use, freed
 * when the thread ends). NULL on OOM. */
rconn *sse_store_conn(sse *s);

/* GET /api/v1/events/{client_id} (ud: the hub). */
void sse_stream_handler(httpd_req *req, void *ud);

/* Nonzero for an event type a publisher may use: 1..64 of
 * [A-Za-z0-9_.:-], not one the gateway sends itself (heartbeat,
 * connection.established, stream.reset). */
int sse_event_type_ok(const char *type);

/* Stores and publishes an event with `data` (NULL: null) through `r`,
 * once per `idem_key` (NULL: none), as sse_store_publish. */
int sse_publish(sse *s, rconn *r, const char *client_id, const char *type, const cJSON *data, const char *idem_key,
                long long *id, int *replayed);

/* Nonzero when this instance holds a stream of `client_id`. */
int sse_hub_has(sse *s, const char *client_id);

const sse_config *sse_cfg(const sse *s);

/* ---- sse_out.c: the streams' sockets and the writer threads. ---- */

typedef struct sse_out sse_out;

#define SSE_OUT_MAX_WRITERS 16

typedef struct {
    int writers;
    long max_streams;
    int max_per_ip;
    long client_buffer_bytes; /* more waiting for one stream cuts it */
    long write_timeout_s;     /* a stream that takes nothing this long while data waits is cut */
    int send_buffer_bytes;    /* SO_SNDBUF of each stream's socket; 0 leaves the kernel's autotuning */
} sse_out_config;

typedef struct {
    metrics_gauge *clients;
    metrics_counter *delivered, *dropped;
} sse_out_metrics;

/* Starts the writers. NULL on failure (err). */
sse_out *sse_out_new(const sse_out_config *oc, const sse_out_metrics *m, char *err, size_t errlen);

enum { SSE_OUT_FAILED = 1, SSE_OUT_FULL, SSE_OUT_FULL_ADDRESS };

/* Registers a stream of `cid` from address `remote` (any thread), before
 * its replay is read: what is delivered from now on is held for it. NULL
 * when it cannot (*why: SSE_OUT_*). The stream must then get exactly one
 * of sse_out_start or sse_out_cancel, after which the caller must not
 * touch it. */
sse_stream *sse_out_open(sse_out *o, const char *cid, const char *remote, int *why);

/* Makes the stream live on socket `fd` (taken, closed on failure): writes
 * `head` (the response head, as is) and `body` (the first frames; one
 * chunk when `chunked`), then what was delivered meanwhile with an id above
 * `threshold`. Copies head and body. Returns 0 or -1. */
int sse_out_start(sse_out *o, sse_stream *s, int fd, int chunked, const char *head, size_t headlen,
                  const char *body, size_t bodylen, long long threshold);

/* Drops a registered stream that will not start. */
void sse_out_cancel(sse_out *o, sse_stream *s);

/* One event (`frame`, an SSE frame) to every stream of client `cid`. */
void sse_out_deliver(sse_out *o, const char *cid, size_t cidlen, const char *frame, size_t len);

/* One frame to every live stream. */
void sse_out_heartbeat(sse_out *o, const char *frame, size_t len);

/* Nonzero when a stream of `cid` is held (or being opened). */
int sse_out_has(sse_out *o, const char *cid);

/* The client ids held, into *out (the caller's, free()); their count. */
size_t sse_out_client_ids(sse_out *o, char (**out)[SSE_CLIENT_ID_MAX + 1]);

/* Live streams. */
long sse_out_clients(sse_out *o);

/* Ends every live stream cleanly (any thread); the writers go on, and
 * streams still replaying are left alone. */
void sse_out_end_all(sse_out *o);

/* Ends every live stream cleanly and stops the writers; streams opened
 * after it fail. */
void sse_out_stop(sse_out *o);

void sse_out_free(sse_out *o);

#endif
