/* worker: one event-loop thread. It leases jobs from Redis, drives up to
 * its share of WORKER_CONCURRENCY deliveries at once through one libcurl
 * multi handle (no thread per delivery), and hands every finished job to
 * the process's writer (writer.c), which writes the attempt's result to
 * PostgreSQL and only then records the outcome in Redis. The loop itself
 * never waits for PostgreSQL. It takes jobs from Redis in batches, ahead
 * of need, on a connection of its own whose answer it reads when epoll
 * reports it, so deliveries go on while Redis works; it waits for Redis
 * only for maintenance and lease extensions.
 *
 * A job stays leased in action_jobs_inflight until its outcome is recorded,
 * and whoever holds it (this thread, then the writer) extends its lease
 * every third of the visibility timeout. So a job is never lost: if the
 * process dies the lease runs out and the job is delivered again; if
 * PostgreSQL is down the finished job waits in the writer (still leased)
 * until its row is written; if Redis is down the ack waits until it is back.
 * Delivery is at least once, which is why every request carries the job id
 * as an idempotency key. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "aw.h"
#include "backoff.h"
#include "curlep.h"
#include "fmt.h"
#include "h1.h"
#include "jarena.h"
#include "jget.h"
#include "log.h"
#include "queue.h"
#include "svc.h"

#define RELEASE_BATCH 512
#define TAKE_BATCH 256 /* at most this many jobs per take */
#define TAKE_MIN 64    /* while jobs are ready, take no fewer */
#define MAINT_EVERY_MS 200
#define MAINT_LIMIT 500
#define TARGET_TTL_MS 10000
/* The epoll tag of the take connection's socket (h1 uses H1_TAG, libcurl
 * plain socket numbers). */
#define TAKE_TAG (1ULL << 61)

typedef struct {
    aw *app;
    int idx, cap;
    queue *q;
    queue *tq;               /* its own connection for takes, answered in the loop */
    int take_fd;             /* tq's socket as registered in ep, -1 for none */
    int taking;              /* a take was sent; its answer is awaited (the count asked) */
    CURLM *multi;
    job *active, *held;
    int nactive, nheld;
    job *ready, *ready_tail; /* leased, not started yet (FIFO) */
    int nready, prefetch;
    job *fin, *fin_tail;     /* finished this turn, for the writer */
    int nfin;
    CURL **pool;             /* idle easy handles, reused by the next jobs */
    int npool, pool_cap;
    target_cache *tc;
    int ep;                  /* epoll set of the transfers' sockets */
    curlep cep;              /* libcurl's multi handle on `ep` */
    h1_pool *h1;             /* plain http:// REST requests (HTTP_CLIENT=native) */
    job *spare;              /* recorded jobs' structs, cleared, for the next ones */
    int nspare, spare_max;
    unsigned seed;
    long long next_take, next_maint, next_extend, next_redis_log;
} worker;

static long long wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void aw_job_free(job *j)
{
    if (!j)
        return;
    aw_job_clear(j);
    free(j);
}

void aw_job_clear(job *j)
{
    if (j->easy)
        curl_easy_cleanup(j->easy);
    curl_slist_free_all(j->hdrs);
    curl_slist_free_all(j->resolve_list);
    free(j->body);
    buf_free(&j->resp);
    buf_free(&j->req);
    jarena_free(j->doc, j->arena);
    cJSON_Delete(j->response);
    free(j->response_text);
    free(j->trigger_name);
    free(j->token);
    free(j->ack_payload);
    free(j->raw);
    memset(j, 0, sizeof(*j));
}

static int jint(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < 1e6 ? (int)v->valuedouble : 0;
}

/* A job as taken: its bytes only (takes ownership of `raw`). It is
 * parsed when it starts (job_parse), not when taken: a take brings up to
 * TAKE_BATCH jobs at once, and parsing them all in one go would hold the
 * loop while responses wait. NULL on OOM. */
