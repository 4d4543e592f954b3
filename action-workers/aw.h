/* aw: the action-workers' shared context (read-only after start-up except
 * for objects that lock themselves: pool, breaker, metrics) and the job as
 * a worker thread carries it through its delivery. */
#ifndef AW_AW_H
#define AW_AW_H

#include <stddef.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "breaker.h"
#include "buf.h"
#include "cfg.h"
#include "dbpool.h"
#include "health.h"
#include "httpd.h"
#include "rconn.h"
#include "target.h"
#include "template.h"

#define AW_VERSION "0.1.0"

typedef enum { ACT_REST = 0, ACT_TELEGRAM = 1, ACT_MCP = 2, ACT_NKINDS = 3 } act_kind;

typedef struct {
    int concurrency;          /* WORKER_CONCURRENCY: in-flight deliveries per process */
    int threads;              /* WORKER_THREADS: event-loop threads sharing them */
    long visibility_ms;       /* JOB_VISIBILITY_TIMEOUT */
    long retry_base_ms;       /* RETRY_BASE_MS */
    long retry_max_ms;        /* RETRY_MAX_DELAY_MS */
    int max_attempts;         /* RETRY_MAX_ATTEMPTS */
    long poll_ms;             /* WORKER_POLL_MS: idle queue polling period */
    long shutdown_grace_ms;   /* SHUTDOWN_GRACE_MS */
    long pace_ms;             /* TELEGRAM_CHAT_INTERVAL_MS */
    long pace_hold_ms;        /* waits up to this are held in memory, longer go to Redis */
    int breaker_failures;     /* BREAKER_FAILURES */
    long breaker_cooldown_ms; /* BREAKER_COOLDOWN_MS */
    long telegram_timeout_ms; /* TELEGRAM_TIMEOUT_MS */
    long mcp_timeout_ms;      /* MCP_TIMEOUT_MS (per request) */
    long response_max;        /* RESPONSE_MAX_BYTES kept in action_results */
    int native_http;          /* HTTP_CLIENT=native: plain http:// REST goes through h1.c */
    char telegram_base[512];
    char telegram_token[256];
    char explorer_tx_url[512];
    char webhook_secret[256];
    char ca_bundle[1024];     /* CA_BUNDLE: PEM file of the CAs TLS peers must chain to;
                                 "" for the system store */
    char queue_prefix[120];
    char metrics_host[64];
    int metrics_port;
    int db_max_connections;
    char conninfo[2048];
    char migrations_dir[1024];
    rconn_opts redis;
} aw_config;

/* Finished jobs waiting to be recorded, per delivery slot of the process,
 * past which no new job is taken. Deep enough that the writer's batches
 * (up to 2000 rows, see writer.c) never starve the slots while one is
 * being written (at 45,000 deliveries/s a write and its acks take 25-30
 * ms, and 32 per slot still stopped the takes now and then), still
 * bounded when PostgreSQL or Redis is down. */
#define AW_PENDING_PER_SLOT 64L

struct writer;
struct sig_key;

typedef struct aw {
    aw_config cfg;
    struct writer *writer;     /* records finished jobs (writer.c) */
    struct sig_key *sig;       /* WEBHOOK_SECRET's HMAC key, NULL when unset */
    dbpool *db;
    breaker *br;
    target_policy *targets;
    struct h1_tls *tls;        /* h1's TLS context for https REST deliveries (NULL: libcurl's) */
    health *health;
    int health_db, health_redis;
    rconn *health_rconn;
    httpd *http;
} aw;

typedef enum {
    OUT_NONE = 0,
    OUT_SUCCESS,  /* delivered */
    OUT_RETRY,    /* failed; may be tried again */
    OUT_FINAL,    /* failed for good (4xx, refused target, tool error) */
    OUT_DEFER,    /* not attempted (open breaker, pacing, database down): reschedule, no attempt used */
    OUT_INVALID   /* not a job: dead-lettered as is */
} outcome;

