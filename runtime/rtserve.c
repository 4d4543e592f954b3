/* rtserve: the runtime's HTTP routes and Khala WebSocket on one port, over
 * libshared's wsapp (libwebsockets).
 *
 * wsapp runs every callback on its loop thread, which must not block; the
 * handlers block on PostgreSQL. So a request is copied into a job (the few
 * headers and query arguments the handlers read, the body, the route's
 * captured segment), deferred, and run by one of a fixed set of handler
 * threads; the answer goes back to the loop with wsapp_post. The job queue
 * is bounded: when it is full the request is answered 503 at once.
 *
 * Appends have their own queue and RUNTIME_APPEND_THREADS threads: each
 * takes every append queued (up to RTAPPEND_GROUP_MAX) and commits them in
 * one transaction (rtappend), so appends from many clients share a commit
 * and a WAL flush, and the database sees a few busy sessions instead of
 * one per client. A lone append is a group of one, written as before.
 *
 * Khala live delivery. A subscriber gets hello, then the messages after its
 * cursor read from the log by a handler thread (rtsync_read, at most a
 * poll's limit per read, again until it is caught up), then live messages.
 * Live messages come from PostgreSQL: a dedicated connection LISTENs on
 * runtime_khala, and the append's transaction NOTIFYs (at commit) for
 * topics that an instance registered in runtime.khala_listeners. A
 * notification carries the message; a subscriber whose cursor is just
 * below it gets it framed once and shared by every subscriber of the topic;
 * one that is further behind (or mid-read) reads the log again, so order
 * and gap-freedom never depend on the notifications. The subscriber table
 * is touched on the loop thread only. */
#include "rtserve.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


#include "backoff.h"
#include "buf.h"
#include "fmt.h"
#include "log.h"
#include "pglisten.h"
#include "randid.h"
#include "rtappend.h"
#include "rtpipe.h"
#include "rtroutes.h"
#include "rtsync.h"
#include "svc.h"
#include "wsapp.h"

#define RT_KEEP_HEADERS 4
#define RT_KEEP_QUERIES 5

static const char *const keep_headers[RT_KEEP_HEADERS] = {"Authorization", "Origin", "Prefer", "Content-Type"};
static const char *const keep_queries[RT_KEEP_QUERIES] = {"after_seq", "limit", "topic", "owner_user_id",
                                                          "owner_guest_scope"};

/* A PostgreSQL clock_timestamp()::text. */
#define RT_SETTLE_MAX 48
/* The longest a subscriber's settling read waits for older statements. */
#define RT_SETTLE_WAIT_MS 1000

typedef struct rt_job rt_job;
typedef void (*rt_job_fn)(rtserve *s, rt_job *j);

/* One piece of work for a handler thread, answered on the loop. */
struct rt_job {
    rt_job *next;
    rt_job_fn run;    /* on a handler thread */
    rt_job_fn done;   /* on the loop, then the job is freed */
    /* HTTP */
    wsapp_req *req;
    int gone;
    const rt_route *route;
    rt_req q;
    rt_params pp;
    char *hdr[RT_KEEP_HEADERS];
    char *qry[RT_KEEP_QUERIES];
    char *body;
    rt_resp a;
    rt_append *x;         /* prepared already (an append the pipe passed on); the appender takes it */
    rtserve *srv;
    wsapp_stream *stream; /* a long answer's body; the handler thread's until it ends */
    int streaming;        /* it began, and holds one of srv->streams_max */
    /* Khala */
    uint64_t conn_id;
    char topic[RT_TOPIC_MAX];
    long long after;
    rtsync_window w;
    cJSON *stale;
    int failed;
    char settle[RT_SETTLE_MAX]; /* see settle_wait */
};

/* A Khala subscriber: the WebSocket connection's user data. */
typedef struct rt_sub rt_sub;
struct rt_sub {
    wsapp_conn *conn;
    uint64_t id;
    char topic[RT_TOPIC_MAX];
    long long after;  /* the last sequence sent */
    char settle[RT_SETTLE_MAX]; /* its topic's row time, until the settling read takes it (settle_wait) */
    int reading;      /* a log read is in flight, or the backlog waits for the queue to drain */
    int again;        /* a message arrived during it: read again */
    int open;
    int waiting;      /* in the server's read_wait list (reading is set too) */
    rt_sub *next;     /* in its topic's list */
    rt_sub *wait_next; /* in the server's read_wait list */
    rtserve *srv;
    wsapp_timer *pace; /* while the backlog waits (NULL until first needed; freed at close) */
};

/* Backlog bytes queued on a subscriber before its read waits for them to
 * be written: half the send queue, the rest left for live messages. A page
 * of 200 messages of up to 256 KiB each queued in one loop turn passed the
 * queue's 1 MiB and dropped even a fast reader as too slow, at every
 * reconnect from the same cursor. */
#define RT_BACKLOG_BYTES (512 * 1024)

/* The topic's row in runtime.khala_listeners (appends NOTIFY only for
 * topics with a row). Jobs on handler threads write and remove it, one at
 * a time per topic, so that a DELETE and the next INSERT never race: the
 * topic is kept, without subscribers, until its DELETE is done. A row that
 * could not be written waits (ROW_WAIT) for the server's retry timer. */
enum { ROW_NONE, ROW_ADDING, ROW_LISTED, ROW_REMOVING, ROW_WAIT };

typedef struct rt_topic rt_topic;
struct rt_topic {
    char name[RT_TOPIC_MAX];
    rt_sub *subs;
    rt_topic *next;
    int row;                    /* ROW_* */
    char settle[RT_SETTLE_MAX]; /* the time just after the row committed ("" before) */
    int settled;                /* a read followed every statement older than that */
};