static job *job_new(worker *w, char *raw)
{
    job *j = w->spare;

    if (j) {
        w->spare = j->next;
        w->nspare--;
        j->next = NULL;
    } else {
        j = calloc(1, sizeof(*j));
    }

    if (!j) {
        free(raw);
        return NULL;
    }
    j->raw = raw;
    j->tcache = w->tc;
    j->retry_after_hdr = -1;
    buf_init(&j->resp, 0);
    return j;
}

/* Parses j->raw; a job that cannot be understood gets OUT_INVALID. */
static void job_parse(job *j)
{
    const char *type;

    j->doc = jarena_parse(j->raw, &j->arena);
    if (!cJSON_IsObject(j->doc)) {
        deliver_fail(j, OUT_INVALID, "job is not a JSON object");
        return;
    }
    j->id = jget_str(j->doc, "id");
    j->trigger_id = jget_str(j->doc, "trigger_id");
    j->event_id = jget_str(j->doc, "event_id");
    j->action_type = type = jget_str(j->doc, "action_type");
    j->config = cJSON_GetObjectItemCaseSensitive(j->doc, "config");
    j->event = cJSON_GetObjectItemCaseSensitive(j->doc, "event");
    j->attempt = jint(j->doc, "attempt");
    j->throttled = jint(j->doc, "throttled");
    if (!j->event_id && cJSON_IsObject(j->event))
        j->event_id = jget_str(j->event, "id");
    if (!j->id || !type || !cJSON_IsObject(j->config)) {
        deliver_fail(j, OUT_INVALID, "job lacks id, action_type or config");
        return;
    }
    if (!strcmp(type, "rest") || !strcmp(type, "webhook"))
        j->kind = ACT_REST;
    else if (!strcmp(type, "telegram"))
        j->kind = ACT_TELEGRAM;
    else if (!strcmp(type, "mcp"))
        j->kind = ACT_MCP;
    else
        deliver_fail(j, OUT_INVALID, "unknown action_type");
}

static void push(job **list, int *n, job *j)
{
    j->next = *list;
    *list = j;
    (*n)++;
}

static void unlink_job(job **list, int *n, job *j)
{
    for (job **pp = list; *pp; pp = &(*pp)->next)
        if (*pp == j) {
            *pp = j->next;
            j->next = NULL;
            (*n)--;
            return;
        }
}

/* The job as it goes back to Redis: the next attempt number and what went
 * wrong, for the dead-letter list and for whoever looks at the queue. */
#ifdef AE_FAULTS
/* Test builds only (build/tests/action-workers-faults): with
 * AE_FAULT_PAYLOAD_OOM=1 every retry or dead-letter payload fails as if
 * memory ran out, so the tests can see what that path does. */
static int fault_payload_oom(void)
{
    const char *v = getenv("AE_FAULT_PAYLOAD_OOM");

    return v && v[0] == '1';
}
#else
#define fault_payload_oom() 0
#endif

static char *next_payload(job *j, int attempt, int throttled, int keep_pace)
{
    cJSON *d = fault_payload_oom() ? NULL : cJSON_Duplicate(j->doc, 1);
    char *s;

    if (!d)
        return NULL;
    if (!keep_pace || j->pace_slot)
        cJSON_DeleteItemFromObjectCaseSensitive(d, "pace_slot");
    if (keep_pace && j->pace_slot)
        cJSON_AddNumberToObject(d, "pace_slot", (double)j->pace_slot);
    cJSON_DeleteItemFromObjectCaseSensitive(d, "attempt");
    cJSON_AddNumberToObject(d, "attempt", attempt);
    cJSON_DeleteItemFromObjectCaseSensitive(d, "throttled");
    if (throttled)
        cJSON_AddNumberToObject(d, "throttled", throttled);
    if (j->err[0]) {
        cJSON_DeleteItemFromObjectCaseSensitive(d, "last_error");
        cJSON_AddStringToObject(d, "last_error", j->err);
    }
    s = cJSON_PrintUnformatted(d);
    cJSON_Delete(d);
    return s;
}