typedef struct job job;
struct job {
    job *next;
    char *raw;            /* exact bytes taken from Redis (owned) */
    cJSON *doc;           /* parsed job (owned) */
    void *arena;          /* the jarena slot holding doc, NULL when malloc'd (owned);
                             doc is read-only: what changes goes in the fields below */
    const char *id, *trigger_id, *event_id, *action_type;
    const cJSON *config, *event;
    act_kind kind;
    int attempt;          /* attempts made before this one */
    int throttled;        /* of them, 429s that do not count against RETRY_MAX_ATTEMPTS */
    char *trigger_name;   /* owned; NULL when unknown */
    long long start_at;   /* held for pacing until then (ms) */
    long long t0;         /* attempt start (ms) */
    int attempted;        /* a request was sent: this is an attempt */

    target_cache *tcache; /* the worker thread's target decisions (borrowed) */

    /* The current transfer. */
    CURL *easy;             /* borrowed from the worker's pool while delivering */
    struct curl_slist *hdrs;
    struct curl_slist *resolve_list; /* CURLOPT_RESOLVE pin (owned) */
    int native;           /* this request goes through h1.c, not libcurl */
    int tls;              /* h1: https (verified against app->tls's CAs) */
    buf req;              /* h1: the serialized request (owned) */
    struct h1_req *h1req; /* h1: the running request (owned by the pool) */
    target_info ti;       /* h1: the checked target with its pinned address */
    long timeout_ms;      /* h1: the request's timeout */
    int head_only;        /* h1: HEAD request */
    char *body;           /* request body (owned) */
    buf resp;
    long status;
    char ctype[128];
    char session[256];    /* Mcp-Session-Id */
    long retry_after_hdr; /* Retry-After seconds, -1 when absent */
    char host[300];       /* breaker key: host:port */
    int step;             /* MCP: 0 initialize, 1 initialized, 2 tools/call, 3 delete */
    char protocol[40];
    char *token;          /* MCP bearer token (owned, never logged) */
    char chat[64];        /* Telegram chat id */
    long long pace_slot;  /* Telegram: the send slot reserved for a deferred message,
                             carried in its next payload (0: none) */

    /* The outcome. */
    outcome out;
    long delay_ms;        /* RETRY: server-imposed wait (429); DEFER: wait */
    int throttle;         /* this failure was a 429 */
    int breaker_fail;     /* report to the breaker: 1 failure, 0 nothing, -1 success */
    char err[512];
    char curl_err[CURL_ERROR_SIZE]; /* libcurl's detail of a failed transfer (CURLOPT_ERRORBUFFER) */
    cJSON *response;      /* response_data (owned) */
    char *response_text;  /* response_data as JSON text: written by the delivery, or
                             printed from response by the writer (owned) */
    int row_done;         /* action_results written (or none needed) */
    const char *status_text; /* success|failed|retrying|dead, set when finished */
    long duration_ms;
    long long executed_at;   /* wall clock ms of the attempt's start */
    int ack_kind;            /* queue_ack_kind once finished */
    char *ack_payload;       /* owned */
    long long due_ms;
};

/* deliver.c: starts the job's first request, or decides its outcome at
 * once. Returns 0 when a transfer was set up in j->easy (the caller adds it
 * to its multi handle), 1 when the outcome is set, 2 when the job is held
 * until j->start_at (Telegram pacing). `q` is the thread's queue (pacing). */
struct queue;
int deliver_begin(aw *app, struct queue *q, job *j, long long now);

/* Called when j's transfer completed with `rc`. Returns 0 when another
 * request was set up (MCP's next step), 1 when the outcome is set. */
int deliver_done(aw *app, struct queue *q, job *j, CURLcode rc, long long now);

/* Per-kind halves, in deliver_rest.c, deliver_telegram.c, deliver_mcp.c. */
int deliver_rest_begin(aw *app, job *j);
int deliver_rest_done(aw *app, job *j, CURLcode rc);
int deliver_telegram_begin(aw *app, struct queue *q, job *j, long long now);
int deliver_telegram_done(aw *app, struct queue *q, job *j, CURLcode rc, long long now);
int deliver_mcp_begin(aw *app, job *j);
int deliver_mcp_done(aw *app, job *j, CURLcode rc);