struct rtserve {
    rt *r;
    wsapp *app;
    int nthreads;
    pthread_t *threads;
    pthread_t appenders[RTSERVE_APPEND_THREADS_MAX];
    int nappenders, want_appenders;
    pglisten *listener;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rt_job *head, *tail;
    int queued;
    pthread_cond_t acv;     /* appends queued */
    rt_job *ahead, *atail;  /* appends, under mu */
    int aqueued;
    rtpipe *pipe;     /* appends answered without events, from the loop */
    int pipe_conns;
    _Atomic int stopping;
    _Atomic int streams_open; /* long answers being sent, each holding its handler thread */
    int streams_max;          /* at most half the handler threads, one at least */
    rt_topic *topics; /* loop thread only */
    /* Log reads of subscribers in the handler queue, at most nthreads:
     * past that a subscriber waits here, on the loop, in order. A
     * notification that sent every subscriber of a big topic to the log
     * (a LISTEN reconnect, a message past NOTIFY's size) filled the queue
     * that HTTP requests share: they got 503 and the readers 1013. */
    int reads_busy;
    rt_sub *read_wait, *read_wait_tail;
    wsapp_timer *row_retry; /* writes the rows of ROW_WAIT topics again; NULL once freed */
    backoff row_bo;         /* its delay: grows while rows cannot be written */
    int row_retry_armed;
    char instance[33];
};

/* ------------------------------------------------------------ jobs */

static void job_free(rt_job *j)
{
    int i;

    for (i = 0; i < RT_KEEP_HEADERS; i++)
        free(j->hdr[i]);
    for (i = 0; i < RT_KEEP_QUERIES; i++)
        free(j->qry[i]);
    free(j->body);
    rtappend_free(j->x);
    if (j->stream)
        wsapp_stream_end(j->stream, 0);
    cJSON_Delete(j->a.json);
    free(j->a.raw);
    cJSON_Delete(j->w.messages);
    cJSON_Delete(j->stale);
    free(j);
}

static int is_append(const rt_job *j)
{
    return j->route && j->route->fn == rt_h_run_append;
}

static int job_push(rtserve *s, rt_job *j)
{
    int app = is_append(j);
    rt_job **head = app ? &s->ahead : &s->head, **tail = app ? &s->atail : &s->tail;
    int *queued = app ? &s->aqueued : &s->queued;

    pthread_mutex_lock(&s->mu);
    if (s->stopping || *queued >= s->r->cfg.handler_queue_max) {
        pthread_mutex_unlock(&s->mu);
        return -1;
    }
    j->next = NULL;
    if (*tail)
        (*tail)->next = j;
    else
        *head = j;
    *tail = j;
    (*queued)++;
    pthread_cond_signal(app ? &s->acv : &s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

typedef struct {
    rtserve *s;
    rt_job *j;
} rt_post;

static void job_done_on_loop(wsapp *app, void *ud)
{
    rt_post *p = ud;

    (void)app;
    p->j->done(p->s, p->j);
    job_free(p->j);
    free(p);
}

/* Hands a finished job's answer to the loop. */
static void job_post(rtserve *s, rt_job *j)
{
    rt_post *p;
    int tries = 0;

    /* wsapp_post fails only when memory does (posts made during or after
     * a stop are still run, by wsapp_free). Freeing the job here would
     * leave its request's on_gone pointing at it, so wait for memory, up
     * to 5 s; past that the job is leaked rather than freed, and its
     * client waits for its timeout. */
    while (!(p = malloc(sizeof(*p))) || (p->s = s, p->j = j, wsapp_post(s->app, job_done_on_loop, p) < 0)) {
        free(p);
        if (++tries > 500) {
            log_error("runtime: no memory to answer a request; it is left to its client's timeout");
            return;
        }
        usleep(10000);
    }
}

/* Takes every queued append (at most RTAPPEND_GROUP_MAX) and commits them
 * together. */
static void *appender_main(void *ud)
{
    rtserve *s = ud;
    rt_job *jobs[RTAPPEND_GROUP_MAX];
    rt_append *v[RTAPPEND_GROUP_MAX];
    int n, m, i;

    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->ahead && !s->stopping)
            pthread_cond_wait(&s->acv, &s->mu);
        if (!s->ahead) {
            pthread_mutex_unlock(&s->mu);
            return NULL;
        }
        for (n = 0; s->ahead && n < RTAPPEND_GROUP_MAX; n++) {
            jobs[n] = s->ahead;
            s->ahead = jobs[n]->next;
            s->aqueued--;
        }
        if (!s->ahead)
            s->atail = NULL;
        pthread_mutex_unlock(&s->mu);
        for (i = m = 0; i < n; i++) {
            v[m] = jobs[i]->x ? jobs[i]->x : rtappend_prepare(s->r, &jobs[i]->q, &jobs[i]->a);
            jobs[i]->x = NULL;
            if (v[m])
                m++;
        }
        rtappend_commit(s->r, v, m);
        for (i = 0; i < n; i++)
            job_post(s, jobs[i]);
    }
}

static void *worker_main(void *ud)
{
    rtserve *s = ud;
    rt_job *j;

    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->head && !s->stopping)
            pthread_cond_wait(&s->cv, &s->mu);
        if (!s->head) {
            pthread_mutex_unlock(&s->mu);
            return NULL;
        }
        j = s->head;
        s->head = j->next;
        if (!s->head)
            s->tail = NULL;
        s->queued--;
        pthread_mutex_unlock(&s->mu);
        j->run(s, j);
        job_post(s, j);
    }
}

/* ------------------------------------------------------------ HTTP */

static const char *j_header(const rt_req *q, const char *name)
{
    const rt_job *j = (const rt_job *)q->tr;
    int i;

    for (i = 0; i < RT_KEEP_HEADERS; i++)
        if (strcasecmp(keep_headers[i], name) == 0)
            return j->hdr[i];
    return NULL;
}

static const char *j_query(const rt_req *q, const char *name)
{
    const rt_job *j = (const rt_job *)q->tr;
    int i;

    for (i = 0; i < RT_KEEP_QUERIES; i++)
        if (strcmp(keep_queries[i], name) == 0)
            return j->qry[i];
    return NULL;
}

