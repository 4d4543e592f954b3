#include "rtes_hub.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "fmt.h"
#include "hash.h"
#include "log.h"
#include "metrics.h"
#include "rtes_store.h"
#include "rtes_tokens.h"
#include "svc.h"

#define BUCKETS 1024
#define CHUNK 256                   /* history events per read */
#define HIGH_WATER (256 * 1024)     /* queued bytes above which the next chunk waits */
#define PENDING_MAX 1024            /* frames ahead of next kept per watcher */
#define GAP_MS 150                  /* a gap open this long is read from PostgreSQL */
#define TICK_MS 50
#define CHANNEL_PREFIX "rtes:exec:"

typedef struct pend {
    long long seq;
    wsapp_msg *m;
    struct pend *next;
} pend;

typedef struct stream {
    char *eid;
    uint32_t hash;
    rtes_watch *head;
    struct stream *next;
} stream;

struct rtes_watch {
    rtes_hub *hub;
    wsapp_conn *conn;
    stream *s;
    char wid[RTES_ID_MAX];
    long long next;        /* the seq to send next */
    pend *pending;         /* frames ahead of next, by seq */
    int npending;
    int fetching;          /* a read is in flight */
    int more;              /* the last read was full: read on when the queue drains */
    int refetch;           /* pending overflowed or Redis came back: read again */
    long long gap_since;   /* ms when pending's head was found ahead of next; 0: none */
    int closed, refs;
    rtes_watch *prev, *next_w;   /* in the stream */
    rtes_watch *aprev, *anext;   /* in the hub */
};

enum { JOB_FETCH, JOB_DOC };

typedef struct job {
    int kind;
    rtes_hub *hub;
    struct job *next;
    char eid[RTES_ID_MAX];
    /* fetch */
    rtes_watch *w;
    long long after;
    int nframes, cap, failed;
    long long *seqs;
    wsapp_msg **msgs;
    char wid[RTES_ID_MAX];
    int exists;
    /* document */
    wsapp_req *req;
    int gone;
    rtes_asker who;
    int status;
    char *body;
    size_t len;
    char msg[160];
} job;

/* A frame from Redis, in one allocation. */
typedef struct live {
    struct live *next;
    long long seq;
    char *eid, *wid;
    wsapp_msg *m;
} live;

struct rtes_hub {
    wsapp *app;
    dbpool *db;
    rconn_opts ropts;
    int nloaders;
    pthread_t bus, *loaders;
    int started;
    atomic_int stop;
    /* loop thread only */
    stream *buckets[BUCKETS];
    rtes_watch *all;
    int nwatch;
    wsapp_timer *tick;
    /* loader queue */
    pthread_mutex_t qmu;
    pthread_cond_t qcv;
    job *qhead, *qtail;
    /* bus inbox */
    pthread_mutex_t imu;
    live *ihead, *itail;
    int iposted, iresync;
    metrics_gauge *watchers;
    metrics_counter *frames_live, *frames_history, *gap_reads;
};

static void fetch(rtes_hub *h, rtes_watch *w);

/* ------------------------------------------------------------ streams */

static stream *stream_find(rtes_hub *h, const char *eid, uint32_t hv)
{
    for (stream *s = h->buckets[hv % BUCKETS]; s; s = s->next)
        if (s->hash == hv && strcmp(s->eid, eid) == 0)
            return s;
    return NULL;
}

static void watch_free(rtes_watch *w)
{
    pend *p = w->pending;

    while (p) {
        pend *n = p->next;

        wsapp_msg_unref(p->m);
        free(p);
        p = n;
    }
    free(w);
}

static void watch_unref(rtes_watch *w)
{
    if (--w->refs == 0)
        watch_free(w);
}

/* Sends one frame; a connection whose queue overflows is dropped by wsapp
 * (its close hook follows). */
static void send_frame(rtes_watch *w, wsapp_msg *m, long long seq)
{
    if (w->closed)
        return;
    wsapp_conn_send(w->conn, m);
    w->next = seq + 1;
}

