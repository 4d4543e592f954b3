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
#define CACHE_MAX 4096              /* recent frames kept per execution */
#define CACHE_BYTES (8u << 20)
#define AHEAD_MAX 8192              /* live frames kept that arrived before their turn */
#define GAP_MS 150                  /* a gap open this long is read from PostgreSQL */
#define RETRY_MS 250                /* after a failed read */
#define TICK_MS 10                   /* also how soon a watcher whose queue drained goes on */
#define CHANNEL_PREFIX "rtes:exec:"

typedef struct pend {
    long long seq;
    wsapp_msg *m;
    size_t len;
    struct pend *next;
} pend;

/* One execution watched on this instance. Its frames lo..hi are cached
 * (contiguous; every watcher sends from here), frames that arrived live
 * beyond hi+1 wait in `ahead` for the ones before them. */
typedef struct stream {
    char *eid;
    uint32_t hash;
    struct stream *next;          /* in the bucket */
    struct stream *sprev, *snext; /* in the hub */
    rtes_watch *head;
    char wid[RTES_ID_MAX];        /* the execution's workflow once known */
    wsapp_msg **ring;             /* CACHE_MAX slots, frame of seq at seq % CACHE_MAX */
    size_t *sizes;                /* their lengths */
    long long lo, hi;             /* cached seqs; empty when hi < lo */
    size_t bytes;
    pend *ahead, *ahead_tail;
    int nahead;
    long long gap_since;          /* ms since `ahead` starts beyond hi+1; 0: no gap */
    int fetching;                 /* a read from hi is in flight */
    int more;                     /* PostgreSQL may hold seqs beyond hi */
    long long retry_at;           /* after a failed read, not before */
    int refs;                     /* watchers and reads in flight */
} stream;

struct rtes_watch {
    rtes_hub *hub;
    wsapp_conn *conn;
    stream *s;
    char wid[RTES_ID_MAX];
    long long next;        /* the seq to send next */
    int fetching;          /* a read of its own (it is behind the cache) is in flight */
    int closed, refs;
    rtes_watch *prev, *next_w; /* in the stream */
};

enum { JOB_FETCH, JOB_DOC };

typedef struct job {
    int kind;
    rtes_hub *hub;
    struct job *next;
    char eid[RTES_ID_MAX];
    /* fetch: for the stream (w NULL) or one watcher */
    stream *s;
    rtes_watch *w;
    long long after;
    int nframes, cap, failed;
    long long *seqs;
    wsapp_msg **msgs;
    size_t *lens;
    char wid[RTES_ID_MAX];
    /* document */
    wsapp_req *req;
    int gone;
    rtes_asker who;
    int status;
    char *body;
    size_t len;
    char msg[160];
} job;