static const char *j_param(const rt_req *q, const char *name)
{
    const rt_job *j = (const rt_job *)q->tr;

    return j->pp.name && strcmp(j->pp.name, name) == 0 ? j->pp.value : NULL;
}

static char *dup_or_null(const char *v)
{
    return v ? strdup(v) : NULL;
}

static void send_answer(wsapp_req *req, rt_resp *a)
{
    if (a->retry_after[0])
        wsapp_req_add_header(req, "Retry-After", a->retry_after);
    if (a->json) {
        if (a->status >= 400 && cJSON_GetObjectItemCaseSensitive(a->json, "error") &&
            !cJSON_GetObjectItemCaseSensitive(a->json, "request_id"))
            cJSON_AddStringToObject(a->json, "request_id", wsapp_req_id(req));
        wsapp_respond_json(req, a->status, a->json);
        a->json = NULL;
    } else if (a->raw) {
        wsapp_respond_take(req, a->status, a->ctype ? a->ctype : "application/octet-stream", a->raw, a->raw_len);
        a->raw = NULL;
    } else {
        wsapp_respond_error(req, 500, "internal", "handler gave no answer", NULL);
    }
}

/* Bytes of a long answer that may wait for a slow client: past them, the
 * handler thread writing it waits. */
#define RT_STREAM_BYTES (256 * 1024)

/* Routes whose answer may be too long to build whole: a replay, and a run
 * with its events. Each gets a stream it may use. */
static int streams(const rt_route *route)
{
    return route->fn == rt_h_run_replay || route->fn == rt_h_run_get;
}

/* A stream holds its handler thread while its client reads: at most
 * streams_max at once, so that a few slow readers cannot stop every other
 * route. Counted at the begin, when the handler knows it streams (a run's
 * GET streams only past a page of events). */
static int j_stream_begin(const rt_req *q, int status, const char *ctype)
{
    rt_job *j = q->tr;
    rtserve *s = j->srv;
    int open = atomic_load(&s->streams_open);

    do {
        if (open >= s->streams_max)
            return RT_STREAM_BUSY;
    } while (!atomic_compare_exchange_weak(&s->streams_open, &open, open + 1));
    j->streaming = 1;
    j->a.streamed = 1;
    return wsapp_stream_begin(j->stream, status, ctype);
}

static int j_stream_write(const rt_req *q, const void *data, size_t len)
{
    return wsapp_stream_write(((rt_job *)q->tr)->stream, data, len);
}

static void http_run(rtserve *s, rt_job *j)
{
    j->route->fn(s->r, &j->q, &j->a);
    if (j->stream) {
        wsapp_stream_end(j->stream, !j->a.stream_failed);
        j->stream = NULL;
    }
}

static void http_done(rtserve *s, rt_job *j)
{
    if (j->streaming)
        atomic_fetch_sub(&s->streams_open, 1);
    if (j->gone)
        return;
    /* A request that had a stream calls on_gone when it is freed, which
     * may be after this job is. */
    if (streams(j->route))
        wsapp_req_defer(j->req, NULL, NULL);
    if (!j->a.streamed)
        send_answer(j->req, &j->a);
}

static void http_gone(wsapp_req *req, void *ud)
{
    rt_job *j = ud;

    (void)req;
    j->gone = 1;
}

/* Handlers that never wait for anything answer on the loop itself. */
static int is_inline(const rt_route *route)
{
    return route->fn == rt_h_healthz || route->fn == rt_h_readyz;
}

static void pipe_done(void *ud, int live)
{
    rt_job *j = ud;

    if (live && !j->gone) {
        send_answer(j->req, &j->a);
    } else if (!j->gone) {
        /* Dropped unanswered by rtpipe_free, the loop over: the request
         * lives until wsapp_free, which would call its on_gone with this
         * job, freed by then. */
        wsapp_req_defer(j->req, NULL, NULL);
    }
    job_free(j);
}

/* An append answered without events goes to the pipe when it has a
 * connection: checked and committed from the loop, no thread involved. */
static int pipe_take(rtserve *s, rt_job *j)
{
    const char *prefer = j_header(&j->q, "Prefer");
    rt_append *x;

    if (!is_append(j) || !prefer || !strstr(prefer, "return=minimal") || !rtpipe_up(s->pipe))
        return 0;
    if (!(x = rtappend_prepare(s->r, &j->q, &j->a))) {
        send_answer(j->req, &j->a);
        job_free(j);
        return 1;
    }
    if (rtappend_limited(x)) {
        /* Over the publish rate, maybe a replay: the threads tell (rare,
         * and the pipe has no statement for it). */
        j->x = x;
        return 0;
    }
    /* Deferred before the submit: the pipe may answer the append and free
     * j before it returns (a send that fails at once, out of memory). */
    wsapp_req_defer(j->req, http_gone, j);
    if (rtpipe_submit(s->pipe, x, pipe_done, j) < 0) {
        wsapp_req_defer(j->req, NULL, NULL);
        rtappend_free(x);
        wsapp_respond_error(j->req, 503, "unavailable", "the runtime is overloaded; retry", NULL);
        job_free(j);
    }
    return 1;
}

/* An absent value is UTF-8 too: there is nothing to refuse. */
static int utf8_ok(const char *s)
{
    return !s || buf_utf8_valid(s, strlen(s)) == strlen(s);
}

/* Whether the request's path segment and kept query values are UTF-8
 * (after their %XX decoding). */
static int utf8_request(const rt_job *j)
{
    int i;

    if (j->pp.name && !utf8_ok(j->pp.value))
        return 0;
    for (i = 0; i < RT_KEEP_QUERIES; i++)
        if (!utf8_ok(j->qry[i]))
            return 0;
    return 1;
}