/* Sends what pending holds from next on; notes a gap that remains. */
static void drain_pending(rtes_watch *w)
{
    while (w->pending && w->pending->seq <= w->next) {
        pend *p = w->pending;

        w->pending = p->next;
        w->npending--;
        if (p->seq == w->next) {
            send_frame(w, p->m, p->seq);
            metrics_counter_inc(w->hub->frames_live);
        }
        wsapp_msg_unref(p->m);
        free(p);
    }
    if (w->pending && !w->gap_since)
        w->gap_since = svc_now_ms();
    if (!w->pending)
        w->gap_since = 0;
}

static void hold(rtes_watch *w, long long seq, wsapp_msg *m)
{
    pend **pp = &w->pending, *p;

    while (*pp && (*pp)->seq < seq)
        pp = &(*pp)->next;
    if (*pp && (*pp)->seq == seq)
        return;
    if (w->npending >= PENDING_MAX || !(p = malloc(sizeof(*p)))) {
        /* PostgreSQL has it: read it from there once caught up. */
        w->refetch = 1;
        return;
    }
    wsapp_msg_ref(m);
    p->seq = seq;
    p->m = m;
    p->next = *pp;
    *pp = p;
    w->npending++;
    if (!w->gap_since)
        w->gap_since = svc_now_ms();
}

static void deliver(rtes_hub *h, const live *f)
{
    uint32_t hv = hash_fnv1a_str(f->eid);
    stream *s = stream_find(h, f->eid, hv);

    if (!s)
        return;
    for (rtes_watch *w = s->head, *nx; w; w = nx) {
        nx = w->next_w;
        if (w->closed)
            continue;
        if (w->wid[0] && strcmp(w->wid, f->wid) != 0) {
            w->closed = 1;
            wsapp_conn_close(w->conn, 1008, "the execution belongs to another workflow");
            continue;
        }
        if (f->seq < w->next)
            continue;
        if (f->seq == w->next && !w->fetching) {
            send_frame(w, f->m, f->seq);
            metrics_counter_inc(h->frames_live);
            drain_pending(w);
            continue;
        }
        hold(w, f->seq, f->m);
    }
}

rtes_watch *rtes_hub_watch(rtes_hub *h, wsapp_conn *c, const char *eid, const char *wid)
{
    uint32_t hv = hash_fnv1a_str(eid);
    stream *s = stream_find(h, eid, hv);
    rtes_watch *w = calloc(1, sizeof(*w));

    if (!w)
        return NULL;
    if (!s) {
        s = calloc(1, sizeof(*s));
        if (!s || !(s->eid = strdup(eid))) {
            free(s);
            free(w);
            return NULL;
        }
        s->hash = hv;
        s->next = h->buckets[hv % BUCKETS];
        h->buckets[hv % BUCKETS] = s;
    }
    w->hub = h;
    w->conn = c;
    w->s = s;
    w->next = 1;
    w->refs = 1;
    fmt_copy(w->wid, sizeof(w->wid), wid ? wid : "");
    w->next_w = s->head;
    if (s->head)
        s->head->prev = w;
    s->head = w;
    w->anext = h->all;
    if (h->all)
        h->all->aprev = w;
    h->all = w;
    h->nwatch++;
    metrics_gauge_set(h->watchers, h->nwatch);
    fetch(h, w);
    return w;
}

void rtes_hub_unwatch(rtes_hub *h, rtes_watch *w)
{
    stream *s;

    if (!w)
        return;
    s = w->s;
    w->closed = 1;
    if (w->prev)
        w->prev->next_w = w->next_w;
    else
        s->head = w->next_w;
    if (w->next_w)
        w->next_w->prev = w->prev;
    if (w->aprev)
        w->aprev->anext = w->anext;
    else
        h->all = w->anext;
    if (w->anext)
        w->anext->aprev = w->aprev;
    h->nwatch--;
    metrics_gauge_set(h->watchers, h->nwatch);
    if (!s->head) {
        stream **pp = &h->buckets[s->hash % BUCKETS];

        while (*pp != s)
            pp = &(*pp)->next;
        *pp = s->next;
        free(s->eid);
        free(s);
    }
    w->s = NULL;
    watch_unref(w);
}

int rtes_hub_watchers(const rtes_hub *h)
{
    return h ? h->nwatch : 0;
}

/* ------------------------------------------------------------ loader */

static void enqueue(rtes_hub *h, job *j)
{
    pthread_mutex_lock(&h->qmu);
    j->next = NULL;
    if (h->qtail)
        h->qtail->next = j;
    else
        h->qhead = j;
    h->qtail = j;
    pthread_cond_signal(&h->qcv);
    pthread_mutex_unlock(&h->qmu);
}