/* Helpers shared by the kinds (deliver.c). */
/* Sets what every libcurl transfer uses for TLS: `ca_bundle` ("" or NULL:
 * the system store) is copied. Called once at start, before any worker
 * thread runs; read-only afterwards. */
void deliver_init(const char *ca_bundle);
/* Prepares j->easy for a request; `body` may be NULL (ownership of body
 * and j->hdrs stays with the job). Returns 0 or -1 (OOM). */
int deliver_setup(job *j, const char *method, const char *url, const char *body, long timeout_ms,
                  const char *resolve, size_t max_resp);
/* Adds a header line to j->hdrs. Returns 0 or -1. */
int deliver_header(job *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Feeds one raw response header line (as libcurl's header callback gets
 * it) to the job: Content-Type, Mcp-Session-Id, Retry-After. */
void deliver_header_line(void *job_ptr, const char *line, size_t n);
/* Frees the per-request state (headers, body, response) but not the easy. */
void deliver_reset_request(job *j);
/* Sets the outcome from a finished HTTP transfer: 2xx success; 408/429/5xx
 * and transport errors retried; other statuses final. Fills j->err. */
void deliver_classify(job *j, CURLcode rc, long timeout_ms);
/* Sets j->out and j->err (printf-style). */
void deliver_fail(job *j, outcome out, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* The response body as JSON when it parses, else as a (bounded) string. */
cJSON *deliver_body_json(const job *j, size_t max);
/* The trigger name (from the job, else the triggers table), or NULL. */
const char *deliver_trigger_name(aw *app, job *j);


/* The default Telegram text for an event (deliver_telegram.c), with the
 * markup of `mode` (TEMPLATE_MARKDOWN, _MARKDOWN_V2, _HTML; TEMPLATE_RAW
 * for plain text) and every value escaped for it. Returns a malloc'd
 * string (free()) or NULL on OOM. */
char *telegram_default_text(const cJSON *event, const char *trigger_name, const char *explorer_tx_url,
                            template_mode mode);

/* results.c: writes one action_results row per finished attempt, in one
 * statement. Returns 0 or -1 with the reason in err. */
int results_write(aw *app, job **jobs, int n, char *err, size_t errlen);

/* metrics glue (awmetrics.c). */
int awm_init(void);
void awm_outcome(act_kind kind, const char *status, double seconds);
void awm_inflight_add(long delta);
void awm_event(const char *name, long n);

/* writer.c: one thread per process that writes the action_results rows of
 * finished jobs in batches and then records their outcomes in Redis (which
 * ends their leases), so the event loops never wait for either. */
typedef struct writer writer;
/* NULL on OOM. Free with writer_free (which stops the thread first). */
writer *writer_new(aw *app);
/* Starts the thread. Returns 0 or -1. */
int writer_start(writer *w);
/* Hands over the finished jobs head..tail (n of them, linked by next); the
 * writer owns them, and gives them back to be freed by writer_reap once
 * recorded. Thread-safe. */
void writer_submit(writer *w, job *head, job *tail, int n);
/* The jobs the writer has recorded (linked by next, NULL when none), for
 * the caller to free (aw_job_free) or reuse. The worker threads call it:
 * glibc's malloc is cheapest when memory is freed by the thread that
 * allocated it (a thread freeing another's chunks takes that arena's lock,
 * and the two threads then contend on every batch). Thread-safe; cheap
 * when there is nothing to take. */
job *writer_reap(writer *w);
/* Jobs handed over and not yet recorded (for back-pressure). */
long writer_pending(writer *w);
/* Records what is left for up to grace_ms, then stops the thread; jobs
 * still unrecorded are dropped (still leased: they will be redelivered). */
void writer_stop(writer *w, long grace_ms);
void writer_free(writer *w);

/* Frees a job and everything it owns (worker.c). NULL is a no-op. */
void aw_job_free(job *j);
/* Frees what a job owns and zeroes it, keeping the struct itself for
 * reuse (worker.c). */
void aw_job_clear(job *j);

/* worker.c: runs one event loop thread until stop; returns NULL. */
void *worker_run(void *arg);
typedef struct {
    aw *app;
    int index;
    int capacity;
} worker_args;

#endif