static const char *kind_name(act_kind k)
{
    return k == ACT_REST ? "rest" : k == ACT_TELEGRAM ? "telegram" : "mcp";
}

/* Decides what the outcome means for the job: its action_results status
 * and what Redis should do with it. */
static void finish(worker *w, job *j, long long now)
{
    aw *app = w->app;
    char e_oom[200];

    j->executed_at = j->t0 ? j->t0 : now;
    j->duration_ms = (long)(now - j->executed_at);
    if (j->breaker_fail > 0)
        breaker_report(app->br, j->host, 0, now);
    else if (j->breaker_fail < 0)
        breaker_report(app->br, j->host, 1, now);
    switch (j->out) {
    case OUT_SUCCESS:
        j->status_text = "success";
        j->ack_kind = QUEUE_DONE;
        break;
    case OUT_FINAL:
        j->status_text = "failed";
        j->ack_kind = QUEUE_DONE;
        break;
    case OUT_RETRY: {
        int throttled = j->throttled + (j->throttle ? 1 : 0);
        int used = j->attempt + 1 - throttled;

        if (used >= app->cfg.max_attempts || throttled > 50) {
            j->status_text = "dead";
            j->ack_kind = QUEUE_DEAD;
            j->ack_payload = next_payload(j, j->attempt + 1, throttled, 0);
        } else {
            long delay = j->delay_ms > 0 ? j->delay_ms
                                         : backoff_delay_ms(app->cfg.retry_base_ms, app->cfg.retry_max_ms,
                                                            used - 1, &w->seed);

            j->status_text = "retrying";
            j->ack_kind = QUEUE_RETRY;
            j->due_ms = now + delay;
            j->ack_payload = next_payload(j, j->attempt + 1, throttled, 0);
        }
        break;
    }
    case OUT_DEFER:
        j->row_done = 1;
        j->ack_kind = QUEUE_RETRY;
        j->due_ms = now + (j->delay_ms > 0 ? j->delay_ms : 1000);
        j->ack_payload = next_payload(j, j->attempt, j->throttled, 1);
        awm_event("deferred", 1);
        break;
    default:
        j->row_done = 1;
        j->ack_kind = QUEUE_DEAD;
        j->ack_payload = strdup(j->raw);
        log_event(LOG_ERROR, "invalid job dead-lettered", "\"reason\":\"%s\"", j->err);
        awm_event("invalid", 1);
        break;
    }
    if (j->out != OUT_DEFER && j->out != OUT_INVALID) {
        char e[600];

        awm_outcome(j->kind, j->status_text, (double)j->duration_ms / 1000.0);
        if (j->out == OUT_SUCCESS)
            log_event(LOG_DEBUG, "delivered", "\"job_id\":\"%s\",\"action_type\":\"%s\",\"duration_ms\":%ld",
                      log_escape(e, sizeof(e), j->id), kind_name(j->kind), j->duration_ms);
        else {
            char id[200];

            log_event(LOG_WARN, "delivery failed",
                      "\"job_id\":\"%s\",\"action_type\":\"%s\",\"status\":\"%s\",\"attempt\":%d,\"error\":\"%s\"",
                      log_escape(id, sizeof(id), j->id), kind_name(j->kind), j->status_text, j->attempt,
                      log_escape(e, sizeof(e), j->err));
        }
    }
    if ((j->ack_kind == QUEUE_RETRY || j->ack_kind == QUEUE_DEAD) && !j->ack_payload) {
        /* Out of memory: leave the job leased (no result row, nothing
         * recorded in Redis); when its lease runs out the reaper puts it
         * back on the list and the attempt runs again. */
        j->ack_kind = QUEUE_KEEP;
        j->row_done = 1;
        j->out = OUT_NONE;
        log_event(LOG_ERROR, "out of memory: job left leased for the reaper", "\"job_id\":\"%s\"",
                  log_escape(e_oom, sizeof(e_oom), j->id));
    }
    /* The transfer's resources go back to the thread at once; the writer
     * needs only the outcome. */
    if (j->easy) {
        if (w->npool < w->pool_cap)
            w->pool[w->npool++] = j->easy;
        else
            curl_easy_cleanup(j->easy);
        j->easy = NULL;
    }
    curl_slist_free_all(j->hdrs);
    j->hdrs = NULL;
    curl_slist_free_all(j->resolve_list);
    j->resolve_list = NULL;
    free(j->body);
    j->body = NULL;
    buf_free(&j->resp);
    buf_free(&j->req);
    j->h1req = NULL;
    j->next = NULL;
    if (w->fin_tail)
        w->fin_tail->next = j;
    else
        w->fin = j;
    w->fin_tail = j;
    w->nfin++;
}