static void http_dispatch(wsapp_req *req, void *ud)
{
    rtserve *s = ud;
    rt_job *j = calloc(1, sizeof(*j));
    const char *body;
    size_t len = 0;
    int status = 404, i;

    if (!j) {
        wsapp_respond_error(req, 503, "unavailable", "out of memory", NULL);
        return;
    }
    j->route = rt_route_match(wsapp_req_method(req), wsapp_req_path(req), &j->pp, &status);
    if (!j->route) {
        wsapp_respond_error(req, status, NULL, status == 405 ? "method not allowed here" : "no such route", NULL);
        job_free(j);
        return;
    }
    body = wsapp_req_body(req, &len);
    j->body = malloc(len + 1);
    for (i = 0; i < RT_KEEP_HEADERS; i++)
        j->hdr[i] = dup_or_null(wsapp_req_header(req, keep_headers[i]));
    for (i = 0; i < RT_KEEP_QUERIES; i++)
        j->qry[i] = dup_or_null(wsapp_req_query(req, keep_queries[i]));
    if (!j->body) {
        wsapp_respond_error(req, 503, "unavailable", "out of memory", NULL);
        job_free(j);
        return;
    }
    if (!utf8_request(j)) {
        /* PostgreSQL refuses the whole statement over one such byte, which
         * answered 503 "retry" for a request that can never succeed. */
        wsapp_respond_error(req, 400, "invalid_request", "the path or a query parameter is not valid UTF-8", NULL);
        job_free(j);
        return;
    }
    memcpy(j->body, body, len);
    j->body[len] = '\0';
    j->q.header = j_header;
    j->q.query = j_query;
    j->q.param = j_param;
    j->q.body = j->body;
    j->q.body_len = len;
    j->q.tr = j;
    j->srv = s;
    j->req = req;
    j->run = http_run;
    j->done = http_done;
    if (pipe_take(s, j))
        return;
    if (is_inline(j->route)) {
        http_run(s, j);
        send_answer(req, &j->a);
        job_free(j);
        return;
    }
    /* The stream is made before the push: a handler thread may take the
     * job at once (and, from then on, own j->stream). */
    if (streams(j->route)) {
        if (!(j->stream = wsapp_req_stream(req, RT_STREAM_BYTES))) {
            wsapp_req_add_header(req, "Retry-After", "1");
            wsapp_respond_error(req, 503, "unavailable", "out of memory", NULL);
            job_free(j);
            return;
        }
        j->q.stream_begin = j_stream_begin;
        j->q.stream_write = j_stream_write;
    }
    if (job_push(s, j) < 0) {
        wsapp_respond_error(req, 503, "unavailable", "the runtime is overloaded or stopping; retry", NULL);
        job_free(j);
        return;
    }
    wsapp_req_defer(req, http_gone, j);
}

/* ------------------------------------------------------------ Khala hub */

static rt_topic *topic_find(rtserve *s, const char *name, rt_topic ***link)
{
    rt_topic **pp = &s->topics;

    for (; *pp; pp = &(*pp)->next)
        if (strcmp((*pp)->name, name) == 0)
            break;
    if (link)
        *link = pp;
    return *pp;
}

static rt_sub *sub_by_id(rtserve *s, const char *topic, uint64_t id)
{
    rt_topic *t = topic_find(s, topic, NULL);
    rt_sub *u;

    for (u = t ? t->subs : NULL; u; u = u->next)
        if (u->id == id)
            return u;
    return NULL;
}

static void send_text(rt_sub *u, const char *text)
{
    if (wsapp_conn_send_text(u->conn, text, strlen(text)) < 0)
        u->open = 0;
}

/* Writes the instance's listener row of the topic, so that every append
 * that sees it NOTIFYs, and sets j->settle to the time just after its
 * commit (settle_wait); j->failed when it could not. */
static void listen_run(rtserve *s, rt_job *j)
{
    const char *p[2] = {j->topic, s->instance};
    char err[512];
    PGconn *c = dbpool_acquire(s->r->db, 5000);
    PGresult *res;

    if (!c) {
        log_warn("runtime: registering a Khala listener failed: no connection");
        j->failed = 1;
        return;
    }
    res = dbpool_exec(c, "INSERT INTO runtime.khala_listeners (topic, instance) VALUES ($1, $2) "
                         "ON CONFLICT DO NOTHING", 2, p, err, sizeof(err));
    if (!res) {
        log_warn("runtime: registering a Khala listener failed: %s", err);
        j->failed = 1;
        dbpool_release(s->r->db, c);
        return;
    }
    PQclear(res);
    res = dbpool_exec(c, "SELECT clock_timestamp()::text", 0, NULL, err, sizeof(err));
    if (res && PQntuples(res) == 1)
        fmt_copy(j->settle, sizeof(j->settle), PQgetvalue(res, 0, 0));
    PQclear(res);
    dbpool_release(s->r->db, c);
}

static void unlisten_run(rtserve *s, rt_job *j)
{
    char err[512];
    const char *p[2] = {j->topic, s->instance};
    PGconn *c = dbpool_acquire(s->r->db, 5000);
    PGresult *res;

    if (!c)
        return;
    res = dbpool_exec(c, "DELETE FROM runtime.khala_listeners WHERE topic = $1 AND instance = $2", 2, p, err,
                      sizeof(err));
    PQclear(res);
    dbpool_release(s->r->db, c);
}

/* An append whose statement began before the listener row committed did
 * not see it, so it sends no NOTIFY, and if it commits after the first
 * read, nothing would bring its message until the topic's next one. So
 * a read follows once every statement older than the registration has
 * ended (they are appends of a few ms; at most RT_SETTLE_WAIT_MS, in case
 * an unrelated one runs long). */
static void settle_wait(rt_job *j, PGconn *c)
{
    const char *p[1] = {j->settle};
    char err[512];
    long long until = svc_now_ms() + RT_SETTLE_WAIT_MS;
    PGresult *res;
    int older = 1;

    while (older && svc_now_ms() < until) {
        res = dbpool_exec(c, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                             "backend_type = 'client backend' AND pid <> pg_backend_pid() AND state = 'active' "
                             "AND xact_start < $1::timestamptz",
                          1, p, err, sizeof(err));
        older = res && PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "0") != 0;
        PQclear(res);
        if (older)
            usleep(2000);
    }
}

