/* worker: one event-loop thread. It leases jobs from Redis, drives up to
 * its share of WORKER_CONCURRENCY deliveries at once through one libcurl
 * multi handle (no thread per delivery), writes each attempt's result to
 * PostgreSQL and only then records the outcome in Redis.
 *
 * A job stays leased in action_jobs_inflight until its outcome is recorded,
 * and the thread extends the leases of everything it holds every third of
 * the visibility timeout. So a job is never lost: if the process dies the
 * lease runs out and the job is delivered again; if PostgreSQL is down the
 * finished job waits here (still leased) until its row is written; if Redis
 * is down the ack waits until it is back. Delivery is at least once, which
 * is why every request carries the job id as an idempotency key. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aw.h"
#include "backoff.h"
#include "log.h"
#include "queue.h"
#include "svc.h"

#define FLUSH_BATCH 256
#define TAKE_BATCH 64
#define MAINT_EVERY_MS 200
#define MAINT_LIMIT 500
#define FLUSH_DELAY_MS 5

typedef struct {
    aw *app;
    int idx, cap;
    queue *q;
    CURLM *multi;
    job *active, *held, *done;
    int nactive, nheld, ndone;
    unsigned seed;
    long long next_take, next_maint, next_extend, next_db_log, next_redis_log;
    long long first_done; /* when the oldest unrecorded outcome finished */
} worker;

static long long wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void job_free(job *j)
{
    if (!j)
        return;
    if (j->easy)
        curl_easy_cleanup(j->easy);
    curl_slist_free_all(j->hdrs);
    curl_slist_free_all(j->resolve_list);
    free(j->body);
    buf_free(&j->resp);
    cJSON_Delete(j->doc);
    cJSON_Delete(j->response);
    free(j->trigger_name);
    free(j->token);
    free(j->ack_payload);
    free(j->raw);
    free(j);
}

