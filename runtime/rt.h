/* rt: what the runtime's handlers share: the service context, and the
 * request and answer of one route independent of the HTTP server that
 * carries it (so the same handlers serve over libmicrohttpd or the
 * libwebsockets core). */
#ifndef RT_RT_H
#define RT_RT_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "dbpool.h"
#include "health.h"
#include "khala.h"
#include "metrics.h"
#include "synctoken.h"

typedef struct rt_req rt_req;

/* stream_begin's answer when too many streams are being sent. */
#define RT_STREAM_BUSY (-2)

/* One request. Getters return NULL when absent; strings live as long as
 * the request. */
struct rt_req {
    const char *(*header)(const rt_req *q, const char *name);
    const char *(*query)(const rt_req *q, const char *name);
    const char *(*param)(const rt_req *q, const char *name);
    const char *body;
    size_t body_len;
    void *tr; /* the transport's own request */
    /* A body too long to build whole (a replay, a long run): stream_begin
     * answers with the status and content type now, stream_write sends the
     * body in pieces as it is made (blocking while the client is behind),
     * and `a` is not sent. Both return -1 when the client is gone;
     * stream_begin returns RT_STREAM_BUSY, having sent nothing, when too
     * many streams are being sent (the handler answers 503 through `a`),
     * and is NULL where the transport cannot stream. A handler that fails
     * after its begin sets a->stream_failed: the client then sees the body
     * cut short, since the 200 went out with the first bytes. */
    int (*stream_begin)(const rt_req *q, int status, const char *ctype);
    int (*stream_write)(const rt_req *q, const void *data, size_t len);
};

/* One answer: a JSON body (owned) or raw bytes (malloc'd, owned) of a
 * content type. An error body without request_id gets it from the
 * transport. */
typedef struct {
    int status;
    cJSON *json;
    char *raw;
    size_t raw_len;
    const char *ctype;
    char retry_after[24]; /* Retry-After seconds when set */
    int streamed;         /* set by the transport at stream_begin: `a` is not sent */
    int stream_failed;
} rt_resp;

typedef struct {
    char service_name[64];
    char build_sha[64];
    const char *write_mode; /* rust_active, shadow_only, read_only */
    int writes_enabled;
    long poll_min_interval_ms;
    long poll_default_limit, poll_max_limit;
    khala_limits limits[3];     /* by khala_class */
    long retention_messages;    /* per topic; 0 keeps everything */
    long heartbeat_stale_ms;
    int enforce_origin;
    long header_timeout_ms;     /* a request head must be in this long after the connection opened */
    long handler_queue_max;     /* requests and log reads waiting for a handler thread (each kind) */
    long listen_ping_ms;        /* the LISTEN connection, quiet this long, must answer a SELECT 1 as fast */
    long ws_message_timeout_ms; /* a WebSocket message must be complete this long after its first byte */
    char allowed_origins[2048]; /* ",a,b," lower case, no trailing slash */
} rt_config;

typedef struct {
    rt_config cfg;
    dbpool *db;
    synctoken *tok;
    khala_table *rate;  /* publish rate per topic */
    khala_table *guard; /* poll interval per principal and topic */
    health *health;
    metrics *m;
    long long started_ms;
    metrics_counter *conflicts, *replays, *published, *stale_floor, *stale_budget, *append_commits;
    metrics_gauge *subscribers;
} rt;

/* Handlers: each fills `a` exactly once. */
void rt_h_healthz(rt *r, const rt_req *q, rt_resp *a);
void rt_h_readyz(rt *r, const rt_req *q, rt_resp *a);

void rt_h_run_create(rt *r, const rt_req *q, rt_resp *a);
void rt_h_run_append(rt *r, const rt_req *q, rt_resp *a);
void rt_h_run_get(rt *r, const rt_req *q, rt_resp *a);
void rt_h_run_receipt(rt *r, const rt_req *q, rt_resp *a);
void rt_h_run_replay(rt *r, const rt_req *q, rt_resp *a);
void rt_h_run_summary(rt *r, const rt_req *q, rt_resp *a);
void rt_h_run_checkpoint(rt *r, const rt_req *q, rt_resp *a);
void rt_h_drift(rt *r, const rt_req *q, rt_resp *a);

void rt_h_worker_register(rt *r, const rt_req *q, rt_resp *a);
void rt_h_worker_get(rt *r, const rt_req *q, rt_resp *a);
void rt_h_worker_heartbeat(rt *r, const rt_req *q, rt_resp *a);
void rt_h_worker_status(rt *r, const rt_req *q, rt_resp *a);
void rt_h_worker_checkpoint(rt *r, const rt_req *q, rt_resp *a);
void rt_h_worker_list(rt *r, const rt_req *q, rt_resp *a);