static void read_run(rtserve *s, rt_job *j)
{
    rt_resp a;
    PGconn *c;

    memset(&a, 0, sizeof(a));
    if (j->settle[0] && (c = dbpool_acquire(s->r->db, 5000)) != NULL) {
        settle_wait(j, c);
        dbpool_release(s->r->db, c);
    }
    if (rtsync_read(s->r, j->topic, j->after, s->r->cfg.poll_max_limit, &j->w, &a) < 0) {
        j->failed = 1;
    } else {
        j->stale = rtsync_stale(s->r, j->topic, j->after, &j->w);
    }
    cJSON_Delete(a.json);
    free(a.raw);
}

static void read_start(rtserve *s, rt_sub *u);

/* The backlog's next read once the queue is below half the budget; live
 * messages meanwhile only mark it to read again, as during a read. */
static void backlog_resume(wsapp_timer *t, void *ud)
{
    rt_sub *u = ud;

    if (!u->open)
        return;
    if (wsapp_conn_queued(u->conn) > RT_BACKLOG_BYTES / 2) {
        wsapp_timer_set(t, 10);
        return;
    }
    u->reading = 0;
    read_start(u->srv, u);
}

static void backlog_wait(rt_sub *u)
{
    u->reading = 1;
    if (!u->pace && !(u->pace = wsapp_timer_new(u->srv->app, backlog_resume, u))) {
        wsapp_conn_close(u->conn, 1011, "out of memory");
        u->open = 0;
        return;
    }
    wsapp_timer_set(u->pace, 10);
}

static void read_apply(rtserve *s, rt_job *j)
{
    rt_sub *u = sub_by_id(s, j->topic, j->conn_id);
    rt_topic *t = topic_find(s, j->topic, NULL);
    const cJSON *m;
    cJSON *frame;
    char *text;
    int n = 0;


    if (t && j->settle[0] && strcmp(t->settle, j->settle) == 0)
        t->settled = 1;
    if (!u || !u->open)
        return;
    u->reading = 0;
    if (j->failed) {
        send_text(u, "{\"type\":\"error\",\"code\":\"unavailable\",\"message\":\"the database is unavailable\"}");
        wsapp_conn_close(u->conn, 1011, "unavailable");
        u->open = 0;
        return;
    }
    if (j->stale) {
        frame = j->stale;
        j->stale = NULL;
        cJSON_AddStringToObject(frame, "type", "stale_cursor");
        if ((text = cJSON_PrintUnformatted(frame)) != NULL)
            send_text(u, text);
        free(text);
        cJSON_Delete(frame);
        wsapp_conn_close(u->conn, 1000, "stale_cursor");
        u->open = 0;
        return;
    }
    cJSON_ArrayForEach(m, j->w.messages) {
        long long seq = (long long)cJSON_GetObjectItemCaseSensitive(m, "sequence")->valuedouble;
        buf b;

        n++;
        if (seq <= u->after)
            continue;
        buf_init(&b, 64 * 1024 * 1024);
        text = cJSON_PrintUnformatted(m);
        if (!text || buf_puts(&b, "{\"type\":\"message\",\"message\":") < 0 || buf_puts(&b, text) < 0 ||
            buf_puts(&b, "}") < 0) {
            free(text);
            buf_free(&b);
            break;
        }
        free(text);
        if (wsapp_conn_queued(u->conn) > 0 && wsapp_conn_queued(u->conn) + b.len > RT_BACKLOG_BYTES) {
            buf_free(&b);
            backlog_wait(u);
            return;
        }
        if (wsapp_conn_send_text(u->conn, b.p, b.len) < 0)
            u->open = 0;
        buf_free(&b);
        if (!u->open)
            return;
        u->after = seq;
    }
    if (n >= s->r->cfg.poll_max_limit || u->again || u->settle[0])
        read_start(s, u);
}

/* Starts the reads that waited for a free slot, in the order they came. */
static void reads_resume(rtserve *s)
{
    rt_sub *u;

    while (s->reads_busy < s->nthreads && !wsapp_stopping(s->app) && (u = s->read_wait) != NULL) {
        if (!(s->read_wait = u->wait_next))
            s->read_wait_tail = NULL;
        u->wait_next = NULL;
        u->waiting = 0;
        u->reading = 0;
        if (u->open)
            read_start(s, u);
    }
}

/* The freed slot goes to the oldest waiter first: a subscriber that
 * reads again at once (a busy topic) queues behind the waiters, or it
 * would keep its slot and starve them. */
static void read_done(rtserve *s, rt_job *j)
{
    s->reads_busy--;
    reads_resume(s);
    read_apply(s, j);
    reads_resume(s);
}

/* Takes u out of the read_wait list (it is closing). */
static void read_unwait(rtserve *s, rt_sub *u)
{
    rt_sub **pp, *prev = NULL;

    for (pp = &s->read_wait; *pp; prev = *pp, pp = &(*pp)->wait_next)
        if (*pp == u) {
            *pp = u->wait_next;
            if (s->read_wait_tail == u)
                s->read_wait_tail = prev;
            u->waiting = 0;
            return;
        }
}

static void read_start(rtserve *s, rt_sub *u)
{
    rt_job *j;

    u->again = 0;
    if (s->reads_busy >= s->nthreads) {
        if (!u->waiting) {
            u->waiting = 1;
            u->wait_next = NULL;
            if (s->read_wait_tail)
                s->read_wait_tail->wait_next = u;
            else
                s->read_wait = u;
            s->read_wait_tail = u;
        }
        u->reading = 1;
        return;
    }
    if (!(j = calloc(1, sizeof(*j))))
        return;
    j->run = read_run;
    j->done = read_done;
    j->conn_id = u->id;
    j->after = u->after;
    fmt_copy(j->topic, sizeof(j->topic), u->topic);
    fmt_copy(j->settle, sizeof(j->settle), u->settle);
    u->settle[0] = '\0';
    if (job_push(s, j) < 0) {
        job_free(j);
        wsapp_conn_close(u->conn, 1013, "overloaded");
        u->open = 0;
        return;
    }
    s->reads_busy++;
    u->reading = 1;
}