static void start(worker *w, job *j, long long now)
{
    int rc;

    if (!j->doc && j->out == OUT_NONE)
        job_parse(j);
    if (!j->easy && w->npool)
        j->easy = w->pool[--w->npool];
    rc = j->out == OUT_INVALID ? 1 : deliver_begin(w->app, w->q, j, now);

    if (rc == 0 && j->native) {
        h1_request rq = {j->host, (const struct sockaddr *)&j->ti.addr, j->ti.addrlen, j->req.p, j->req.len,
                         j->timeout_ms, j->head_only, &j->resp, deliver_header_line, j,
                         j->tls ? j->ti.host : NULL};

        if (!w->h1 || h1_start(w->h1, &rq, now, &j->h1req) < 0) {
            deliver_fail(j, OUT_RETRY, "cannot start the transfer");
            rc = 1;
        }
    } else if (rc == 0 && curl_multi_add_handle(w->multi, j->easy) != CURLM_OK) {
        deliver_fail(j, OUT_RETRY, "cannot start the transfer");
        rc = 1;
    }
    if (rc == 0) {
        push(&w->active, &w->nactive, j);
        awm_inflight_add(1);
    } else if (rc == 2) {
        push(&w->held, &w->nheld, j);
    } else {
        finish(w, j, now);
    }
}

/* How many jobs to take now: enough to fill the free slots plus a
 * prefetch, so that slots freed by completions are refilled from memory
 * without waiting for Redis; asked in batches of at least TAKE_MIN while
 * some are still ready. */
static int take_want(worker *w, long long now)
{
    int want = w->cap - w->nactive - w->nheld + w->prefetch - w->nready;

    if (w->taking || svc_stopping() || now < w->next_take || want <= 0 || (w->nready && want < TAKE_MIN))
        return 0;
    /* Finished jobs waiting to be recorded do not hold a delivery slot
     * (deliveries go on while a batch is written), but they are bounded
     * too: past AW_PENDING_PER_SLOT times the slots of the process, no new
     * job is taken. */
    if (writer_pending(w->app->writer) >= AW_PENDING_PER_SLOT * w->app->cfg.concurrency)
        return 0;
    return want > TAKE_BATCH ? TAKE_BATCH : want;
}

/* Appends taken jobs to the ready list. An empty answer means the queue
 * is idle: poll again later. A full one means there may be more: ask
 * again at once. */
static void took(worker *w, char **raws, int n, int want, long long now)
{
    w->next_take = n < want ? now + w->app->cfg.poll_ms : now;
    for (int i = 0; i < n; i++) {
        job *j = job_new(w, raws[i]);

        if (!j)
            continue;
        if (w->ready_tail)
            w->ready_tail->next = j;
        else
            w->ready = j;
        w->ready_tail = j;
        w->nready++;
    }
    free(raws);
}

static void take_failed(worker *w, long long now)
{
    if (now >= w->next_redis_log) {
        log_event(LOG_WARN, "redis unavailable", "\"error\":\"%s\"", queue_errstr(w->tq));
        w->next_redis_log = now + 10000;
    }
    w->next_take = now + 500;
}

