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
#define CHUNK_BYTES 65536           /* a log chunk (a larger frame gets one of its own) */
#define LOG_BYTES (8u << 20)        /* frames kept per execution, beyond those a watcher is still writing */
#define AHEAD_BYTES (8u << 20)      /* live frames kept that arrived before their turn */
#define GAP_MS 150                  /* a gap open this long is read from PostgreSQL */
#define RETRY_MS 250                /* after a failed read */
#define TICK_MS 50                  /* gaps, retries and pings */
#define WRITE_MAX (256u << 10)      /* bytes offered to one socket per write */
#define IOV_MAX_CHUNKS 8
#define CHANNEL_PREFIX "rtes:exec:"

/* A piece of an execution's log: frames first..first+n-1, already framed
 * (server frames are unmasked, so the bytes are the same for every
 * watcher), back to back. Append-only; shared by reference (loop thread
 * only, so the count is a plain int). A chunk read from PostgreSQL is
 * built on a loader thread and handed over whole. */
typedef struct chunk {
    int refs;
    int linked;          /* still in its stream's log (then `next` is valid) */
    struct chunk *next;  /* the next newer chunk of the log */
    long long first;     /* seq of frame 0 */
    int n, ncap;
    uint32_t *off;       /* where frame i starts */
    size_t len, cap;
    unsigned char *data;
} chunk;

/* One execution watched on this instance. Its log holds frames lo..hi
 * (contiguous); `ahead` holds live frames that arrived beyond hi+1
 * (contiguous among themselves), waiting for PostgreSQL to fill the gap. */
typedef struct stream {
    char *eid;
    uint32_t hash;
    struct stream *next;          /* in the bucket */
    struct stream *sprev, *snext; /* in the hub */
    rtes_watch *head;
    char wid[RTES_ID_MAX];        /* the execution's workflow once known */
    chunk *log, *tail;            /* oldest and newest */
    long long hi;                 /* last seq in the log (0: none yet) */
    size_t bytes;
    chunk *ahead, *ahead_tail;
    size_t ahead_bytes;
    long long gap_since;          /* ms since `ahead` starts beyond hi+1; 0: no gap */
    int fetching;                 /* a read from hi is in flight */
    int more;                     /* PostgreSQL may hold seqs beyond hi */
    long long retry_at;           /* after a failed read, not before */
    int refs;                     /* watchers and reads in flight */
} stream;

/* A watcher is a cursor into its stream's log: byte `pos` of chunk `cur`,
 * inside frame `fi`; `next` is the seq of the first frame not yet wholly
 * written. When it falls behind the log (or joins before it), `cur` is a
 * chunk read from PostgreSQL for it alone. */