static const char *jstr(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static int jint(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < 1e6 ? (int)v->valuedouble : 0;
}

/* Takes ownership of `raw`. Never returns NULL except on OOM; a job that
 * cannot be understood gets OUT_INVALID. */
static job *job_parse(char *raw)
{
    job *j = calloc(1, sizeof(*j));
    const char *type;

    if (!j) {
        free(raw);
        return NULL;
    }
    j->raw = raw;
    j->retry_after_hdr = -1;
    buf_init(&j->resp, 0);
    j->doc = cJSON_Parse(raw);
    if (!cJSON_IsObject(j->doc)) {
        deliver_fail(j, OUT_INVALID, "job is not a JSON object");
        return j;
    }
    j->id = jstr(j->doc, "id");
    j->trigger_id = jstr(j->doc, "trigger_id");
    j->event_id = jstr(j->doc, "event_id");
    j->action_type = type = jstr(j->doc, "action_type");
    j->config = cJSON_GetObjectItemCaseSensitive(j->doc, "config");
    j->event = cJSON_GetObjectItemCaseSensitive(j->doc, "event");
    j->attempt = jint(j->doc, "attempt");
    j->throttled = jint(j->doc, "throttled");
    if (!j->event_id && cJSON_IsObject(j->event))
        j->event_id = jstr(j->event, "id");
    if (!j->id || !type || !cJSON_IsObject(j->config)) {
        deliver_fail(j, OUT_INVALID, "job lacks id, action_type or config");
        return j;
    }
    if (!strcmp(type, "rest") || !strcmp(type, "webhook"))
        j->kind = ACT_REST;
    else if (!strcmp(type, "telegram"))
        j->kind = ACT_TELEGRAM;
    else if (!strcmp(type, "mcp"))
        j->kind = ACT_MCP;
    else
        deliver_fail(j, OUT_INVALID, "unknown action_type");
    return j;
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
static char *next_payload(job *j, int attempt, int throttled, int keep_pace)
{
    cJSON *d = cJSON_Duplicate(j->doc, 1);
    char *s;

    if (!d)
        return NULL;
    cJSON_DeleteItemFromObjectCaseSensitive(d, "attempt");
    cJSON_AddNumberToObject(d, "attempt", attempt);
    cJSON_DeleteItemFromObjectCaseSensitive(d, "throttled");
    if (throttled)
        cJSON_AddNumberToObject(d, "throttled", throttled);
    if (!keep_pace)
        cJSON_DeleteItemFromObjectCaseSensitive(d, "pace_slot");
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
        /* Out of memory: leave the job leased; the reaper brings it back. */
        j->ack_kind = QUEUE_DONE;
        j->row_done = 1;
        j->out = OUT_NONE;
    }
    if (!w->ndone)
        w->first_done = now;
    push(&w->done, &w->ndone, j);
}

static void start(worker *w, job *j, long long now)
{
    int rc = j->out == OUT_INVALID ? 1 : deliver_begin(w->app, w->q, j, now);

    if (rc == 0 && curl_multi_add_handle(w->multi, j->easy) != CURLM_OK) {
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

static void take(worker *w, long long now)
{
    /* Finished jobs waiting for their outcome to be recorded do not hold a
     * delivery slot (deliveries go on while a batch is written), but they
     * are bounded too: past 4x the slots no new job is taken. */
    int room = w->cap - w->nactive - w->nheld, n = 0;
    char **raws = NULL;

    if (room <= 0 || w->ndone >= 4 * w->cap || now < w->next_take)
        return;
    if (room > TAKE_BATCH)
        room = TAKE_BATCH;
    if (queue_take(w->q, room, now + w->app->cfg.visibility_ms, &raws, &n) < 0) {
        if (now >= w->next_redis_log) {
            log_event(LOG_WARN, "redis unavailable", "\"error\":\"%s\"", queue_errstr(w->q));
            w->next_redis_log = now + 10000;
        }
        w->next_take = now + 500;
        return;
    }
    /* An empty answer means the queue is idle: poll again later. A full one
     * means there may be more: ask again at once. */
    w->next_take = n < room ? now + w->app->cfg.poll_ms : now;
    for (int i = 0; i < n; i++) {
        job *j = job_parse(raws[i]);

        if (j)
            start(w, j, now);
    }
    free(raws);
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

static void completed(worker *w, long long now)
{
    CURLMsg *m;
    int left;

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
        unlink_job(&w->active, &w->nactive, j);
        awm_inflight_add(-1);
        if (j->out == OUT_NONE)
            deliver_fail(j, OUT_RETRY, "transfer could not continue");
        finish(w, j, now);
    }
}

/* Writes pending rows, then records outcomes in Redis, then frees. */
static void flush(worker *w, long long now)
{
    job *batch[FLUSH_BATCH];
    queue_ack acks[FLUSH_BATCH];
    int n = 0;
    char err[512];

    /* Outcomes are recorded in batches (one INSERT and one Redis pipeline
     * for many jobs): at once when half the slots wait, else after a few
     * milliseconds, so a single job is not held back noticeably. */
    if (!w->ndone || (w->ndone < w->cap && now - w->first_done < FLUSH_DELAY_MS && !svc_stopping()))
        return;
    for (job *j = w->done; j && n < FLUSH_BATCH; j = j->next)
        if (!j->row_done)
            batch[n++] = j;
    if (n) {
        if (results_write(w->app, batch, n, err, sizeof(err)) == 0) {
            for (int i = 0; i < n; i++)
                batch[i]->row_done = 1;
        } else if (now >= w->next_db_log) {
            char e[600];

            log_event(LOG_WARN, "cannot write action_results; jobs stay leased", "\"pending\":%d,\"error\":\"%s\"",
                      w->ndone, log_escape(e, sizeof(e), err));
            w->next_db_log = now + 10000;
        }
    }
    n = 0;
    for (job *j = w->done; j && n < FLUSH_BATCH; j = j->next)
        if (j->row_done) {
            batch[n] = j;
            acks[n].raw = j->raw;
            acks[n].kind = (queue_ack_kind)j->ack_kind;
            acks[n].payload = j->ack_payload;
            acks[n].due_ms = j->due_ms;
            acks[n].done = 0;
            n++;
        }
    if (!n)
        return;
    if (queue_record(w->q, acks, n) < 0 && now >= w->next_redis_log) {
        log_event(LOG_WARN, "cannot record outcomes in redis; will retry", "\"error\":\"%s\"", queue_errstr(w->q));
        w->next_redis_log = now + 10000;
    }
    for (int i = 0; i < n; i++)
        if (acks[i].done) {
            unlink_job(&w->done, &w->ndone, batch[i]);
            job_free(batch[i]);
        }
    w->first_done = now;
}

static void extend_leases(worker *w, long long now)
{
    int n = w->nactive + w->nheld + w->ndone, k = 0;
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
    for (job *j = w->done; j; j = j->next)
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

/* At the end of the grace period, unfinished deliveries are abandoned and
 * their jobs handed back to the queue untouched. */
static void release_all(worker *w)
{
    job *lists[2] = {w->active, w->held};
    queue_ack acks[FLUSH_BATCH];
    int n = 0;

    for (int l = 0; l < 2; l++)
        for (job *j = lists[l]; j; j = j->next) {
            if (l == 0)
                curl_multi_remove_handle(w->multi, j->easy);
            if (n < FLUSH_BATCH) {
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
    log_event(LOG_WARN, "grace period over; unfinished jobs handed back", "\"count\":%d", n);
    awm_inflight_add(-w->nactive);
    while (w->active) {
        job *j = w->active;

        w->active = j->next;
        job_free(j);
    }
    while (w->held) {
        job *j = w->held;

        w->held = j->next;
        job_free(j);
    }
    w->nactive = w->nheld = 0;
}

static int poll_timeout(worker *w, long long now)
{
    long long t = now + w->app->cfg.poll_ms;

    if (w->nactive + w->nheld < w->cap && w->ndone < 4 * w->cap && w->next_take < t)
        t = w->next_take;
    if (w->ndone && w->first_done + FLUSH_DELAY_MS < t)
        t = w->first_done + FLUSH_DELAY_MS;
    for (job *j = w->held; j; j = j->next)
        if (j->start_at < t)
            t = j->start_at;
    if (t < now)
        t = now;
    return (int)(t - now);
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
    w.q = queue_new(&w.app->cfg.redis, w.app->cfg.queue_prefix, 5000);
    w.multi = curl_multi_init();
    if (!w.q || !w.multi) {
        log_error("worker %d: out of memory", w.idx);
        svc_request_stop();
        goto out;
    }
    curl_multi_setopt(w.multi, CURLMOPT_MAXCONNECTS, (long)(w.cap * 2));
    for (;;) {
        long long now = wall_ms();
        int running = 0;

        if (svc_stopping()) {
            if (!drain_deadline) {
                drain_deadline = now + w.app->cfg.shutdown_grace_ms;
                log_event(LOG_INFO, "worker draining", "\"worker\":%d,\"in_flight\":%d", w.idx, w.nactive + w.nheld);
            }
            if (now >= drain_deadline && (w.nactive || w.nheld))
                release_all(&w);
            if (!w.nactive && !w.nheld && (!w.ndone || now >= drain_deadline + 2000))
                break;
        } else {
            maintain(&w, now);
            take(&w, now);
        }
        run_held(&w, now);
        curl_multi_perform(w.multi, &running);
        completed(&w, wall_ms());
        flush(&w, wall_ms());
        extend_leases(&w, wall_ms());
        now = wall_ms();
        curl_multi_poll(w.multi, NULL, 0, poll_timeout(&w, now), NULL);
    }
    if (w.ndone)
        log_event(LOG_WARN, "outcomes not recorded at exit; their jobs will be redelivered", "\"count\":%d", w.ndone);
out:
    while (w.done) {
        job *j = w.done;

        w.done = j->next;
        job_free(j);
    }
    if (w.multi)
        curl_multi_cleanup(w.multi);
    queue_free(w.q);
    return NULL;
}