/* The topic's row is settled: what follows the row's lifecycle. */
static void row_done(rtserve *s, rt_job *j);

/* A topic's row could not be written: without it no append NOTIFYs, and
 * its subscribers would get no live message until they reconnect. It is
 * written again after the back-off while the topic has subscribers. */
static void row_wait(rtserve *s, rt_topic *t)
{
    t->row = ROW_WAIT;
    if (!s->row_retry || s->row_retry_armed || wsapp_stopping(s->app))
        return;
    s->row_retry_armed = 1;
    wsapp_timer_set(s->row_retry, backoff_next_ms(&s->row_bo));
}

/* Moves the topic's row toward what its subscribers need: a row while
 * there are some, none (and the topic freed) once there are none. One job
 * at a time: with one in flight, its end decides again. */
static void row_reconcile(rtserve *s, rt_topic *t)
{
    rt_topic **link;
    rt_job *j;
    int add = t->subs && t->row == ROW_NONE, remove = !t->subs && t->row == ROW_LISTED;

    if (add || remove) {
        if ((j = calloc(1, sizeof(*j))) != NULL) {
            fmt_copy(j->topic, sizeof(j->topic), t->name);
            j->run = add ? listen_run : unlisten_run;
            j->done = row_done;
            if (job_push(s, j) == 0) {
                t->row = add ? ROW_ADDING : ROW_REMOVING;
                return;
            }
            job_free(j);
        }
        /* Not removed: a few NOTIFYs no one listens to. */
        log_warn("runtime: the Khala listener row of a topic could not be %s", add ? "written" : "removed");
        if (add) {
            row_wait(s, t);
            return;
        }
        t->row = ROW_NONE;
    }
    if (!t->subs && (t->row == ROW_NONE || t->row == ROW_WAIT) && topic_find(s, t->name, &link) == t) {
        *link = t->next;
        free(t);
    }
}

/* A subscriber of a topic whose row just committed reads again once every
 * statement older than the row has ended (settle_wait). */
static void sub_settle(rtserve *s, rt_topic *t, rt_sub *u)
{
    if (!u->open)
        return;
    fmt_copy(u->settle, sizeof(u->settle), t->settle);
    if (!u->reading)
        read_start(s, u);
}

static void row_done(rtserve *s, rt_job *j)
{
    rt_topic *t = topic_find(s, j->topic, NULL);
    rt_sub *u;

    if (!t)
        return;
    if (t->row == ROW_ADDING && j->failed) {
        row_wait(s, t);
    } else if (t->row == ROW_ADDING) {
        backoff_reset(&s->row_bo);
        t->row = ROW_LISTED;
        fmt_copy(t->settle, sizeof(t->settle), j->settle);
        t->settled = 0;
        for (u = t->subs; u; u = u->next)
            sub_settle(s, t, u);
    } else {
        t->row = ROW_NONE;
        t->settle[0] = '\0';
    }
    row_reconcile(s, t);
}

/* The rows of the topics that wait for theirs are written again (or the
 * topics freed, their subscribers gone meanwhile). */
static void row_retry_fire(wsapp_timer *tm, void *ud)
{
    rtserve *s = ud;
    rt_topic *t, *next;

    (void)tm;
    s->row_retry_armed = 0;
    for (t = s->topics; t; t = next) {
        next = t->next;
        if (t->row == ROW_WAIT) {
            t->row = ROW_NONE;
            row_reconcile(s, t);
        }
    }
}

/* The frame of one notification, built once for every subscriber. */
static void deliver_note(rtserve *s, const char *note)
{
    cJSON *n = cJSON_Parse(note);
    const cJSON *topic = cJSON_GetObjectItemCaseSensitive(n, "topic");
    const cJSON *seqj = cJSON_GetObjectItemCaseSensitive(n, "sequence");
    int has_message = cJSON_GetObjectItemCaseSensitive(n, "payload") != NULL;
    rt_topic *t;
    rt_sub *u;
    wsapp_msg *frame = NULL;
    long long seq;

    if (!cJSON_IsString(topic) || !cJSON_IsNumber(seqj) || !(t = topic_find(s, topic->valuestring, NULL))) {
        cJSON_Delete(n);
        return;
    }
    seq = (long long)seqj->valuedouble;
    for (u = t->subs; u; u = u->next) {
        if (!u->open || seq <= u->after)
            continue;
        if (u->reading) {
            u->again = 1;
        } else if (seq == u->after + 1 && has_message) {
            if (!frame) {
                size_t len = strlen(note);
                static const char pre[] = "{\"type\":\"message\",\"message\":";

                frame = wsapp_msg_new_text(sizeof(pre) - 1 + len + 1);
                if (!frame)
                    break;
                memcpy(wsapp_msg_data(frame), pre, sizeof(pre) - 1);
                memcpy(wsapp_msg_data(frame) + sizeof(pre) - 1, note, len);
                wsapp_msg_data(frame)[sizeof(pre) - 1 + len] = '}';
                wsapp_msg_set_len(frame, sizeof(pre) + len);
            }
            if (wsapp_conn_send(u->conn, frame) < 0)
                u->open = 0;
            else
                u->after = seq;
        } else {
            read_start(s, u);
        }
    }
    wsapp_msg_unref(frame);
    cJSON_Delete(n);
}

/* A message of an append this instance committed (rtpipe), on the loop. */
static void pipe_message(void *ud, const char *message)
{
    deliver_note(ud, message);
}

typedef struct {
    rtserve *s;
    char *note; /* NULL: the listener reconnected; every subscriber reads again */
} rt_note;