struct rtes_watch {
    rtes_hub *hub;
    wsapp_conn *conn;
    stream *s;
    char wid[RTES_ID_MAX];
    long long next;
    chunk *cur;
    size_t pos;
    int fi;
    int fetching;          /* a read of its own is in flight */
    long long progress_ms; /* when the socket last took bytes */
    long long retry_at;    /* after a failed read of its own, not before */
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
    int failed;
    chunk *ch;
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

/* Frames from Redis: one PUBLISH of a burst, for one execution. */
typedef struct live {
    struct live *next;
    char *eid, *wid;
    int n;
    long long *seqs;
    const char **frames;
    size_t *lens;
} live;

struct rtes_hub {
    wsapp *app;
    dbpool *db;
    rconn_opts ropts;
    int nloaders;
    pthread_t bus, *loaders;
    int started;
    atomic_int stop;
    long ping_ms, timeout_ms;
    /* loop thread only */
    stream *buckets[BUCKETS];
    stream *streams;
    int nwatch;
    long long next_ping;
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
    metrics_counter *frames_live, *frames_history, *gap_reads, *timeouts;
};

static void enqueue(rtes_hub *h, job *j);
static void job_free(job *j);

/* ------------------------------------------------------------ chunks */

static chunk *chunk_new(size_t cap)
{
    chunk *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    c->refs = 1;
    c->cap = cap;
    c->data = malloc(cap);
    c->ncap = 64;
    c->off = malloc((size_t)c->ncap * sizeof(*c->off));
    if (!c->data || !c->off) {
        free(c->data);
        free(c->off);
        free(c);
        return NULL;
    }
    return c;
}

static void chunk_unref(chunk *c)
{
    if (c && --c->refs == 0) {
        free(c->data);
        free(c->off);
        free(c);
    }
}

/* Appends the frame of seq first+n with payload p (framed here), growing
 * the chunk when `grow`. Returns 0, or -1 when it does not fit (or OOM). */
static int chunk_put(chunk *c, long long seq, const void *p, size_t len, int grow)
{
    unsigned char hdr[10];
    size_t hl = wsapp_frame_header(hdr, len, 0), need = hl + len;

    if (c->n > 0 && seq != c->first + c->n)
        return -1;
    if (c->len + need > c->cap) {
        size_t ncap = c->cap;
        unsigned char *nd;

        if (!grow || c->len + need > (1u << 30))
            return -1;
        while (ncap < c->len + need)
            ncap *= 2;
        nd = realloc(c->data, ncap);
        if (!nd)
            return -1;
        c->data = nd;
        c->cap = ncap;
    }
    if (c->n == c->ncap) {
        uint32_t *no = realloc(c->off, (size_t)c->ncap * 2 * sizeof(*no));

        if (!no)
            return -1;
        c->off = no;
        c->ncap *= 2;
    }
    if (c->n == 0)
        c->first = seq;
    c->off[c->n++] = (uint32_t)c->len;
    memcpy(c->data + c->len, hdr, hl);
    memcpy(c->data + c->len + hl, p, len);
    c->len += need;
    return 0;
}

static size_t frame_end(const chunk *c, int i)
{
    return i + 1 < c->n ? c->off[i + 1] : c->len;
}

/* The payload of frame i (for copying it into another chunk). */
static const unsigned char *frame_payload(const chunk *c, int i, size_t *len)
{
    const unsigned char *p = c->data + c->off[i];
    size_t hl = (p[1] & 0x7f) == 126 ? 4 : (p[1] & 0x7f) == 127 ? 10 : 2;

    *len = frame_end(c, i) - c->off[i] - hl;
    return p + hl;
}

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
    if (!s || !(s->eid = strdup(eid))) {
        free(s);
        return NULL;
    }
    s->hash = hv;
    s->more = 1;
    s->next = h->buckets[hv % BUCKETS];
    h->buckets[hv % BUCKETS] = s;
    s->snext = h->streams;
    if (h->streams)
        h->streams->sprev = s;
    h->streams = s;
    return s;
}

static void chain_free(chunk *c)
{
    while (c) {
        chunk *n = c->next;

        c->linked = 0;
        chunk_unref(c);
        c = n;
    }
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
    chain_free(s->log);
    chain_free(s->ahead);
    free(s->eid);
    free(s);
}

static long long stream_lo(const stream *s)
{
    return s->log ? s->log->first : s->hi + 1;
}

static void watch_unref(rtes_watch *w)
{
    if (--w->refs == 0) {
        chunk_unref(w->cur);
        free(w);
    }
}

/* Drops the oldest chunks beyond LOG_BYTES (a watcher still writing one
 * keeps it; one that needs an older frame reads it from PostgreSQL). */
static void log_trim(stream *s)
{
    while (s->log && s->log != s->tail && s->bytes > LOG_BYTES) {
        chunk *c = s->log;

        s->log = c->next;
        s->bytes -= c->len;
        c->linked = 0;
        c->next = NULL;
        chunk_unref(c);
    }
}

/* Links chunk c (its frames start at hi+1; the reference is taken). */
static void log_link(stream *s, chunk *c)
{
    c->linked = 1;
    c->next = NULL;
    if (s->tail)
        s->tail->next = c;
    else
        s->log = c;
    s->tail = c;
    s->bytes += c->len;
    s->hi = c->first + c->n - 1;
    log_trim(s);
}

/* Appends the frame of seq hi+1. 0 or -1 (OOM). */
static int log_put(stream *s, long long seq, const void *p, size_t len)
{
    chunk *c;

    if (s->tail && s->tail->n > 0) {
        size_t was = s->tail->len;

        if (chunk_put(s->tail, seq, p, len, 0) == 0) {
            s->bytes += s->tail->len - was;
            s->hi = seq;
            return 0;
        }
    }
    c = chunk_new(len + 10 > CHUNK_BYTES ? len + 10 : CHUNK_BYTES);
    if (!c || chunk_put(c, seq, p, len, 0) < 0) {
        chunk_unref(c);
        return -1;
    }
    log_link(s, c);
    return 0;
}