static void job_free(job *j)
{
    for (int i = 0; i < j->nframes; i++)
        wsapp_msg_unref(j->msgs[i]);
    free(j->seqs);
    free(j->msgs);
    free(j->body);
    free(j);
}

static void fetch(rtes_hub *h, rtes_watch *w)
{
    job *j;

    if (w->fetching || w->closed)
        return;
    j = calloc(1, sizeof(*j));
    if (!j) {
        w->refetch = 1; /* the tick tries again */
        return;
    }
    j->kind = JOB_FETCH;
    j->hub = h;
    j->w = w;
    j->after = w->next - 1;
    fmt_copy(j->eid, sizeof(j->eid), w->s->eid);
    w->refs++;
    w->fetching = 1;
    w->more = 0;
    w->refetch = 0;
    enqueue(h, j);
}

/* Loop: a read came back. */
static void fetched(wsapp *app, void *ud)
{
    job *j = ud;
    rtes_watch *w = j->w;

    (void)app;
    w->fetching = 0;
    if (!w->closed && j->exists && w->wid[0] && strcmp(w->wid, j->wid) != 0) {
        w->closed = 1;
        wsapp_conn_close(w->conn, 1008, "the execution belongs to another workflow");
    }
    if (!w->closed && !wsapp_stopping(j->hub->app)) {
        if (j->failed) {
            w->refetch = 1; /* the tick tries again */
        } else {
            for (int i = 0; i < j->nframes; i++) {
                if (j->seqs[i] < w->next)
                    continue;
                send_frame(w, j->msgs[i], j->seqs[i]);
                metrics_counter_inc(j->hub->frames_history);
            }
            if (j->nframes == CHUNK)
                w->more = 1;
            drain_pending(w);
            if (w->more && wsapp_conn_queued(w->conn) < HIGH_WATER)
                fetch(j->hub, w);
        }
    }
    watch_unref(w);
    job_free(j);
}

static int collect(long long seq, const char *frame, size_t len, void *ud)
{
    job *j = ud;
    wsapp_msg *m;

    if (j->nframes == j->cap)
        return 1;
    m = wsapp_msg_new(frame, len, 0);
    if (!m)
        return 1;
    j->seqs[j->nframes] = seq;
    j->msgs[j->nframes++] = m;
    return 0;
}

static void run_fetch(job *j, PGconn *pg)
{
    char err[512];
    long long last;
    int n;

    j->seqs = calloc(CHUNK, sizeof(*j->seqs));
    j->msgs = calloc(CHUNK, sizeof(*j->msgs));
    j->cap = CHUNK;
    if (!j->seqs || !j->msgs || !pg) {
        j->failed = 1;
        return;
    }
    if (j->after == 0 && rtes_store_head(pg, j->eid, &last, j->wid, err, sizeof(err)) < 0) {
        j->failed = 1;
        return;
    }
    j->exists = j->wid[0] != '\0';
    if (rtes_store_events(pg, j->eid, j->after, 0, CHUNK, collect, j, &n, err, sizeof(err)) < 0)
        j->failed = 1;
}

/* Loop: a document came back. */
static void documented(wsapp *app, void *ud)
{
    job *j = ud;

    (void)app;
    if (!j->gone && !wsapp_stopping(j->hub->app)) {
        if (j->status == 200) {
            wsapp_respond_take(j->req, 200, "application/json", j->body, j->len);
            j->body = NULL;
        } else {
            wsapp_respond_error(j->req, j->status, NULL, j->msg, NULL);
        }
    }
    job_free(j);
}

static void doc_gone(wsapp_req *req, void *ud)
{
    job *j = ud;

    (void)req;
    j->gone = 1;
}