/* Sends a take when one is due. The loop does not wait for its answer:
 * the deliveries in flight go on, and the answer is read when epoll
 * reports it (take_answer). */
static void take(worker *w, long long now)
{
    int want = take_want(w, now), fd;

    if (!want)
        return;
    fd = queue_take_send(w->tq, want, now + w->app->cfg.visibility_ms);
    if (fd < 0) {
        /* The connection was dropped (closing its socket took it out of
         * the set); the next one is registered anew, even if it gets the
         * same descriptor number. */
        w->take_fd = -1;
        take_failed(w, now);
        return;
    }
    if (fd != w->take_fd) {
        /* A new connection (the first, or after a failure). */
        struct epoll_event ev;

        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.u64 = TAKE_TAG;
        if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) < 0 && epoll_ctl(w->ep, EPOLL_CTL_MOD, fd, &ev) < 0) {
            /* Without the event the answer would never be read: wait for
             * it here instead. */
            char **raws = NULL;
            int n = 0;

            if (queue_take_recv(w->tq, 1, &raws, &n) < 0) {
                take_failed(w, now);
                return;
            }
            took(w, raws, n, want, now);
            return;
        }
        w->take_fd = fd;
    }
    w->taking = want;
}

/* Reads the answer of the take in flight; `block` waits for it. */
static void take_answer(worker *w, int block, long long now)
{
    char **raws = NULL;
    int n = 0, want = w->taking, r;

    if (!w->taking)
        return;
    r = queue_take_recv(w->tq, block, &raws, &n);
    if (r == 0)
        return;
    w->taking = 0;
    if (r < 0) {
        /* The connection is gone; its socket leaves the set when closed. */
        w->take_fd = -1;
        take_failed(w, now);
        return;
    }
    took(w, raws, n, want, now);
}

/* Starts ready jobs while there are free slots. */
static void start_ready(worker *w, long long now)
{
    while (w->ready && w->nactive + w->nheld < w->cap) {
        job *j = w->ready;

        w->ready = j->next;
        if (!w->ready)
            w->ready_tail = NULL;
        j->next = NULL;
        w->nready--;
        start(w, j, now);
    }
}

static void run_held(worker *w, long long now)
{
    job *j = w->held, *next;

    for (; j; j = next) {
        next = j->next;
        if (j->start_at <= now) {
            unlink_job(&w->held, &w->nheld, j);
            start(w, j, now);
        }
    }
}

/* libcurl's codes for h1's errors, so that deliver_classify treats both
 * clients' failures alike. */
static CURLcode h1_code(int err)
{
    switch (err) {
    case H1_OK:
        return CURLE_OK;
    case H1_E_TIMEOUT:
        return CURLE_OPERATION_TIMEDOUT;
    case H1_E_CONNECT:
        return CURLE_COULDNT_CONNECT;
    case H1_E_SEND:
        return CURLE_SEND_ERROR;
    case H1_E_RECV:
        return CURLE_RECV_ERROR;
    case H1_E_NOTHING:
        return CURLE_GOT_NOTHING;
    case H1_E_PARTIAL:
        return CURLE_PARTIAL_FILE;
    case H1_E_NOMEM:
        return CURLE_OUT_OF_MEMORY;
    case H1_E_TLS_VERIFY:
        return CURLE_PEER_FAILED_VERIFICATION;
    case H1_E_TLS:
        return CURLE_SSL_CONNECT_ERROR;
    default:
        return CURLE_WEIRD_SERVER_REPLY;
    }
}

/* A transfer is over and nothing follows it: out of the active list, and
 * on to its outcome (a retry when the delivery never set one). */
static void retire(worker *w, job *j, long long now)
{
    unlink_job(&w->active, &w->nactive, j);
    awm_inflight_add(-1);
    if (j->out == OUT_NONE)
        deliver_fail(j, OUT_RETRY, "transfer could not continue");
    finish(w, j, now);
}