/* Adds the frames of chunk c beyond hi (the reference is taken): the
 * usual case, c starting at hi+1, links it as it is. */
static void log_take(stream *s, chunk *c)
{
    if (c->first == s->hi + 1) {
        log_link(s, c);
        return;
    }
    for (int i = 0; i < c->n; i++) {
        size_t len;
        const unsigned char *p = frame_payload(c, i, &len);

        if (c->first + i == s->hi + 1 && log_put(s, c->first + i, p, len) < 0)
            break;
    }
    chunk_unref(c);
}

static void ahead_clear(stream *s)
{
    chain_free(s->ahead);
    s->ahead = s->ahead_tail = NULL;
    s->ahead_bytes = 0;
    s->gap_since = 0;
}

static long long ahead_lo(const stream *s) { return s->ahead ? s->ahead->first : 0; }
static long long ahead_hi(const stream *s) { return s->ahead_tail->first + s->ahead_tail->n - 1; }

/* Holds a live frame beyond hi+1. Live frames come in seq order from one
 * instance; one that does not follow the held ones starts them afresh
 * (PostgreSQL has what is dropped). */
static void ahead_put(stream *s, long long seq, const void *p, size_t len)
{
    chunk *c;

    if (s->ahead && seq <= ahead_hi(s))
        return;
    if (s->ahead && (seq != ahead_hi(s) + 1 || s->ahead_bytes + len > AHEAD_BYTES)) {
        ahead_clear(s);
        s->more = 1;
    }
    if (!s->gap_since)
        s->gap_since = svc_now_ms();
    if (s->ahead_tail && chunk_put(s->ahead_tail, seq, p, len, 0) == 0) {
        s->ahead_bytes += len;
        return;
    }
    c = chunk_new(len + 10 > CHUNK_BYTES ? len + 10 : CHUNK_BYTES);
    if (!c || chunk_put(c, seq, p, len, 0) < 0) {
        chunk_unref(c);
        ahead_clear(s);
        s->more = 1;
        return;
    }
    if (s->ahead_tail)
        s->ahead_tail->next = c;
    else
        s->ahead = c;
    s->ahead_tail = c;
    s->ahead_bytes += len;
}