/* A frame from Redis. */
typedef struct live {
    struct live *next;
    long long seq;
    char *eid, *wid;
    wsapp_msg *m;
    size_t len;
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
    stream *streams;
    int nwatch;
    size_t high_water;     /* queued bytes above which a watcher waits */
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

static void enqueue(rtes_hub *h, job *j);
static void job_free(job *j);

/* ------------------------------------------------------------ streams */

static stream *stream_find(rtes_hub *h, const char *eid, uint32_t hv)
{
    for (stream *s = h->buckets[hv % BUCKETS]; s; s = s->next)
        if (s->hash == hv && strcmp(s->eid, eid) == 0)
            return s;
    return NULL;
}

static stream *stream_get(rtes_hub *h, const char *eid)
{
    uint32_t hv = hash_fnv1a_str(eid);
    stream *s = stream_find(h, eid, hv);

    if (s)
        return s;
    s = calloc(1, sizeof(*s));
    if (!s || !(s->eid = strdup(eid)) || !(s->ring = calloc(CACHE_MAX, sizeof(*s->ring))) ||
        !(s->sizes = calloc(CACHE_MAX, sizeof(*s->sizes)))) {
        if (s) {
            free(s->eid);
            free(s->ring);
        }
        free(s);
        return NULL;
    }
    s->hash = hv;
    s->lo = 1;
    s->hi = 0;
    s->more = 1;
    s->next = h->buckets[hv % BUCKETS];
    h->buckets[hv % BUCKETS] = s;
    s->snext = h->streams;
    if (h->streams)
        h->streams->sprev = s;
    h->streams = s;
    return s;
}

static void stream_release(rtes_hub *h, stream *s)
{
    stream **pp;

    if (--s->refs > 0)
        return;
    pp = &h->buckets[s->hash % BUCKETS];
    while (*pp != s)
        pp = &(*pp)->next;
    *pp = s->next;
    if (s->sprev)
        s->sprev->snext = s->snext;
    else
        h->streams = s->snext;
    if (s->snext)
        s->snext->sprev = s->sprev;
    for (long long q = s->lo; q <= s->hi; q++)
        wsapp_msg_unref(s->ring[q % CACHE_MAX]);
    for (pend *p = s->ahead, *n; p; p = n) {
        n = p->next;
        wsapp_msg_unref(p->m);
        free(p);
    }
    free(s->ring);
    free(s->sizes);
    free(s->eid);
    free(s);
}

static void watch_unref(rtes_watch *w)
{
    if (--w->refs == 0)
        free(w);
}

/* Appends the frame of seq hi+1 to the cache, dropping the oldest beyond
 * the bounds (a watcher that still needs them reads them from PostgreSQL). */
static void cache_put(stream *s, long long seq, wsapp_msg *m, size_t len)
{
    while (s->hi >= s->lo && (s->hi - s->lo + 1 >= CACHE_MAX || s->bytes > CACHE_BYTES)) {
        wsapp_msg *old = s->ring[s->lo % CACHE_MAX];

        s->bytes -= s->sizes[s->lo % CACHE_MAX];
        wsapp_msg_unref(old);
        s->ring[s->lo % CACHE_MAX] = NULL;
        s->lo++;
    }
    if (s->hi < s->lo)
        s->lo = seq; /* empty: starts here */
    wsapp_msg_ref(m);
    s->ring[seq % CACHE_MAX] = m;
    s->sizes[seq % CACHE_MAX] = len;
    s->hi = seq;
    s->bytes += len;
}

/* Moves what `ahead` holds from hi+1 on into the cache. */
static void absorb_ahead(stream *s)
{
    while (s->ahead && s->ahead->seq <= s->hi + 1) {
        pend *p = s->ahead;

        s->ahead = p->next;
        if (!s->ahead)
            s->ahead_tail = NULL;
        s->nahead--;
        if (p->seq == s->hi + 1)
            cache_put(s, p->seq, p->m, p->len);
        wsapp_msg_unref(p->m);
        free(p);
    }
    if (!s->ahead)
        s->gap_since = 0;
    else if (!s->gap_since)
        s->gap_since = svc_now_ms();
}

static void hold_ahead(stream *s, long long seq, wsapp_msg *m, size_t len)
{
    pend **pp, *p;

    if (s->ahead_tail && s->ahead_tail->seq < seq) {
        pp = &s->ahead_tail->next; /* the usual case: in order */
    } else {
        pp = &s->ahead;
        while (*pp && (*pp)->seq < seq)
            pp = &(*pp)->next;
        if (*pp && (*pp)->seq == seq)
            return;
    }
    if (s->nahead >= AHEAD_MAX || !(p = malloc(sizeof(*p)))) {
        s->more = 1; /* PostgreSQL has it */
        return;
    }
    wsapp_msg_ref(m);
    p->seq = seq;
    p->m = m;
    p->len = len;
    p->next = *pp;
    *pp = p;
    if (!p->next)
        s->ahead_tail = p;
    s->nahead++;
    if (!s->gap_since)
        s->gap_since = svc_now_ms();
}

static void close_watch(rtes_watch *w, int code, const char *why)
{
    if (w->closed)
        return;
    w->closed = 1;
    wsapp_conn_close(w->conn, code, why);
}

static job *fetch_job(rtes_hub *h, stream *s, rtes_watch *w, long long after)
{
    job *j = calloc(1, sizeof(*j));

    if (!j)
        return NULL;
    j->kind = JOB_FETCH;
    j->hub = h;
    j->s = s;
    j->w = w;
    j->after = after;
    fmt_copy(j->eid, sizeof(j->eid), s->eid);
    s->refs++;
    if (w)
        w->refs++;
    return j;
}

/* A read of its own for a watcher behind the cache. */
static void watch_fetch(rtes_hub *h, rtes_watch *w)
{
    job *j;

    if (w->fetching || w->closed || wsapp_conn_queued(w->conn) >= h->high_water)
        return;
    j = fetch_job(h, w->s, w, w->next - 1);
    if (!j)
        return; /* the tick tries again */
    w->fetching = 1;
    enqueue(h, j);
}

/* Sends the watcher what the cache holds for it. */
static void serve(rtes_hub *h, rtes_watch *w)
{
    stream *s = w->s;

    if (w->closed || w->fetching)
        return;
    if (w->wid[0] && s->wid[0] && strcmp(w->wid, s->wid) != 0) {
        close_watch(w, 1008, "the execution belongs to another workflow");
        return;
    }
    if (s->hi >= s->lo && w->next < s->lo) {
        watch_fetch(h, w);
        return;
    }
    while (w->next <= s->hi && wsapp_conn_queued(w->conn) < h->high_water) {
        if (wsapp_conn_send(w->conn, s->ring[w->next % CACHE_MAX]) < 0) {
            w->closed = 1; /* dropped by wsapp; its close hook follows */
            return;
        }
        w->next++;
        metrics_counter_inc(h->frames_live);
    }
}

/* Reads on from hi when PostgreSQL may hold more and a watcher waits for it. */
static void stream_fetch(rtes_hub *h, stream *s)
{
    int waiting = 0;
    long long slowest = s->hi + 1;
    job *j;

    if (s->fetching || !s->more || svc_now_ms() < s->retry_at)
        return;
    for (rtes_watch *w = s->head; w; w = w->next_w) {
        if (w->closed || w->fetching || wsapp_conn_queued(w->conn) >= h->high_water)
            continue;
        if (w->next == s->hi + 1)
            waiting = 1;
        else if (w->next >= s->lo && w->next < slowest)
            slowest = w->next;
    }
    /* Reading on would push a watcher that is reading out of the cache
     * (into reads of its own): the fast ones wait for it. */
    if (!waiting || s->hi + CHUNK - slowest >= CACHE_MAX)
        return;
    j = fetch_job(h, s, NULL, s->hi);
    if (!j)
        return;
    s->fetching = 1;
    s->more = 0;
    enqueue(h, j);
}

static void serve_all(rtes_hub *h, stream *s)
{
    for (rtes_watch *w = s->head; w; w = w->next_w)
        serve(h, w);
    stream_fetch(h, s);
}

static void deliver(rtes_hub *h, const live *f)
{
    stream *s = stream_find(h, f->eid, hash_fnv1a_str(f->eid));

    if (!s)
        return;
    if (!s->wid[0])
        fmt_copy(s->wid, sizeof(s->wid), f->wid);
    if (f->seq <= s->hi)
        return;
    if (f->seq == s->hi + 1)
        cache_put(s, f->seq, f->m, f->len);
    else
        hold_ahead(s, f->seq, f->m, f->len);
    absorb_ahead(s);
    serve_all(h, s);
}

rtes_watch *rtes_hub_watch(rtes_hub *h, wsapp_conn *c, const char *eid, const char *wid)
{
    stream *s = stream_get(h, eid);
    rtes_watch *w;

    if (!s)
        return NULL;
    w = calloc(1, sizeof(*w));
    if (!w) {
        if (!s->head && s->refs == 0) {
            s->refs = 1;
            stream_release(h, s);
        }
        return NULL;
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
    s->refs++;
    h->nwatch++;
    metrics_gauge_set(h->watchers, h->nwatch);
    serve_all(h, s);
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
    h->nwatch--;
    metrics_gauge_set(h->watchers, h->nwatch);
    stream_release(h, s);
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
    free(j->lens);
    free(j->body);
    free(j);
}

/* Loop: a read came back. */
static void fetched(wsapp *app, void *ud)
{
    job *j = ud;
    rtes_hub *h = j->hub;
    stream *s = j->s;
    rtes_watch *w = j->w;

    (void)app;
    if (!s->wid[0] && j->wid[0])
        fmt_copy(s->wid, sizeof(s->wid), j->wid);
    if (wsapp_stopping(h->app)) {
        /* Only give the references back. */
    } else if (!w) {
        s->fetching = 0;
        if (j->failed) {
            s->more = 1;
            s->retry_at = svc_now_ms() + RETRY_MS;
        } else {
            for (int i = 0; i < j->nframes; i++)
                if (j->seqs[i] == s->hi + 1)
                    cache_put(s, j->seqs[i], j->msgs[i], j->lens[i]);
            if (j->nframes == CHUNK)
                s->more = 1;
            absorb_ahead(s);
        }
        serve_all(h, s);
    } else if (!w->closed) {
        w->fetching = 0;
        if (!j->failed) {
            /* Only what comes before the cache: the rest is sent from it. */
            for (int i = 0; i < j->nframes; i++) {
                if (j->seqs[i] < w->next || (s->hi >= s->lo && j->seqs[i] >= s->lo))
                    continue;
                if (wsapp_conn_queued(w->conn) >= h->high_water)
                    break; /* the rest is read again once it drained */
                if (wsapp_conn_send(w->conn, j->msgs[i]) < 0) {
                    w->closed = 1;
                    break;
                }
                w->next = j->seqs[i] + 1;
                metrics_counter_inc(h->frames_history);
            }
        }
        serve(h, w);
    }
    if (w)
        watch_unref(w);
    stream_release(h, s);
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
    j->lens[j->nframes] = len;
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
    j->lens = calloc(CHUNK, sizeof(*j->lens));
    j->cap = CHUNK;
    if (!j->seqs || !j->msgs || !j->lens || !pg) {
        j->failed = 1;
        return;
    }
    if (j->after == 0 && rtes_store_head(pg, j->eid, &last, j->wid, err, sizeof(err)) < 0) {
        j->failed = 1;
        return;
    }
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
        for (stream *s = h->streams; s; s = s->snext)
            s->more = 1;
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
    l->len = (size_t)(end - nl2 - 1);
    l->m = wsapp_msg_new(nl2 + 1, l->len, 0);
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

    for (stream *s = h->streams; s; s = s->snext) {
        if (s->gap_since && now - s->gap_since >= GAP_MS) {
            /* The frames before `ahead` were lost on the way or are slow:
             * PostgreSQL has them. */
            metrics_counter_inc(h->gap_reads);
            s->gap_since = now;
            s->more = 1;
        }
        /* Watchers that waited for their send queue to drain. */
        serve_all(h, s);
    }
    if (!wsapp_stopping(h->app))
        wsapp_timer_set(t, TICK_MS);
}

/* ------------------------------------------------------------ life */

rtes_hub *rtes_hub_new(wsapp *app, dbpool *db, const rconn_opts *redis, int loaders, size_t send_queue)
{
    rtes_hub *h = calloc(1, sizeof(*h));
    metrics *reg = metrics_default();

    if (!h)
        return NULL;
    h->app = app;
    h->db = db;
    h->ropts = *redis;
    h->nloaders = loaders > 0 ? loaders : 1;
    /* Well below the point where wsapp drops the connection: a watcher
     * that reads slowly waits (and reads from PostgreSQL later), it is not
     * cut off; one frame may still be added past the mark. */
    h->high_water = send_queue / 2 < 131072 ? send_queue / 2 : 131072;
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
    /* Timers are made before the server starts (or on its loop). */
    h->tick = wsapp_timer_new(app, tick, h);
    if (!h->tick) {
        free(h->loaders);
        free(h);
        return NULL;
    }
    h->gap_reads = metrics_counter_get(reg, "rtes_gap_reads_total",
                                       "Live frames that did not arrive in order and were read from PostgreSQL.", NULL);
    return h;
}

static void arm(wsapp *app, void *ud)
{
    rtes_hub *h = ud;

    if (!wsapp_stopping(app) && h->tick)
        wsapp_timer_set(h->tick, TICK_MS);
}

int rtes_hub_start(rtes_hub *h)
{
    int i;

    if (!h || h->started)
        return -1;
    /* Timers are armed on the loop. */
    if (wsapp_post(h->app, arm, h) < 0)
        return -1;
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
    if (!h)
        return;
    wsapp_timer_free(h->tick);
    h->tick = NULL;
    if (!h->started)
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
    /* Streams outlive their watchers only while reads are in flight. */
    while (h->streams) {
        h->streams->refs = 1;
        stream_release(h, h->streams);
    }
    pthread_mutex_destroy(&h->qmu);
    pthread_cond_destroy(&h->qcv);
    pthread_mutex_destroy(&h->imu);
    free(h->loaders);
    free(h);
}