static void completed(worker *w, long long now)
{
    CURLMsg *m;
    int left, err;
    void *ud;
    long status;
    char detail[CURL_ERROR_SIZE];

    while (w->h1 && (err = h1_next_done(w->h1, &ud, &status, detail, sizeof(detail))) >= 0) {
        job *j = ud;

        j->h1req = NULL;
        j->status = status;
        /* Where libcurl would have written it (deliver_classify reads it). */
        fmt_copy(j->curl_err, sizeof(j->curl_err), detail);
        /* The same outcome code as a libcurl transfer; a kind that wants
         * another request (only MCP does, and it never uses h1) would get
         * a libcurl one. */
        if (deliver_done(w->app, w->q, j, h1_code(err), now) == 0 && !j->native && j->easy &&
            curl_multi_add_handle(w->multi, j->easy) == CURLM_OK)
            continue;
        retire(w, j, now);
    }

    while ((m = curl_multi_info_read(w->multi, &left))) {
        job *j = NULL;

        if (m->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&j);
        {
            CURLcode rc = m->data.result;

            curl_multi_remove_handle(w->multi, m->easy_handle);
            if (deliver_done(w->app, w->q, j, rc, now) == 0 && curl_multi_add_handle(w->multi, j->easy) == CURLM_OK)
                continue;
        }
        retire(w, j, now);
    }
}

/* Frees the jobs the writer has recorded, here, in the thread that
 * allocated them, and keeps their structs for the next jobs, up to as many
 * as can be alive at once (a job is a few KiB: allocating and freeing one
 * each time goes past malloc's per-thread cache, and freeing a batch of
 * them made glibc consolidate its free lists). */
static void recycle(worker *w)
{
    job *j = writer_reap(w->app->writer), *next;

    for (; j; j = next) {
        next = j->next;
        if (w->nspare < w->spare_max) {
            aw_job_clear(j);
            j->next = w->spare;
            w->spare = j;
            w->nspare++;
        } else {
            aw_job_free(j);
        }
    }
}

/* Hands this turn's finished jobs to the writer. */
static void submit(worker *w)
{
    writer_submit(w->app->writer, w->fin, w->fin_tail, w->nfin);
    w->fin = w->fin_tail = NULL;
    w->nfin = 0;
}

static void extend_leases(worker *w, long long now)
{
    int n = w->nactive + w->nheld + w->nready, k = 0;
    char **raws;

    if (now < w->next_extend)
        return;
    w->next_extend = now + w->app->cfg.visibility_ms / 3;
    if (!n)
        return;
    raws = calloc((size_t)n, sizeof(*raws));
    if (!raws)
        return;
    for (job *j = w->active; j; j = j->next)
        raws[k++] = j->raw;
    for (job *j = w->held; j; j = j->next)
        raws[k++] = j->raw;
    for (job *j = w->ready; j; j = j->next)
        raws[k++] = j->raw;
    if (queue_extend(w->q, raws, k, now + w->app->cfg.visibility_ms) < 0)
        w->next_extend = now + 500;
    free(raws);
}

static void maintain(worker *w, long long now)
{
    int moved = 0, reaped = 0;

    if (now < w->next_maint)
        return;
    w->next_maint = now + MAINT_EVERY_MS;
    if (queue_maintain(w->q, now, MAINT_LIMIT, &moved, &reaped) < 0)
        return;
    if (reaped) {
        log_event(LOG_WARN, "leases expired; jobs requeued", "\"count\":%d", reaped);
        awm_event("reaped", reaped);
    }
    if (moved || reaped)
        w->next_take = now;
}