/* Moves `ahead` into the log once the log reaches it. */
static void absorb_ahead(stream *s)
{
    if (!s->ahead)
        return;
    if (ahead_hi(s) <= s->hi) {
        ahead_clear(s);
        return;
    }
    if (ahead_lo(s) > s->hi + 1) {
        if (!s->gap_since)
            s->gap_since = svc_now_ms();
        return;
    }
    /* Each held chunk is linked as it is when it starts at hi+1; of one
     * that overlaps the log, the frames beyond hi are copied. */
    while (s->ahead) {
        chunk *c = s->ahead;

        s->ahead = c->next;
        c->next = NULL;
        log_take(s, c);
    }
    s->ahead_tail = NULL;
    s->ahead_bytes = 0;
    s->gap_since = 0;
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

/* A read of its own for a watcher behind the log. */
static void watch_fetch(rtes_hub *h, rtes_watch *w)
{
    job *j;

    if (w->fetching || w->closed || svc_now_ms() < w->retry_at)
        return;
    j = fetch_job(h, w->s, w, w->next - 1);
    if (!j)
        return; /* the tick tries again */
    w->fetching = 1;
    enqueue(h, j);
}

/* Points the cursor at frame `next`: in the log when it holds it, else
 * (behind the log) a read of its own. Returns 1 when there is something
 * to write. */
static int watch_place(rtes_hub *h, rtes_watch *w)
{
    stream *s = w->s;

    if (w->cur) {
        if (w->fi < w->cur->n)
            return 1;
        if (w->cur->linked && !w->cur->next)
            return 0; /* at the end of the log: appends come here */
        if (w->cur->linked && w->cur->next && w->cur->next->first == w->next) {
            chunk *n = w->cur->next;

            n->refs++;
            chunk_unref(w->cur);
            w->cur = n;
            w->pos = 0;
            w->fi = 0;
            return w->cur->n > 0;
        }
        chunk_unref(w->cur);
        w->cur = NULL;
    }
    if (w->next > s->hi)
        return 0;
    if (w->next < stream_lo(s)) {
        watch_fetch(h, w);
        return 0;
    }
    for (chunk *c = s->log; c; c = c->next)
        if (w->next < c->first + c->n) {
            c->refs++;
            w->cur = c;
            w->fi = (int)(w->next - c->first);
            w->pos = c->off[w->fi];
            return 1;
        }
    return 0;
}

/* The `writable` hook of /rt (rtes_ws): writes as much of the log as the
 * socket takes, in one call. */
int rtes_hub_writable(rtes_hub *h, rtes_watch *w)
{
    struct iovec iov[IOV_MAX_CHUNKS];
    chunk *cs[IOV_MAX_CHUNKS];
    size_t total = 0;
    int niov = 0, mid;
    long n, taken;

    if (!w)
        return 0;
    mid = w->cur && w->fi < w->cur->n && w->pos > w->cur->off[w->fi];
    if (w->closed && !mid)
        return 0;
    if (!w->closed && w->wid[0] && w->s->wid[0] && strcmp(w->wid, w->s->wid) != 0) {
        close_watch(w, 1008, "the execution belongs to another workflow");
        return mid;
    }
    if (w->fetching || !watch_place(h, w))
        return 0;
    /* The cursor's chunk, then the ones after it in the log. */
    for (chunk *c = w->cur; c && niov < IOV_MAX_CHUNKS && total < WRITE_MAX;) {
        size_t from = c == w->cur ? w->pos : 0, to = c->len;

        if (w->closed) /* only the frame in progress */
            to = frame_end(c, w->fi);
        if (to > from) {
            iov[niov].iov_base = c->data + from;
            iov[niov].iov_len = to - from;
            cs[niov++] = c;
            total += to - from;
        }
        if (w->closed || !c->linked || (c->next && c->next->first != c->first + c->n))
            break;
        c = c->next;
    }
    if (!niov)
        return 0;
    n = taken = wsapp_conn_write_raw(w->conn, iov, niov);
    if (n < 0)
        return -1;
    if ((size_t)n < total)
        wsapp_conn_want_write(w->conn); /* the socket is full */
    /* Moves the cursor over what was taken. */
    for (int i = 0; i < niov && n > 0; i++) {
        chunk *c = cs[i];
        size_t take = (size_t)n < iov[i].iov_len ? (size_t)n : iov[i].iov_len;
        int frames = 0;

        if (c != w->cur) {
            c->refs++;
            chunk_unref(w->cur);
            w->cur = c;
            w->pos = 0;
            w->fi = 0;
        }
        w->pos += take;
        n -= (long)take;
        while (w->fi < c->n && frame_end(c, w->fi) <= w->pos) {
            w->fi++;
            frames++;
        }
        w->next = c->first + w->fi;
        metrics_counter_add(c->linked ? h->frames_live : h->frames_history, (uint64_t)frames);
    }
    if (taken > 0)
        w->progress_ms = svc_now_ms();
    /* More may follow (the offer was bounded): go on when the socket allows. */
    if (!w->closed && w->next <= w->s->hi)
        wsapp_conn_want_write(w->conn);
    return w->fi < w->cur->n && w->pos > w->cur->off[w->fi];
}

/* Reads on from hi when PostgreSQL may hold more and a watcher waits for it. */
static void stream_fetch(rtes_hub *h, stream *s)
{
    int waiting = 0, holding = 0;
    long long now = svc_now_ms();
    job *j;

    if (s->fetching || !s->more || now < s->retry_at)
        return;
    for (rtes_watch *w = s->head; w; w = w->next_w) {
        if (w->closed || w->fetching)
            continue;
        if (w->next == s->hi + 1)
            waiting = 1;
        else if (w->cur && w->cur == s->log && now - w->progress_ms < 1000)
            holding = 1;
    }
    /* Reading on while a watcher still writes the oldest chunk would push
     * it out of the log (into reads of its own): the fast ones wait for it,
     * unless it stopped reading. */
    if (!waiting || (holding && s->bytes + CHUNK_BYTES * 4 > LOG_BYTES))
        return;
    j = fetch_job(h, s, NULL, s->hi);
    if (!j)
        return;
    s->fetching = 1;
    s->more = 0;
    enqueue(h, j);
}

/* New frames in the log (or a read done): every watcher that can write
 * asks for the socket; the writes happen when it is writable. */
static void wake_all(rtes_hub *h, stream *s)
{
    for (rtes_watch *w = s->head; w; w = w->next_w)
        if (!w->closed && !w->fetching && w->next <= s->hi)
            wsapp_conn_want_write(w->conn);
    stream_fetch(h, s);
}

static void deliver(rtes_hub *h, const live *f)
{
    stream *s = stream_find(h, f->eid, hash_fnv1a_str(f->eid));
    long long was = 0;

    if (!s)
        return;
    was = s->hi;
    if (!s->wid[0])
        fmt_copy(s->wid, sizeof(s->wid), f->wid);
    for (int i = 0; i < f->n; i++) {
        long long seq = f->seqs[i];

        if (seq <= s->hi)
            continue;
        if (seq == s->hi + 1) {
            if (log_put(s, seq, f->frames[i], f->lens[i]) < 0)
                s->more = 1;
            absorb_ahead(s);
        } else {
            ahead_put(s, seq, f->frames[i], f->lens[i]);
        }
    }
    (void)was;
    wake_all(h, s);
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
    w->progress_ms = svc_now_ms();
    fmt_copy(w->wid, sizeof(w->wid), wid ? wid : "");
    w->next_w = s->head;
    if (s->head)
        s->head->prev = w;
    s->head = w;
    s->refs++;
    h->nwatch++;
    metrics_gauge_set(h->watchers, h->nwatch);
    wsapp_conn_want_write(c);
    stream_fetch(h, s);
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
    chunk_unref(w->cur);
    w->cur = NULL;
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
    chunk_unref(j->ch);
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
    chunk *c = j->ch;

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
        } else if (c && c->n > 0) {
            if (c->n == CHUNK)
                s->more = 1;
            log_take(s, c);
            j->ch = NULL;
            absorb_ahead(s);
        }
        wake_all(h, s);
    } else if (!w->closed) {
        w->fetching = 0;
        if (!j->failed && c && c->n > 0 && c->first == w->next) {
            chunk_unref(w->cur);
            w->cur = c;
            w->pos = 0;
            w->fi = 0;
            j->ch = NULL;
        }
        if (j->failed)
            w->retry_at = svc_now_ms() + RETRY_MS; /* then the tick tries again */
        else
            wsapp_conn_want_write(w->conn);
    }
    if (w)
        watch_unref(w);
    stream_release(h, s);
    job_free(j);
}