static void note_on_loop(wsapp *app, void *ud)
{
    rt_note *n = ud;
    rt_topic *t;
    rt_sub *u;

    if (!wsapp_stopping(app)) {
        if (n->note) {
            deliver_note(n->s, n->note);
        } else {
            for (t = n->s->topics; t; t = t->next)
                for (u = t->subs; u; u = u->next)
                    if (u->open && !u->reading)
                        read_start(n->s, u);
                    else if (u->reading)
                        u->again = 1;
        }
    }
    free(n->note);
    free(n);
}

static void post_note(rtserve *s, const char *note)
{
    rt_note *n = calloc(1, sizeof(*n));

    if (!n || (note && !(n->note = strdup(note)))) {
        free(n);
        return;
    }
    n->s = s;
    if (wsapp_post(s->app, note_on_loop, n) < 0) {
        free(n->note);
        free(n);
    }
}

/* The LISTEN connection's callback, on pglisten's thread: notifications
 * go to the loop; after a (re)connect every subscriber reads the log again
 * (notifications sent while it was away are lost). */
static void listener_note(void *ud, const char *channel, const char *payload)
{
    (void)channel;
    post_note(ud, payload);
}

/* ------------------------------------------------------------ WebSocket */

static const char *w_header(const rt_req *q, const char *name)
{
    return wsapp_req_header((wsapp_req *)q->tr, name);
}

static const char *w_query(const rt_req *q, const char *name)
{
    return wsapp_req_query((wsapp_req *)q->tr, name);
}

static const char *w_param(const rt_req *q, const char *name)
{
    (void)q;
    (void)name;
    return NULL;
}

/* Runs before the upgrade, on the loop. The checks are in memory but for
 * a worker topic's owner, one indexed read: a short, bounded wait of the
 * loop that keeps the refusal an HTTP answer, as SPEC 6 asks. */
static int ws_accept(wsapp_req *req, void *user, void *ud)
{
    rtserve *s = ud;
    rt_sub *u = user;
    /* Wider than a topic, so that one too long is refused with 400 by the
     * length check rather than cut to a different topic. */
    char topic[RT_PARAM_MAX];
    rt_req q;
    rt_resp a;

    memset(&q, 0, sizeof(q));
    memset(&a, 0, sizeof(a));
    q.header = w_header;
    q.query = w_query;
    q.param = w_param;
    q.tr = req;
    if (rt_route_ws_topic(wsapp_req_path(req), topic, sizeof(topic)) < 0) {
        wsapp_respond_error(req, 404, "not_found", "no such WebSocket route", NULL);
        return -1;
    }
    /* The same rule as the HTTP routes: what reaches SQL and JSON is UTF-8. */
    if (!utf8_ok(topic) || !utf8_ok(wsapp_req_query(req, "after_seq"))) {
        wsapp_respond_error(req, 400, "invalid_request", "the topic and after_seq must be UTF-8", NULL);
        return -1;
    }
    rt_topic_canonical(topic);
    if (rt_khala_ws_accept(s->r, &q, topic, &u->after, &a) < 0) {
        send_answer(req, &a);
        return -1;
    }
    fmt_copy(u->topic, sizeof(u->topic), topic);
    return 0;
}

static void ws_open(wsapp_conn *c, void *user, void *ud)
{
    rtserve *s = ud;
    rt_sub *u = user;
    rt_topic *t, **link;
    cJSON *hello;
    char *text = NULL;
    int failed = 0;

    u->conn = c;
    u->id = wsapp_conn_id(c);
    u->open = 1;
    u->srv = s;
    if (!(t = topic_find(s, u->topic, &link))) {
        if (!(t = calloc(1, sizeof(*t)))) {
            wsapp_conn_close(c, 1011, "out of memory");
            u->open = 0;
            return;
        }
        fmt_copy(t->name, sizeof(t->name), u->topic);
        *link = t;
    }
    u->next = t->subs;
    t->subs = u;
    /* The row being written settles every subscriber when it is done; one
     * written already does only until the first settling read is done. */
    if (t->row == ROW_LISTED && !t->settled)
        fmt_copy(u->settle, sizeof(u->settle), t->settle);
    metrics_gauge_add(s->r->subscribers, 1);
    /* Printed by cJSON: a topic of quotes or control characters escapes to
     * several times its length, which a fixed buffer cut mid-frame. */
    if ((hello = cJSON_CreateObject()) != NULL && cJSON_AddStringToObject(hello, "type", "hello") &&
        cJSON_AddStringToObject(hello, "topic", u->topic) &&
        cJSON_AddNumberToObject(hello, "after_seq", (double)u->after) &&
        cJSON_AddNumberToObject(hello, "limit", (double)s->r->cfg.poll_max_limit) &&
        cJSON_AddNumberToObject(hello, "recommended_reconnect_backoff_ms", 400) &&
        (text = cJSON_PrintUnformatted(hello)) != NULL)
        send_text(u, text);
    else
        failed = 1;
    free(text);
    cJSON_Delete(hello);
    row_reconcile(s, t);
    if (failed) {
        wsapp_conn_close(c, 1011, "out of memory");
        return;
    }
    read_start(s, u);
}

static void ws_close(wsapp_conn *c, void *user, void *ud)
{
    rtserve *s = ud;
    rt_sub *u = user, **pp;
    rt_topic *t;

    wsapp_timer_free(u->pace);
    u->pace = NULL;
    if (u->waiting)
        read_unwait(s, u);
    if (!c || !u->id || !(t = topic_find(s, u->topic, NULL)))
        return;
    for (pp = &t->subs; *pp; pp = &(*pp)->next)
        if (*pp == u) {
            *pp = u->next;
            metrics_gauge_add(s->r->subscribers, -1);
            break;
        }
    /* The last local subscriber left: stop the NOTIFYs for this topic. */
    row_reconcile(s, t);
}

/* ------------------------------------------------------------ server */