/* Hands the jobs of `list` back to the queue untouched and frees them. */
static void release_list(worker *w, job *list, int transfers)
{
    queue_ack acks[RELEASE_BATCH];
    int n = 0;

    for (job *j = list; j; j = j->next) {
        if (transfers && j->h1req) {
            h1_cancel(w->h1, j->h1req);
            j->h1req = NULL;
        } else if (transfers && j->easy) {
            curl_multi_remove_handle(w->multi, j->easy);
        }
        if (n < RELEASE_BATCH) {
            acks[n].raw = j->raw;
            acks[n].kind = QUEUE_RELEASE;
            acks[n].payload = NULL;
            acks[n].due_ms = 0;
            acks[n].done = 0;
            n++;
        }
    }
    if (n)
        queue_record(w->q, acks, n);
    while (list) {
        job *j = list;

        list = j->next;
        aw_job_free(j);
    }
}

/* On SIGTERM, jobs taken ahead but not started go back at once, with
 * those of a take still in flight (its answer is waited for). */
static void release_ready(worker *w)
{
    take_answer(w, 1, wall_ms());
    if (!w->ready)
        return;
    release_list(w, w->ready, 0);
    w->ready = w->ready_tail = NULL;
    w->nready = 0;
}

/* At the end of the grace period, unfinished deliveries are abandoned and
 * their jobs handed back to the queue untouched. */
static void release_all(worker *w)
{
    log_event(LOG_WARN, "grace period over; unfinished jobs handed back", "\"count\":%d", w->nactive + w->nheld);
    awm_inflight_add(-w->nactive);
    release_list(w, w->active, 1);
    release_list(w, w->held, 0);
    w->active = w->held = NULL;
    w->nactive = w->nheld = 0;
}

static int poll_timeout(worker *w, long long now)
{
    long long t = now + w->app->cfg.poll_ms;

    if (w->ready && w->nactive + w->nheld < w->cap)
        t = now;
    /* Only when a take would really be sent then (take_want: not while one
     * is in flight, and not for fewer than TAKE_MIN while jobs are ready);
     * waking for less would spin the loop with zero timeouts. */
    if (w->next_take < t && take_want(w, w->next_take > now ? w->next_take : now) > 0)
        t = w->next_take;
    for (job *j = w->held; j; j = j->next)
        if (j->start_at < t)
            t = j->start_at;
    if (t < now)
        t = now;
    return (int)(t - now);
}

/* Waits up to timeout_ms for socket events and lets libcurl act on them
 * and on its due timers. */
static void run_transfers(worker *w, int timeout_ms)
{
    struct epoll_event evs[128];
    int n;
    long long now;

    long long h1_due = w->h1 ? h1_next_due(w->h1) : -1;

    if (w->cep.due >= 0 || h1_due >= 0) {
        long long due = w->cep.due < 0 ? h1_due : h1_due < 0 || w->cep.due < h1_due ? w->cep.due : h1_due;
        long long left = due - wall_ms();

        if (left < timeout_ms)
            timeout_ms = left < 0 ? 0 : (int)left;
    }
    n = epoll_wait(w->ep, evs, 128, timeout_ms);
    now = n > 0 ? wall_ms() : 0;
    for (int i = 0; i < n; i++) {
        if (evs[i].data.u64 & H1_TAG) {
            h1_event(w->h1, evs[i].data.u64, evs[i].events, now);
            continue;
        }
        if (evs[i].data.u64 == TAKE_TAG) {
            if (w->taking) {
                take_answer(w, 0, now);
            } else {
                /* Nothing is expected on this connection: the server
                 * closed it (or sent something unasked). Drop it, which
                 * also takes its socket out of the set; otherwise the
                 * event would fire at every turn. */
                queue_take_drop(w->tq);
                w->take_fd = -1;
            }
            continue;
        }
        curlep_event(&w->cep, evs[i].data.fd, evs[i].events);
    }
    now = wall_ms();
    if (w->h1 && h1_due >= 0 && now >= h1_due)
        h1_expire(w->h1, now);
    curlep_expire(&w->cep, now);
}