static void run_doc(job *j, PGconn *pg, rconn *r)
{
    char err[512], wid[RTES_ID_MAX];
    long long now = (long long)time(NULL);
    int found, ok;

    if (!pg) {
        j->status = 503;
        fmt_copy(j->msg, sizeof(j->msg), "the execution store is unavailable");
        return;
    }
    found = rtes_store_document(pg, j->eid, &j->body, wid, err, sizeof(err));
    if (found < 0) {
        j->status = 503;
        fmt_copy(j->msg, sizeof(j->msg), "the execution store is unavailable");
        return;
    }
    if (found == 0) {
        j->status = 404;
        fmt_copy(j->msg, sizeof(j->msg), "execution not found");
        return;
    }
    if (j->who.skip_auth)
        ok = 1;
    else if (j->who.user_id[0])
        ok = rtes_tokens_user_grants(r, j->who.user_id, j->eid, wid, now, err, sizeof(err));
    else
        ok = rtes_tokens_execution_live(r, j->eid, wid, now, err, sizeof(err));
    if (ok < 0) {
        j->status = 503;
        fmt_copy(j->msg, sizeof(j->msg), "the token store is unavailable");
    } else if (ok == 0) {
        j->status = j->who.user_id[0] ? 403 : 401;
        fmt_copy(j->msg, sizeof(j->msg),
                 j->who.user_id[0] ? "no token grants this execution" : "a Bearer token or an execution token is required");
    } else {
        j->status = 200;
        j->len = strlen(j->body);
        return;
    }
    free(j->body);
    j->body = NULL;
}

static void *loader(void *arg)
{
    rtes_hub *h = arg;
    rconn *r = rconn_new(&h->ropts, 2000);

    for (;;) {
        job *j;
        PGconn *pg;

        pthread_mutex_lock(&h->qmu);
        while (!h->qhead && !atomic_load(&h->stop))
            pthread_cond_wait(&h->qcv, &h->qmu);
        j = h->qhead;
        if (j) {
            h->qhead = j->next;
            if (!h->qhead)
                h->qtail = NULL;
        }
        pthread_mutex_unlock(&h->qmu);
        if (!j)
            break; /* stopping and nothing left */
        pg = dbpool_acquire(h->db, 2000);
        if (j->kind == JOB_FETCH)
            run_fetch(j, pg);
        else
            run_doc(j, pg, r);
        dbpool_release(h->db, pg);
        if (wsapp_post(h->app, j->kind == JOB_FETCH ? fetched : documented, j) < 0) {
            /* Out of memory: the watcher is left fetching; nothing better
             * to do than drop the work. */
            job_free(j);
        }
    }
    rconn_free(r);
    return NULL;
}

void rtes_hub_document(rtes_hub *h, wsapp_req *req, const char *eid, const rtes_asker *who)
{
    job *j = calloc(1, sizeof(*j));

    if (!j) {
        wsapp_respond_error(req, 500, NULL, "out of memory", NULL);
        return;
    }
    j->kind = JOB_DOC;
    j->hub = h;
    j->req = req;
    j->who = *who;
    fmt_copy(j->eid, sizeof(j->eid), eid);
    wsapp_req_defer(req, doc_gone, j);
    enqueue(h, j);
}

/* ------------------------------------------------------------ Redis bus */

/* Loop: frames from Redis. */
static void inbox(wsapp *app, void *ud)
{
    rtes_hub *h = ud;
    live *l;
    int resync;

    (void)app;
    pthread_mutex_lock(&h->imu);
    l = h->ihead;
    h->ihead = h->itail = NULL;
    h->iposted = 0;
    resync = h->iresync;
    h->iresync = 0;
    pthread_mutex_unlock(&h->imu);
    while (l) {
        live *n = l->next;

        if (!wsapp_stopping(h->app))
            deliver(h, l);
        wsapp_msg_unref(l->m);
        free(l);
        l = n;
    }
    if (resync)
        for (rtes_watch *w = h->all; w; w = w->anext)
            w->refetch = 1;
}

static void post_inbox(rtes_hub *h, live *l, int resync)
{
    int post;

    pthread_mutex_lock(&h->imu);
    if (l) {
        if (h->itail)
            h->itail->next = l;
        else
            h->ihead = l;
        h->itail = l;
    }
    if (resync)
        h->iresync = 1;
    post = !h->iposted;
    h->iposted = 1;
    pthread_mutex_unlock(&h->imu);
    if (post && wsapp_post(h->app, inbox, h) < 0) {
        pthread_mutex_lock(&h->imu);
        h->iposted = 0;
        pthread_mutex_unlock(&h->imu);
    }
}