void rt_h_khala_poll(rt *r, const rt_req *q, rt_resp *a);

/* The checks a Khala WebSocket passes before the upgrade (origin, token,
 * scope, owner, after_seq), on the loop thread: the owner's read waits
 * at most a few hundred ms (else 503). Returns 0 with the topic's
 * after_seq in *after, or -1 with the refusal in `a` (the poll's JSON). */
int rt_khala_ws_accept(rt *r, const rt_req *q, const char *topic, long long *after, rt_resp *a);

/* --- helpers shared by the handler files (rtapi.c). */

/* An error answer {"error": code, "message": message}. */
void rt_error(rt_resp *a, int status, const char *code, const char *message);
/* The answer for a failed database call (503 unavailable), its reason
 * `err` logged once with `what` (a fixed text saying which call) and `id`
 * (the run, worker or topic it was for; NULL for none), escaped. */
void rt_db_error(rt_resp *a, const char *what, const char *id, const char *err);
/* The same answer without a log line, for a caller that logged the reason
 * once for many answers (a group, a broken connection) or already did. */
void rt_db_unavailable(rt_resp *a);
/* Khala publish limits of a write's topic (SPEC 6): the payload limit
 * (413 answered, returns 1), then the topic's rate: counted, 0 with
 * *rate_ms the time of the count (for rt_publish_give), or -1 with
 * *retry_ms set and nothing answered yet (a keyed append over the rate
 * may be a replay, which publishes nothing): rt_publish_refused answers
 * it 429. */
int rt_publish_check(rt *r, const char *topic, size_t payload_bytes, rt_resp *a, long long *rate_ms, long *retry_ms);
void rt_publish_refused(rt *r, const char *topic, long retry_ms, rt_resp *a);
/* Gives back a count that published nothing (rate_ms 0: none was taken). */
void rt_publish_give(rt *r, const char *topic, long long rate_ms);
/* 503 write_path_frozen when the write mode freezes writes; returns -1
 * then, else 0. */
int rt_writes_frozen(rt *r, rt_resp *a);
/* Parses the body as a JSON object into *out (NULL body or empty: an
 * empty object when allow_empty). Returns 0, or -1 with a 400 in `a`. */
int rt_body_object(const rt_req *q, cJSON **out, int allow_empty, rt_resp *a);
/* Nonzero when `s` is a UUID in its canonical text form. */
/* The longest topic name kept, with its NUL. */
#define RT_TOPIC_MAX 600

int rt_is_uuid(const char *s);
/* Lowercases the id of a run topic ("run:<uuid>:events") in place:
 * UUIDs compare without case (RFC 4122) and PostgreSQL writes them in
 * lowercase, so a topic spelled in capitals was another topic to the
 * listeners, the subscriber table and the rate limits, and its subscriber
 * got no live message. Other topics are left as they are. */
void rt_topic_canonical(char *topic);
/* Counts one append of `event_type` (bounded label set). */
void rt_count_append(rt *r, const char *event_type);

/* --- helpers of rtruns.c that rtappend.c shares. */

/* Where a row holds the run's fields (RUN without its events). */
typedef struct {
    int worker_id, status, metadata, last_seq, created_at, updated_at;
} rt_run_cols;
/* Answers {"run": RUN without events} (status `status`, Prefer:
 * return=minimal's shape) for run `id` from row `row` of res, whose
 * columns are those of `c`, each `base` further on. */
void rt_answer_minimal(rt_resp *a, int status, const char *id, const PGresult *res, int row, int base,
                       const rt_run_cols *c);
/* Answers {"run": RUN} with its events (status `status`) for run `id`
 * read on c a page of events at a time, for a write that committed: a run
 * whose text passes 1 MiB is answered without its events (as
 * rt_answer_minimal); 404 or 503 when the run cannot be read. */
void rt_answer_run(rt_resp *a, PGconn *c, const char *id, int status);
/* A pooled connection, or NULL with a 503 in `a`; rt_acquire_within
 * waits at most timeout_ms (> 0) for it, a new connection's connect
 * included. */
PGconn *rt_acquire(rt *r, rt_resp *a);
PGconn *rt_acquire_within(rt *r, int timeout_ms, rt_resp *a);
/* The route's {id} when it is a UUID (0), else -1 with a 400 in `a`. */
int rt_run_id_param(const rt_req *q, rt_resp *a, const char **id);

#endif