void *worker_run(void *arg)
{
    worker_args *a = arg;
    worker w;
    long long drain_deadline = 0;

    memset(&w, 0, sizeof(w));
    w.app = a->app;
    w.idx = a->index;
    w.cap = a->capacity;
    w.seed = (unsigned)(time(NULL) ^ (a->index * 7919));
    /* A prefetch of eight times the slots (at most two takes) keeps the
     * slots busy while the next batch is being taken: under load a take
     * waits for Redis to be scheduled and to lease the batch (a
     * millisecond or more on a busy machine). With one take's worth, the
     * loop found no job ready for a free slot in 12% of its turns and the
     * slots averaged 57 of 64 busy; with two, 63.5. */
    w.prefetch = w.cap * 8 < 2 * TAKE_BATCH ? w.cap * 8 : 2 * TAKE_BATCH;
    /* Jobs alive at once: taken ahead, in the slots, and waiting for the
     * writer (this thread's share of the process's bound). */
    w.spare_max = w.prefetch + w.cap + (int)AW_PENDING_PER_SLOT * w.cap;
    w.pool_cap = w.cap + 8;
    w.pool = calloc((size_t)w.pool_cap, sizeof(*w.pool));
    w.tc = target_cache_new(TARGET_TTL_MS);
    w.q = queue_new(&w.app->cfg.redis, w.app->cfg.queue_prefix, 5000);
    w.tq = queue_new(&w.app->cfg.redis, w.app->cfg.queue_prefix, 5000);
    w.take_fd = -1;
    w.multi = curl_multi_init();
    w.ep = epoll_create1(EPOLL_CLOEXEC);
    /* As many connections as libcurl's cache would keep (twice the slots),
     * at most a slot's worth idle per host. */
    if (w.app->cfg.native_http && w.ep >= 0)
        w.h1 = h1_pool_new(w.ep, w.cap * 2 + 8, w.cap, w.app->tls);
    if (!w.q || !w.tq || !w.multi || !w.pool || !w.tc || w.ep < 0 || (w.app->cfg.native_http && !w.h1)) {
        log_error("worker %d: out of memory", w.idx);
        svc_request_stop();
        goto out;
    }
    curl_multi_setopt(w.multi, CURLMOPT_MAXCONNECTS, (long)(w.cap * 2));
    curlep_init(&w.cep, w.multi, w.ep, wall_ms);
    for (;;) {
        long long now = wall_ms();

        if (svc_stopping()) {
            if (!drain_deadline) {
                drain_deadline = now + w.app->cfg.shutdown_grace_ms;
                log_event(LOG_INFO, "worker draining", "\"worker\":%d,\"in_flight\":%d", w.idx, w.nactive + w.nheld);
                release_ready(&w);
            }
            if (now >= drain_deadline && (w.nactive || w.nheld))
                release_all(&w);
            if (!w.nactive && !w.nheld)
                break;
        } else {
            maintain(&w, now);
            take(&w, now);
            start_ready(&w, now);
        }
        run_held(&w, now);
        run_transfers(&w, poll_timeout(&w, wall_ms()));
        now = wall_ms();
        completed(&w, now);
        submit(&w);
        recycle(&w);
        if (!svc_stopping()) {
            /* Refill the slots just freed before sleeping. */
            take(&w, now);
            start_ready(&w, now);
        }
        extend_leases(&w, now);
    }
out:
    submit(&w);
    release_ready(&w);
    while (w.npool)
        curl_easy_cleanup(w.pool[--w.npool]);
    free(w.pool);
    if (w.multi)
        curl_multi_cleanup(w.multi);
    h1_pool_free(w.h1);
    if (w.ep >= 0)
        close(w.ep);
    while (w.spare) {
        job *j = w.spare;

        w.spare = j->next;
        free(j);
    }
    target_cache_free(w.tc);
    queue_free(w.tq);
    queue_free(w.q);
    return NULL;
}