/* A pmessage reply: ["pmessage", pattern, channel, "<seq>\n<wid>\n<frame>"]. */
static live *parse_live(const redisReply *r)
{
    const redisReply *ch, *pl;
    const char *p, *nl1, *nl2, *end;
    size_t elen, wlen;
    live *l;
    long long seq = 0;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4 || r->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(r->element[0]->str, "pmessage") != 0)
        return NULL;
    ch = r->element[2];
    pl = r->element[3];
    if (ch->type != REDIS_REPLY_STRING || pl->type != REDIS_REPLY_STRING || ch->len <= strlen(CHANNEL_PREFIX))
        return NULL;
    p = pl->str;
    end = p + pl->len;
    nl1 = memchr(p, '\n', pl->len);
    if (!nl1)
        return NULL;
    nl2 = memchr(nl1 + 1, '\n', (size_t)(end - nl1 - 1));
    if (!nl2)
        return NULL;
    for (const char *d = p; d < nl1; d++) {
        if (*d < '0' || *d > '9' || seq > 100000000000000LL)
            return NULL;
        seq = seq * 10 + (*d - '0');
    }
    if (seq <= 0)
        return NULL;
    elen = ch->len - strlen(CHANNEL_PREFIX);
    wlen = (size_t)(nl2 - nl1 - 1);
    if (elen >= RTES_ID_MAX || wlen >= RTES_ID_MAX)
        return NULL;
    l = malloc(sizeof(*l) + elen + 1 + wlen + 1);
    if (!l)
        return NULL;
    l->next = NULL;
    l->seq = seq;
    l->eid = (char *)(l + 1);
    memcpy(l->eid, ch->str + strlen(CHANNEL_PREFIX), elen);
    l->eid[elen] = '\0';
    l->wid = l->eid + elen + 1;
    memcpy(l->wid, nl1 + 1, wlen);
    l->wid[wlen] = '\0';
    l->m = wsapp_msg_new(nl2 + 1, (size_t)(end - nl2 - 1), 0);
    if (!l->m) {
        free(l);
        return NULL;
    }
    return l;
}