static int collect(long long seq, const char *frame, size_t len, void *ud)
{
    job *j = ud;

    /* Seqs are dense: a hole would be a bug, and the rest is read again. */
    return chunk_put(j->ch, seq, frame, len, 1) < 0;
}

static void run_fetch(job *j, PGconn *pg)
{
    char err[512];
    int n;

    j->ch = chunk_new(CHUNK_BYTES);
    if (!j->ch || !pg) {
        j->failed = 1;
        return;
    }
    /* A first read learns the execution's workflow with its events. */
    if (rtes_store_events(pg, j->eid, j->after, 0, CHUNK, j->after == 0 ? j->wid : NULL, collect, j, &n, err,
                          sizeof(err)) < 0)
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

/* A decimal of at most 15 digits at *pp, up to `stop`; -1 when bad. */
static long long dec(const char **pp, const char *end, char stop)
{
    const char *p = *pp;
    long long v = 0;

    if (p >= end || *p < '0' || *p > '9')
        return -1;
    while (p < end && *p >= '0' && *p <= '9') {
        if (v > 100000000000000LL)
            return -1;
        v = v * 10 + (*p++ - '0');
    }
    if (p >= end || *p != stop)
        return -1;
    *pp = p + 1;
    return v;
}

/* A pmessage reply: ["pmessage", pattern, channel, payload], the payload
 * being a burst of one execution's frames (rtes_consumer):
 * "<workflow_id>\n" then, per frame, "<seq> <length>\n<frame>". One copy
 * of the payload is kept; the frames point into it. */
static live *parse_live(const redisReply *r)
{
    const redisReply *ch, *pl;
    const char *p, *end, *nl;
    size_t elen, wlen;
    live *l;
    char *mem;
    int n = 0;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != 4 || r->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(r->element[0]->str, "pmessage") != 0)
        return NULL;
    ch = r->element[2];
    pl = r->element[3];
    if (ch->type != REDIS_REPLY_STRING || pl->type != REDIS_REPLY_STRING || ch->len <= strlen(CHANNEL_PREFIX))
        return NULL;
    end = pl->str + pl->len;
    nl = memchr(pl->str, '\n', pl->len);
    if (!nl)
        return NULL;
    elen = ch->len - strlen(CHANNEL_PREFIX);
    wlen = (size_t)(nl - pl->str);
    if (elen >= RTES_ID_MAX || wlen >= RTES_ID_MAX)
        return NULL;
    /* Count and check the frames first. */
    for (p = nl + 1; p < end; n++) {
        long long seq = dec(&p, end, ' '), len = seq > 0 ? dec(&p, end, '\n') : -1;

        if (seq <= 0 || len < 0 || len > end - p)
            return NULL;
        p += len;
    }
    if (n == 0)
        return NULL;
    l = malloc(sizeof(*l) + (size_t)n * (sizeof(long long) + sizeof(char *) + sizeof(size_t)) + elen + 1 + wlen + 1 +
               pl->len);
    if (!l)
        return NULL;
    l->next = NULL;
    l->n = n;
    l->seqs = (long long *)(l + 1);
    l->frames = (const char **)(l->seqs + n);
    l->lens = (size_t *)(l->frames + n);
    mem = (char *)(l->lens + n);
    l->eid = mem;
    memcpy(l->eid, ch->str + strlen(CHANNEL_PREFIX), elen);
    l->eid[elen] = '\0';
    l->wid = l->eid + elen + 1;
    memcpy(l->wid, pl->str, wlen);
    l->wid[wlen] = '\0';
    mem = l->wid + wlen + 1;
    memcpy(mem, pl->str, pl->len);
    p = mem + wlen + 1;
    end = mem + pl->len;
    for (int i = 0; i < n; i++) {
        l->seqs[i] = dec(&p, end, ' ');
        l->lens[i] = (size_t)dec(&p, end, '\n');
        l->frames[i] = p;
        p += l->lens[i];
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
    int ping = h->ping_ms > 0 && now >= h->next_ping;

    if (ping)
        h->next_ping = now + h->ping_ms;
    for (stream *s = h->streams; s; s = s->snext) {
        if (s->gap_since && now - s->gap_since >= GAP_MS) {
            /* The frames before `ahead` were lost on the way or are slow:
             * PostgreSQL has them. */
            metrics_counter_inc(h->gap_reads);
            s->gap_since = now;
            s->more = 1;
        }
        for (rtes_watch *w = s->head; w; w = w->next_w) {
            if (w->closed)
                continue;
            if (ping) {
                if (now - wsapp_conn_last_rx_ms(w->conn) > h->timeout_ms) {
                    /* It stopped answering: no close handshake with a peer
                     * that does not read. */
                    metrics_counter_inc(h->timeouts);
                    log_event(LOG_INFO, "rtes: watcher answered no ping, closed",
                              "\"connection_id\":%llu", (unsigned long long)wsapp_conn_id(w->conn));
                    w->closed = 1;
                    wsapp_conn_abort(w->conn);
                    continue;
                }
                wsapp_conn_ping(w->conn);
            }
            /* After a failed or refused read, or an out-of-memory. */
            if (!w->fetching && now >= w->retry_at && w->next <= s->hi)
                wsapp_conn_want_write(w->conn);
        }
        stream_fetch(h, s);
    }
    if (!wsapp_stopping(h->app))
        wsapp_timer_set(t, TICK_MS);
}

/* ------------------------------------------------------------ life */

rtes_hub *rtes_hub_new(wsapp *app, dbpool *db, const rconn_opts *redis, int loaders, long ping_ms, long timeout_ms)
{
    rtes_hub *h = calloc(1, sizeof(*h));
    metrics *reg = metrics_default();

    if (!h)
        return NULL;
    h->app = app;
    h->db = db;
    h->ropts = *redis;
    h->nloaders = loaders > 0 ? loaders : 1;
    h->ping_ms = ping_ms;
    h->timeout_ms = timeout_ms;
    h->next_ping = svc_now_ms() + ping_ms;
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
    h->timeouts = metrics_counter_get(reg, "rtes_watcher_timeouts_total",
                                      "Watchers closed because they answered no ping within CLIENT_TIMEOUT.", NULL);
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