rtserve *rtserve_new(rt *r, const char *host, int port, int threads, int append_threads, int append_conns,
                     char *err, size_t errlen)
{
    static const char *const methods[] = {"GET", "POST", "PUT", "PATCH", "DELETE"};
    rtserve *s = calloc(1, sizeof(*s));
    wsapp_opts o;
    wsapp_ws_handlers h;
    unsigned char rnd[16];
    size_t i;

    if (!s)
        return NULL;
    s->r = r;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->acv, NULL);
    s->nthreads = threads > 0 ? threads : 4;
    s->streams_max = s->nthreads / 2 > 0 ? s->nthreads / 2 : 1;
    s->pipe_conns = append_conns < 0 ? 0 : append_conns > RTPIPE_CONNS_MAX ? RTPIPE_CONNS_MAX : append_conns;
    s->want_appenders = append_threads < 1 ? 1 : append_threads > RTSERVE_APPEND_THREADS_MAX ? RTSERVE_APPEND_THREADS_MAX
                                                                                          : append_threads;
    randid_fill(rnd, sizeof(rnd));
    fmt_hex(s->instance, rnd, sizeof(rnd));
    memset(&o, 0, sizeof(o));
    o.service = "runtime";
    o.host = host;
    o.port = port;
    o.access_log = 1;
    o.header_timeout_ms = (int)r->cfg.header_timeout_ms;
    o.message_timeout_ms = (int)r->cfg.ws_message_timeout_ms;
    o.metrics = r->m;
    s->app = wsapp_new(&o, err, errlen);
    if (!s->app || wsapp_route_metrics(s->app) < 0 || !(s->row_retry = wsapp_timer_new(s->app, row_retry_fire, s)))
        goto fail;
    backoff_init(&s->row_bo, 100, 5000);
    for (i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
        if (wsapp_route(s->app, methods[i], "/*", http_dispatch, s) < 0)
            goto fail;
    memset(&h, 0, sizeof(h));
    h.user_size = sizeof(rt_sub);
    h.accept = ws_accept;
    h.open = ws_open;
    /* No message handler: the stream is one way, a client's frames are
     * ignored (pings come as control frames). */
    h.close = ws_close;
    if (wsapp_ws_route(s->app, "/internal/v1/khala/topics/*", &h, s) < 0)
        goto fail;
    return s;
fail:
    if (err && errlen && !err[0])
        snprintf(err, errlen, "cannot set up the server");
    rtserve_free(s);
    return NULL;
}

int rtserve_start(rtserve *s, const char *conninfo, char *err, size_t errlen)
{
    static const char *const channels[] = {"runtime_khala", NULL};
    int i;

    if (!(s->threads = calloc((size_t)s->nthreads, sizeof(*s->threads))))
        return -1;
    for (i = 0; i < s->nthreads; i++)
        if (pthread_create(&s->threads[i], NULL, worker_main, s) != 0) {
            s->nthreads = i;
            snprintf(err, errlen, "cannot start handler threads");
            return -1;
        }
    for (; s->nappenders < s->want_appenders; s->nappenders++)
        if (pthread_create(&s->appenders[s->nappenders], NULL, appender_main, s) != 0) {
            snprintf(err, errlen, "cannot start append threads");
            return -1;
        }
    if (!(s->listener = pglisten_new(conninfo, "runtime-khala", channels, listener_note, s))) {
        snprintf(err, errlen, "cannot start the LISTEN thread");
        return -1;
    }
    pglisten_set_ping(s->listener, s->r->cfg.listen_ping_ms);
    if (s->pipe_conns > 0) {
        if (!(s->pipe = rtpipe_new(s->r, s->app, conninfo, s->pipe_conns, pipe_message, s)) ||
            rtpipe_start(s->pipe) < 0) {
            snprintf(err, errlen, "cannot start the append connections");
            return -1;
        }
    }
    return wsapp_start(s->app, err, errlen);
}

int rtserve_port(const rtserve *s)
{
    return wsapp_port(s->app);
}

static void stop_threads(rtserve *s)
{
    int i;

    pthread_mutex_lock(&s->mu);
    s->stopping = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_cond_broadcast(&s->acv);
    pthread_mutex_unlock(&s->mu);
    for (i = 0; s->threads && i < s->nthreads; i++)
        pthread_join(s->threads[i], NULL);
    for (i = 0; i < s->nappenders; i++)
        pthread_join(s->appenders[i], NULL);
    s->nappenders = 0;
    free(s->threads);
    s->threads = NULL;
    pglisten_free(s->listener);
    s->listener = NULL;
}

void rtserve_stop(rtserve *s, int grace_ms)
{
    char err[256];
    const char *p[1] = {s->instance};
    PGconn *c;
    PGresult *res;

    /* Requests in flight finish on the handler threads while wsapp waits
     * for their answers; then the threads end, and this instance's
     * listener rows go (a crashed instance leaves its rows: they cost its
     * topics a NOTIFY per write, nothing more). */
    wsapp_stop(s->app, grace_ms);
    rtpipe_free(s->pipe);
    s->pipe = NULL;
    stop_threads(s);
    if ((c = dbpool_acquire(s->r->db, 1000)) != NULL) {
        res = dbpool_exec(c, "DELETE FROM runtime.khala_listeners WHERE instance = $1", 1, p, err, sizeof(err));
        PQclear(res);
        dbpool_release(s->r->db, c);
    }
}

void rtserve_free(rtserve *s)
{
    rt_job *j;
    rt_topic *t;

    if (!s)
        return;
    if (s->app)
        wsapp_stop(s->app, 0);
    rtpipe_free(s->pipe);
    s->pipe = NULL;
    stop_threads(s);
    /* Before the app it runs on; what runs in wsapp_free (closes, posted
     * answers) sees it NULL and arms nothing. */
    wsapp_timer_free(s->row_retry);
    s->row_retry = NULL;
    wsapp_free(s->app);
    while ((j = s->head) != NULL) {
        s->head = j->next;
        job_free(j);
    }
    while ((j = s->ahead) != NULL) {
        s->ahead = j->next;
        job_free(j);
    }
    while ((t = s->topics) != NULL) {
        s->topics = t->next;
        free(t);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->acv);
    free(s);
}