static void *bus(void *arg)
{
    rtes_hub *h = arg;
    rconn *r = rconn_new(&h->ropts, 2000);
    int subscribed = 0, was_down = 0;

    while (r && !atomic_load(&h->stop)) {
        redisContext *ctx;
        struct pollfd pfd;
        void *rep = NULL;

        if (!subscribed) {
            redisReply *ok;

            if (rconn_connect(r) < 0 || !(ctx = rconn_context(r))) {
                was_down = 1;
                svc_sleep_ms(200);
                continue;
            }
            ok = redisCommand(ctx, "PSUBSCRIBE %s*", CHANNEL_PREFIX);
            if (!ok) {
                rconn_mark_broken(r);
                svc_sleep_ms(200);
                continue;
            }
            freeReplyObject(ok);
            subscribed = 1;
            /* Whatever was published while we were not listening is in
             * PostgreSQL: every watcher reads on from its next seq. */
            post_inbox(h, NULL, 1);
            if (was_down)
                log_info("rtes: subscribed to live frames on Redis again");
            was_down = 0;
        }
        ctx = rconn_context(r);
        if (!ctx) {
            subscribed = 0;
            continue;
        }
        pfd.fd = ctx->fd;
        pfd.events = POLLIN;
        pfd.revents = 0;
        if (poll(&pfd, 1, 100) < 0 && errno != EINTR)
            goto broken;
        if (!(pfd.revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        if (redisBufferRead(ctx) != REDIS_OK)
            goto broken;
        {
            live *head = NULL, **tail = &head;

            while (redisGetReplyFromReader(ctx, &rep) == REDIS_OK && rep) {
                live *l = parse_live(rep);

                freeReplyObject(rep);
                rep = NULL;
                if (l) {
                    *tail = l;
                    tail = &l->next;
                }
            }
            if (ctx->err)
                goto broken;
            if (head) {
                /* One post for the whole read. */
                live *last = head;

                while (last->next)
                    last = last->next;
                pthread_mutex_lock(&h->imu);
                if (h->itail)
                    h->itail->next = head;
                else
                    h->ihead = head;
                h->itail = last;
                pthread_mutex_unlock(&h->imu);
                post_inbox(h, NULL, 0);
            }
        }
        continue;
    broken:
        if (!was_down)
            log_warn("rtes: lost the Redis subscription; watchers read from PostgreSQL until it is back");
        was_down = 1;
        rconn_mark_broken(r);
        subscribed = 0;
        svc_sleep_ms(200);
    }
    rconn_free(r);
    return NULL;
}

/* ------------------------------------------------------------ tick */

static void tick(wsapp_timer *t, void *ud)
{
    rtes_hub *h = ud;
    long long now = svc_now_ms();

    for (rtes_watch *w = h->all; w; w = w->anext) {
        if (w->closed || w->fetching)
            continue;
        if (w->refetch || (w->more && wsapp_conn_queued(w->conn) < HIGH_WATER)) {
            fetch(h, w);
        } else if (w->gap_since && now - w->gap_since >= GAP_MS) {
            metrics_counter_inc(h->gap_reads);
            w->gap_since = 0;
            fetch(h, w);
        }
    }
    if (!wsapp_stopping(h->app))
        wsapp_timer_set(t, TICK_MS);
}

/* ------------------------------------------------------------ life */

rtes_hub *rtes_hub_new(wsapp *app, dbpool *db, const rconn_opts *redis, int loaders)
{
    rtes_hub *h = calloc(1, sizeof(*h));
    metrics *reg = metrics_default();

    if (!h)
        return NULL;
    h->app = app;
    h->db = db;
    h->ropts = *redis;
    h->nloaders = loaders > 0 ? loaders : 1;
    h->loaders = calloc((size_t)h->nloaders, sizeof(*h->loaders));
    if (!h->loaders) {
        free(h);
        return NULL;
    }
    pthread_mutex_init(&h->qmu, NULL);
    pthread_cond_init(&h->qcv, NULL);
    pthread_mutex_init(&h->imu, NULL);
    h->watchers = metrics_gauge_get(reg, "rtes_watchers", "Open /rt WebSocket watchers of executions.", NULL);
    h->frames_live = metrics_counter_get(reg, "rtes_frames_sent_total", "Frames sent to /rt watchers, by source.",
                                         "source=\"live\"");
    h->frames_history = metrics_counter_get(reg, "rtes_frames_sent_total",
                                            "Frames sent to /rt watchers, by source.", "source=\"history\"");
    h->gap_reads = metrics_counter_get(reg, "rtes_gap_reads_total",
                                       "Live frames that did not arrive in order and were read from PostgreSQL.", NULL);
    return h;
}

int rtes_hub_start(rtes_hub *h)
{
    int i;

    if (!h || h->started)
        return -1;
    h->tick = wsapp_timer_new(h->app, tick, h);
    if (!h->tick)
        return -1;
    wsapp_timer_set(h->tick, TICK_MS);
    if (pthread_create(&h->bus, NULL, bus, h) != 0)
        return -1;
    for (i = 0; i < h->nloaders; i++)
        if (pthread_create(&h->loaders[i], NULL, loader, h) != 0)
            break;
    h->nloaders = i;
    h->started = 1;
    return 0;
}

void rtes_hub_stop(rtes_hub *h)
{
    if (!h || !h->started)
        return;
    atomic_store(&h->stop, 1);
    pthread_mutex_lock(&h->qmu);
    pthread_cond_broadcast(&h->qcv);
    pthread_mutex_unlock(&h->qmu);
    pthread_join(h->bus, NULL);
    for (int i = 0; i < h->nloaders; i++)
        pthread_join(h->loaders[i], NULL);
    h->started = 0;
}

void rtes_hub_free(rtes_hub *h)
{
    if (!h)
        return;
    rtes_hub_stop(h);
    wsapp_timer_free(h->tick);
    for (live *l = h->ihead, *n; l; l = n) {
        n = l->next;
        wsapp_msg_unref(l->m);
        free(l);
    }
    for (job *j = h->qhead, *n; j; j = n) {
        n = j->next;
        job_free(j);
    }
    for (int b = 0; b < BUCKETS; b++)
        for (stream *s = h->buckets[b], *n; s; s = n) {
            n = s->next;
            free(s->eid);
            free(s);
        }
    pthread_mutex_destroy(&h->qmu);
    pthread_cond_destroy(&h->qcv);
    pthread_mutex_destroy(&h->imu);
    free(h->loaders);
    free(h);
}
