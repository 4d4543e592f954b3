/* sse_out: the SSE streams once their headers are decided. Each stream's
 * socket is taken out of libmicrohttpd (httpd_req_detach) and held by one
 * of a few writer threads, each an epoll set of its own streams. An event
 * is formatted once into a shared, reference-counted frame (already a
 * chunk of the chunked encoding) and written with one send per stream;
 * what the socket does not take waits in the stream's queue (references
 * to frames, not copies) until EPOLLOUT. See sse.h for the interface and
 * docs/api-gateway.md for what a stream costs. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fmt.h"
#include "hash.h"
#include "log.h"
#include "sse.h"

#define SSE_OUT_BUCKETS 4096
#define SSE_OUT_STRIPES 64
#define SSE_OUT_IP_BUCKETS 256
#define SSE_OUT_IOV 16
#define SSE_OUT_EVENTS 256
/* A client has nothing to send once its request is in; past this much it
 * is not an SSE client and is cut. */
#define SSE_OUT_RX_MAX 16384

/* One event as it goes on the wire, shared by every stream it goes to. A
 * chunked frame is "<hex>\r\n" frame "\r\n" (an HTTP/1.0 stream writes the
 * middle part only); a raw one (a stream's first bytes: the response head
 * and the replay) is written whole. */
typedef struct sse_frame {
    atomic_uint refs;
    uint32_t len;    /* bytes at data */
    uint8_t hlen;    /* the chunk header's length; 0 for a raw frame */
    uint8_t chunked; /* data is one chunk */
    char *cid;       /* the client id it is for (in the same allocation), or NULL */
    char data[];
} sse_frame;

typedef struct sse_qent {
    struct sse_qent *next;
    sse_frame *f;
} sse_qent;

enum { ST_REPLAYING, ST_OVERFLOW, ST_LIVE };

typedef struct sse_client sse_client;
typedef struct sse_ip sse_ip;

/* A stream, owned by its writer thread from the moment it is registered
 * (sse_out_open) except for the fields the opener sets before. */
struct sse_stream {
    sse_stream *next, *prev;   /* its client's streams on this writer */
    sse_stream *anext, *aprev; /* the writer's live streams */
    sse_stream *bnext, *bprev; /* the writer's streams with something queued */
    sse_client *cl;
    sse_ip *ip;
    sse_qent *qhead, *qtail;
    uint32_t qoff;   /* bytes of the head entry's part already written */
    uint32_t queued; /* bytes waiting in the queue */
    uint32_t rx;     /* bytes the client sent after its request (thrown away) */
    uint32_t since;  /* monotonic s: queued data last made progress */
    int fd;
    uint8_t state, chunked, blocked, widx;
};

/* A client id held here: its streams on each writer. Created by the first
 * stream's opener, freed with the last stream (refs under the stripe lock);
 * heads[i] is touched by writer i only. */
struct sse_client {
    sse_client *next;
    int refs;
    unsigned bucket;
    sse_stream **heads; /* [writers], then the client id */
};

struct sse_ip {
    sse_ip *next;
    int n;
    char addr[64];
};

enum { M_DELIVER, M_HEARTBEAT, M_REGISTER, M_START, M_CANCEL, M_END_ALL, M_STOP };

typedef struct sse_msg {
    struct sse_msg *next;
    int type;
    int fd;
    int chunked;
    long long threshold;
    sse_stream *s;
    sse_frame *f;
} sse_msg;

typedef struct sse_writer {
    sse_out *o;
    int idx, ep, evfd;
    pthread_t thread;
    int started;
    pthread_mutex_t mu; /* the inbox and `dead` */
    sse_msg *in_head, *in_tail;
    int dead;           /* stopped: takes no more messages */
    sse_stream *live;    /* writer thread only */
    sse_stream *blocked; /* writer thread only */
} sse_writer;

struct sse_out {
    sse_out_config cfg;
    sse_out_metrics m;
    pthread_mutex_t locks[SSE_OUT_STRIPES];
    sse_client *buckets[SSE_OUT_BUCKETS];
    pthread_mutex_t ipmu;
    sse_ip *ips[SSE_OUT_IP_BUCKETS];
    atomic_long nstreams; /* opened and not yet freed */
    atomic_long nlive;
    atomic_uint next_writer;
    int nwriters;
    sse_writer *w;
};

static uint32_t now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)ts.tv_sec;
}

/* ---- frames ------------------------------------------------------------- */

static sse_frame *frame_alloc(size_t len, size_t cidlen)
{
    sse_frame *f;

    if (len > UINT32_MAX - 64)
        return NULL;
    f = malloc(sizeof(*f) + len + 16 + (cidlen ? cidlen + 1 : 0));
    if (!f)
        return NULL;
    atomic_init(&f->refs, 1);
    f->len = 0;
    f->hlen = 0;
    f->chunked = 0;
    f->cid = NULL;
    return f;
}

/* A chunked frame of `text` (the SSE frame); cid may be NULL. */
static sse_frame *frame_chunk(const char *cid, size_t cidlen, const char *text, size_t len)
{
    sse_frame *f = frame_alloc(len, cidlen);
    int h;

    if (!f)
        return NULL;
    h = snprintf(f->data, 16, "%zx\r\n", len);
    memcpy(f->data + h, text, len);
    memcpy(f->data + h + len, "\r\n", 2);
    f->hlen = (uint8_t)h;
    f->chunked = 1;
    f->len = (uint32_t)(h + len + 2);
    if (cid) {
        f->cid = f->data + f->len;
        memcpy(f->cid, cid, cidlen);
        f->cid[cidlen] = '\0';
    }
    return f;
}

static void frame_unref(sse_frame *f)
{
    if (f && atomic_fetch_sub_explicit(&f->refs, 1, memory_order_acq_rel) == 1)
        free(f);
}

static void frame_ref(sse_frame *f)
{
    atomic_fetch_add_explicit(&f->refs, 1, memory_order_relaxed);
}

/* The bytes of `f` that stream `s` writes. */
static void frame_part(const sse_stream *s, const sse_frame *f, const char **p, size_t *n)
{
    if (f->chunked && !s->chunked) {
        *p = f->data + f->hlen;
        *n = f->len - f->hlen - 2;
    } else {
        *p = f->data;
        *n = f->len;
    }
}

/* The SSE id of a chunked event frame ("id: N" first), else -1. */
static long long frame_id(const sse_frame *f)
{
    const char *p = f->data + f->hlen;

    if (!f->chunked || f->len < (uint32_t)f->hlen + 6 || memcmp(p, "id: ", 4) != 0)
        return -1;
    return strtoll(p + 4, NULL, 10);
}

/* ---- the client table --------------------------------------------------- */

static pthread_mutex_t *stripe(sse_out *o, unsigned bucket)
{
    return &o->locks[bucket % SSE_OUT_STRIPES];
}

static const char *client_cid(const sse_out *o, const sse_client *c)
{
    return (const char *)(c->heads + o->nwriters);
}

static sse_client *client_find_locked(sse_out *o, unsigned b, const char *cid)
{
    sse_client *c;

    for (c = o->buckets[b]; c && strcmp(client_cid(o, c), cid) != 0; c = c->next)
        ;
    return c;
}

static sse_client *client_ref(sse_out *o, const char *cid)
{
    unsigned b = hash_fnv1a_str(cid) % SSE_OUT_BUCKETS;
    size_t n = strlen(cid);
    sse_client *c;

    pthread_mutex_lock(stripe(o, b));
    c = client_find_locked(o, b, cid);
    if (!c) {
        c = calloc(1, sizeof(*c) + (size_t)o->nwriters * sizeof(sse_stream *) + n + 1);
        if (c) {
            c->heads = (sse_stream **)(void *)(c + 1);
            memcpy((char *)(c->heads + o->nwriters), cid, n + 1);
            c->bucket = b;
            c->next = o->buckets[b];
            o->buckets[b] = c;
        }
    }
    if (c)
        c->refs++;
    pthread_mutex_unlock(stripe(o, b));
    return c;
}

static void client_unref(sse_out *o, sse_client *c)
{
    unsigned b = c->bucket;

    pthread_mutex_lock(stripe(o, b));
    if (--c->refs == 0) {
        sse_client **pp = &o->buckets[b];

        while (*pp != c)
            pp = &(*pp)->next;
        *pp = c->next;
        free(c);
    }
    pthread_mutex_unlock(stripe(o, b));
}

/* ---- per-address limit -------------------------------------------------- */

static sse_ip *ip_ref(sse_out *o, const char *addr)
{
    unsigned b = hash_fnv1a_str(addr) % SSE_OUT_IP_BUCKETS;
    sse_ip *ip;

    pthread_mutex_lock(&o->ipmu);
    for (ip = o->ips[b]; ip && strcmp(ip->addr, addr) != 0; ip = ip->next)
        ;
    if (ip && ip->n >= o->cfg.max_per_ip) {
        ip = NULL;
    } else if (!ip && (ip = calloc(1, sizeof(*ip)))) {
        fmt_copy(ip->addr, sizeof(ip->addr), addr);
        ip->next = o->ips[b];
        o->ips[b] = ip;
    }
    if (ip)
        ip->n++;
    pthread_mutex_unlock(&o->ipmu);
    return ip;
}

static void ip_unref(sse_out *o, sse_ip *ip)
{
    if (!ip)
        return;
    pthread_mutex_lock(&o->ipmu);
    if (--ip->n == 0) {
        sse_ip **pp = &o->ips[hash_fnv1a_str(ip->addr) % SSE_OUT_IP_BUCKETS];

        while (*pp != ip)
            pp = &(*pp)->next;
        *pp = ip->next;
        free(ip);
    }
    pthread_mutex_unlock(&o->ipmu);
}

/* ---- the inbox ---------------------------------------------------------- */

/* Hands `m` to writer w (taken on success). -1 when the writer stopped. */
static int writer_push(sse_writer *w, sse_msg *m)
{
    int wake;

    m->next = NULL;
    pthread_mutex_lock(&w->mu);
    if (w->dead) {
        pthread_mutex_unlock(&w->mu);
        return -1;
    }
    wake = w->in_head == NULL;
    if (w->in_tail)
        w->in_tail->next = m;
    else
        w->in_head = m;
    w->in_tail = m;
    pthread_mutex_unlock(&w->mu);
    if (wake) {
        uint64_t one = 1;

        if (write(w->evfd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            log_warn("sse: cannot wake a writer: %s", strerror(errno));
    }
    return 0;
}

static int push_new(sse_writer *w, int type, sse_stream *s, sse_frame *f)
{
    sse_msg *m = calloc(1, sizeof(*m));

    if (!m)
        return -1;
    m->type = type;
    m->s = s;
    m->f = f;
    m->fd = -1;
    if (writer_push(w, m) < 0) {
        free(m);
        return -1;
    }
    return 0;
}

/* ---- streams (writer thread) -------------------------------------------- */

static void queue_free(sse_stream *s)
{
    for (sse_qent *q = s->qhead, *n; q; q = n) {
        n = q->next;
        frame_unref(q->f);
        free(q);
    }
    s->qhead = s->qtail = NULL;
    s->qoff = s->queued = 0;
}

/* What every path that ends a stream shares; no list is touched. */
static void stream_free(sse_out *o, sse_stream *s)
{
    if (s->fd >= 0)
        close(s->fd);
    queue_free(s);
    client_unref(o, s->cl);
    ip_unref(o, s->ip);
    atomic_fetch_sub(&o->nstreams, 1);
    free(s);
}

static void blocked_set(sse_writer *w, sse_stream *s, int on)
{
    if (on == s->blocked)
        return;
    if (on) {
        s->bprev = NULL;
        s->bnext = w->blocked;
        if (w->blocked)
            w->blocked->bprev = s;
        w->blocked = s;
    } else {
        if (s->bprev)
            s->bprev->bnext = s->bnext;
        else
            w->blocked = s->bnext;
        if (s->bnext)
            s->bnext->bprev = s->bprev;
        s->bnext = s->bprev = NULL;
    }
    s->blocked = (uint8_t)on;
}

/* Ends a registered stream: `why` NULL is a plain end (client gone,
 * cancelled), else it is counted and logged as a drop. */
static void stream_close(sse_writer *w, sse_stream *s, const char *why)
{
    sse_out *o = w->o;

    if (s->fd >= 0)
        epoll_ctl(w->ep, EPOLL_CTL_DEL, s->fd, NULL);
    if (s->prev)
        s->prev->next = s->next;
    else if (s->cl->heads[w->idx] == s)
        s->cl->heads[w->idx] = s->next;
    if (s->next)
        s->next->prev = s->prev;
    blocked_set(w, s, 0);
    if (s->state == ST_LIVE) {
        if (s->aprev)
            s->aprev->anext = s->anext;
        else
            w->live = s->anext;
        if (s->anext)
            s->anext->aprev = s->aprev;
        atomic_fetch_sub(&o->nlive, 1);
        metrics_gauge_add(o->m.clients, -1);
    }
    if (why) {
        metrics_counter_inc(o->m.dropped);
        if (log_enabled(LOG_INFO))
            log_event(LOG_INFO, "sse_client_dropped", "\"client_id\":\"%s\",\"reason\":\"%s\"",
                      client_cid(o, s->cl), why);
    }
    stream_free(o, s);
}

static int enqueue(sse_stream *s, sse_frame *f, uint32_t off)
{
    sse_qent *q = malloc(sizeof(*q));
    const char *p;
    size_t n;

    if (!q)
        return -1;
    frame_part(s, f, &p, &n);
    frame_ref(f);
    q->f = f;
    q->next = NULL;
    if (s->qtail)
        s->qtail->next = q;
    else
        s->qhead = q;
    s->qtail = q;
    if (s->qhead == q)
        s->qoff = off;
    s->queued += (uint32_t)(n - off);
    return 0;
}

/* Drops `n` written bytes from the front of the queue. */
static void consume(sse_stream *s, size_t n)
{
    while (n && s->qhead) {
        sse_qent *q = s->qhead;
        const char *p;
        size_t len, rest;

        frame_part(s, q->f, &p, &len);
        rest = len - s->qoff;
        if (n < rest) {
            s->qoff += (uint32_t)n;
            s->queued -= (uint32_t)n;
            return;
        }
        n -= rest;
        s->queued -= (uint32_t)rest;
        s->qhead = q->next;
        if (!s->qhead)
            s->qtail = NULL;
        s->qoff = 0;
        frame_unref(q->f);
        free(q);
    }
}

/* Writes what the queue holds until the socket is full. -1 when the stream
 * was closed (the client is gone). */
static int stream_flush(sse_writer *w, sse_stream *s)
{
    while (s->qhead) {
        struct iovec iov[SSE_OUT_IOV];
        struct msghdr mh;
        size_t total = 0;
        int n = 0;
        ssize_t r;

        for (sse_qent *q = s->qhead; q && n < SSE_OUT_IOV; q = q->next, n++) {
            const char *p;
            size_t len;

            frame_part(s, q->f, &p, &len);
            if (n == 0) {
                p += s->qoff;
                len -= s->qoff;
            }
            iov[n].iov_base = (void *)(uintptr_t)p;
            iov[n].iov_len = len;
            total += len;
        }
        memset(&mh, 0, sizeof(mh));
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t)n;
        r = sendmsg(s->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            stream_close(w, s, NULL);
            return -1;
        }
        if (r > 0)
            s->since = now_s();
        consume(s, (size_t)r);
        if ((size_t)r < total)
            break;
    }
    blocked_set(w, s, s->qhead != NULL);
    return 0;
}

/* Hands a frame to one stream. Returns 1 when it was taken for a live
 * stream (written or queued), 0 otherwise. */
static int stream_send(sse_writer *w, sse_stream *s, sse_frame *f)
{
    const char *p;
    size_t n;
    ssize_t r = 0;

    frame_part(s, f, &p, &n);
    if (s->state == ST_OVERFLOW)
        return 0;
    if (s->state == ST_REPLAYING) {
        /* Held until the replay is written; bounded like a live queue. */
        if (s->queued + n > (size_t)w->o->cfg.client_buffer_bytes || enqueue(s, f, 0) < 0) {
            queue_free(s);
            s->state = ST_OVERFLOW;
        }
        return 0;
    }
    if (s->qhead) {
        if (s->queued + n > (size_t)w->o->cfg.client_buffer_bytes) {
            stream_close(w, s, "buffer full");
            return 0;
        }
        if (enqueue(s, f, 0) < 0) {
            stream_close(w, s, "out of memory");
            return 0;
        }
        return 1;
    }
    /* The common case: nothing waiting, one send, nothing kept. */
    r = send(s->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r == (ssize_t)n)
        return 1;
    if (r < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            stream_close(w, s, NULL);
            return 0;
        }
        r = 0;
    }
    if (enqueue(s, f, (uint32_t)r) < 0) {
        stream_close(w, s, "out of memory");
        return 0;
    }
    s->since = now_s();
    blocked_set(w, s, 1);
    return 1;
}

/* Readiness of a stream's socket. */
static void stream_event(sse_writer *w, sse_stream *s, uint32_t events)
{
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        char b[4096];

        for (;;) {
            ssize_t r = recv(s->fd, b, sizeof(b), MSG_DONTWAIT);

            if (r > 0) {
                s->rx += (uint32_t)r;
                if (s->rx > SSE_OUT_RX_MAX) {
                    stream_close(w, s, "sent data");
                    return;
                }
                continue;
            }
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            stream_close(w, s, NULL); /* the client closed or reset */
            return;
        }
    }
    if ((events & EPOLLOUT) && s->qhead)
        stream_flush(w, s);
}

/* Writes the head and replay (`init`), then what came meanwhile newer
 * than `threshold`; the stream is live from here. */
static void stream_start(sse_writer *w, sse_stream *s, int fd, int chunked, sse_frame *init, long long threshold)
{
    sse_out *o = w->o;
    sse_qent *held = s->qhead;
    struct epoll_event ev;
    uint64_t kept = 0;

    s->fd = fd;
    s->chunked = (uint8_t)chunked;
    if (s->state == ST_OVERFLOW) {
        /* More came during the replay than a client may have waiting: the
         * replay goes out, then the stream ends and the client reconnects
         * from the last id it got. */
        (void)send(fd, init->data, init->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        frame_unref(init);
        stream_close(w, s, "buffer full");
        return;
    }
    s->qhead = s->qtail = NULL;
    s->qoff = s->queued = 0;
    if (enqueue(s, init, 0) < 0) {
        s->qhead = held;
        frame_unref(init);
        stream_close(w, s, "out of memory");
        return;
    }
    frame_unref(init);
    for (sse_qent *q = held, *n; q; q = n) {
        n = q->next;
        if (frame_id(q->f) > threshold && enqueue(s, q->f, 0) == 0)
            kept++;
        frame_unref(q->f);
        free(q);
    }
    s->state = ST_LIVE;
    s->aprev = NULL;
    s->anext = w->live;
    if (w->live)
        w->live->aprev = s;
    w->live = s;
    atomic_fetch_add(&o->nlive, 1);
    metrics_gauge_add(o->m.clients, 1);
    metrics_counter_add(o->m.delivered, kept);
    s->since = now_s();
    /* Edge-triggered: EPOLLOUT comes only after a write found the socket
     * full, so a stream that keeps up costs no epoll traffic at all. */
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = s;
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        log_warn("sse: cannot watch a stream: %s", strerror(errno));
        s->fd = -1;
        close(fd);
        stream_close(w, s, NULL);
        return;
    }
    stream_flush(w, s);
}

static void writer_deliver(sse_writer *w, sse_frame *f)
{
    sse_out *o = w->o;
    unsigned b = hash_fnv1a_str(f->cid) % SSE_OUT_BUCKETS;
    sse_stream *s = NULL;
    sse_client *c;
    uint64_t n = 0;

    pthread_mutex_lock(stripe(o, b));
    c = client_find_locked(o, b, f->cid);
    if (c)
        s = c->heads[w->idx]; /* its streams hold the entry from here */
    pthread_mutex_unlock(stripe(o, b));
    for (sse_stream *next; s; s = next) {
        next = s->next;
        n += (uint64_t)stream_send(w, s, f);
    }
    if (n)
        metrics_counter_add(o->m.delivered, n);
}

static void writer_heartbeat(sse_writer *w, sse_frame *f)
{
    for (sse_stream *s = w->live, *next; s; s = next) {
        next = s->anext;
        stream_send(w, s, f);
    }
}

/* A client that has taken nothing for SSE_WRITE_TIMEOUT_SECONDS while
 * something waited for it is cut. */
static void writer_sweep(sse_writer *w)
{
    uint32_t now = now_s();

    for (sse_stream *s = w->blocked, *next; s; s = next) {
        next = s->bnext;
        if (now - s->since >= (uint32_t)w->o->cfg.write_timeout_s)
            stream_close(w, s, "write timeout");
    }
}

/* Ends every live stream cleanly (the chunked encoding's last chunk when
 * the socket takes it), so clients reconnect elsewhere and replay. */
static void writer_end_all(sse_writer *w)
{
    while (w->live) {
        sse_stream *s = w->live;

        if (stream_flush(w, s) < 0)
            continue;
        if (!s->qhead && s->chunked)
            (void)send(s->fd, "0\r\n\r\n", 5, MSG_NOSIGNAL | MSG_DONTWAIT);
        shutdown(s->fd, SHUT_WR);
        stream_close(w, s, NULL);
    }
}

/* One message; returns 1 for M_STOP. With `dead` set (after the stop) no
 * stream is touched: an opener whose message was refused frees its own. */
static int writer_handle(sse_writer *w, sse_msg *m, int dead)
{
    switch (m->type) {
    case M_DELIVER:
        if (!dead)
            writer_deliver(w, m->f);
        frame_unref(m->f);
        break;
    case M_HEARTBEAT:
        if (!dead)
            writer_heartbeat(w, m->f);
        frame_unref(m->f);
        break;
    case M_REGISTER:
        if (!dead) {
            sse_stream **head = &m->s->cl->heads[w->idx];

            m->s->prev = NULL;
            m->s->next = *head;
            if (*head)
                (*head)->prev = m->s;
            *head = m->s;
        }
        break;
    case M_START:
        if (dead) {
            m->s->fd = m->fd;
            stream_free(w->o, m->s);
            frame_unref(m->f);
        } else {
            stream_start(w, m->s, m->fd, m->chunked, m->f, m->threshold);
        }
        break;
    case M_CANCEL:
        if (dead)
            stream_free(w->o, m->s);
        else
            stream_close(w, m->s, NULL);
        break;
    case M_END_ALL:
        if (!dead)
            writer_end_all(w);
        break;
    case M_STOP:
        return 1;
    }
    return 0;
}

/* Runs the inbox; 1 once stopped. After the stop the writer takes no
 * more messages (`dead`, set under the inbox lock), and what came up to
 * then is answered without touching a stream's lists. */
static int writer_inbox(sse_writer *w)
{
    sse_msg *m;
    int stop = 0;

    pthread_mutex_lock(&w->mu);
    m = w->in_head;
    w->in_head = w->in_tail = NULL;
    pthread_mutex_unlock(&w->mu);
    for (;;) {
        while (m) {
            sse_msg *next = m->next;

            if (writer_handle(w, m, stop))
                stop = 1;
            free(m);
            m = next;
        }
        if (!stop || w->dead)
            return stop;
        pthread_mutex_lock(&w->mu);
        w->dead = 1;
        m = w->in_head;
        w->in_head = w->in_tail = NULL;
        pthread_mutex_unlock(&w->mu);
    }
}

static void *writer_main(void *ud)
{
    sse_writer *w = ud;
    struct epoll_event evs[SSE_OUT_EVENTS];
    uint32_t last = now_s();

    for (;;) {
        int n = epoll_wait(w->ep, evs, SSE_OUT_EVENTS, 1000);

        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) {
                uint64_t v;

                if (read(w->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                    log_warn("sse: writer wake-up: %s", strerror(errno));
                continue;
            }
            stream_event(w, evs[i].data.ptr, evs[i].events);
        }
        if (writer_inbox(w))
            break;
        if (now_s() != last) {
            last = now_s();
            writer_sweep(w);
        }
    }
    writer_end_all(w);
    return NULL;
}

/* ---- the interface ------------------------------------------------------ */

sse_out *sse_out_new(const sse_out_config *oc, const sse_out_metrics *m, char *err, size_t errlen)
{
    sse_out *o = calloc(1, sizeof(*o));

    if (!o) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    o->cfg = *oc;
    o->m = *m;
    o->nwriters = oc->writers < 1 ? 1 : oc->writers > SSE_OUT_MAX_WRITERS ? SSE_OUT_MAX_WRITERS : oc->writers;
    for (int i = 0; i < SSE_OUT_STRIPES; i++)
        pthread_mutex_init(&o->locks[i], NULL);
    pthread_mutex_init(&o->ipmu, NULL);
    o->w = calloc((size_t)o->nwriters, sizeof(*o->w));
    if (!o->w) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (int i = 0; i < o->nwriters; i++) {
        o->w[i].evfd = o->w[i].ep = -1;
        pthread_mutex_init(&o->w[i].mu, NULL);
    }
    for (int i = 0; i < o->nwriters; i++) {
        sse_writer *w = &o->w[i];
        struct epoll_event ev;

        w->o = o;
        w->idx = i;
        w->ep = epoll_create1(EPOLL_CLOEXEC);
        w->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.ptr = NULL;
        if (w->ep < 0 || w->evfd < 0 || epoll_ctl(w->ep, EPOLL_CTL_ADD, w->evfd, &ev) < 0 ||
            pthread_create(&w->thread, NULL, writer_main, w) != 0) {
            snprintf(err, errlen, "cannot start an SSE writer: %s", strerror(errno));
            goto fail;
        }
        w->started = 1;
    }
    return o;
fail:
    sse_out_stop(o);
    sse_out_free(o);
    return NULL;
}

sse_stream *sse_out_open(sse_out *o, const char *cid, const char *remote, int *why)
{
    sse_stream *s;
    sse_writer *w;

    *why = SSE_OUT_FULL;
    if (atomic_fetch_add(&o->nstreams, 1) >= o->cfg.max_streams) {
        atomic_fetch_sub(&o->nstreams, 1);
        return NULL;
    }
    s = calloc(1, sizeof(*s));
    if (!s) {
        atomic_fetch_sub(&o->nstreams, 1);
        *why = SSE_OUT_FAILED;
        return NULL;
    }
    s->fd = -1;
    s->state = ST_REPLAYING;
    if (o->cfg.max_per_ip > 0 && remote && *remote && !(s->ip = ip_ref(o, remote))) {
        *why = SSE_OUT_FULL_ADDRESS;
        free(s);
        atomic_fetch_sub(&o->nstreams, 1);
        return NULL;
    }
    s->cl = client_ref(o, cid);
    if (!s->cl) {
        ip_unref(o, s->ip);
        free(s);
        atomic_fetch_sub(&o->nstreams, 1);
        *why = SSE_OUT_FAILED;
        return NULL;
    }
    s->widx = (uint8_t)(atomic_fetch_add(&o->next_writer, 1) % (unsigned)o->nwriters);
    w = &o->w[s->widx];
    if (push_new(w, M_REGISTER, s, NULL) < 0) {
        *why = SSE_OUT_FAILED;
        stream_free(o, s);
        return NULL;
    }
    return s;
}

int sse_out_start(sse_out *o, sse_stream *s, int fd, int chunked, const char *head, size_t headlen,
                  const char *body, size_t bodylen, long long threshold)
{
    sse_writer *w = &o->w[s->widx];
    sse_frame *init = frame_alloc(headlen + bodylen + 32, 0);
    sse_msg *m = init ? calloc(1, sizeof(*m)) : NULL;
    size_t n = 0;

    if (!m) {
        free(init);
        close(fd);
        sse_out_cancel(o, s);
        return -1;
    }
    /* A client that stops reading holds what its socket's send buffer
     * takes on top of its queue (client_buffer_bytes): bounded here, or
     * the kernel's autotuning lets it grow to tcp_wmem's maximum (4 MiB). */
    if (o->cfg.send_buffer_bytes > 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &o->cfg.send_buffer_bytes, sizeof(o->cfg.send_buffer_bytes));
    memcpy(init->data, head, headlen);
    n = headlen;
    if (chunked && bodylen)
        n += (size_t)snprintf(init->data + n, 16, "%zx\r\n", bodylen);
    memcpy(init->data + n, body, bodylen);
    n += bodylen;
    if (chunked && bodylen) {
        memcpy(init->data + n, "\r\n", 2);
        n += 2;
    }
    init->len = (uint32_t)n;
    m->type = M_START;
    m->s = s;
    m->f = init;
    m->fd = fd;
    m->chunked = chunked;
    m->threshold = threshold;
    if (writer_push(w, m) < 0) {
        /* The writer stopped: nothing else touches the stream now. */
        free(m);
        frame_unref(init);
        s->fd = fd;
        stream_free(o, s);
        return -1;
    }
    return 0;
}

void sse_out_cancel(sse_out *o, sse_stream *s)
{
    if (push_new(&o->w[s->widx], M_CANCEL, s, NULL) < 0)
        stream_free(o, s);
}

static void broadcast(sse_out *o, int type, sse_frame *f)
{
    for (int i = 0; i < o->nwriters; i++) {
        frame_ref(f);
        if (push_new(&o->w[i], type, NULL, f) < 0)
            frame_unref(f);
    }
    frame_unref(f);
}

void sse_out_deliver(sse_out *o, const char *cid, size_t cidlen, const char *frame, size_t len)
{
    unsigned b;
    char key[SSE_CLIENT_ID_MAX + 1];
    int held;
    sse_frame *f;

    if (cidlen > SSE_CLIENT_ID_MAX)
        return;
    memcpy(key, cid, cidlen);
    key[cidlen] = '\0';
    b = hash_fnv1a_str(key) % SSE_OUT_BUCKETS;
    pthread_mutex_lock(stripe(o, b));
    held = client_find_locked(o, b, key) != NULL;
    pthread_mutex_unlock(stripe(o, b));
    if (!held || !(f = frame_chunk(key, cidlen, frame, len)))
        return;
    broadcast(o, M_DELIVER, f);
}

void sse_out_heartbeat(sse_out *o, const char *frame, size_t len)
{
    sse_frame *f = frame_chunk(NULL, 0, frame, len);

    if (f)
        broadcast(o, M_HEARTBEAT, f);
}

int sse_out_has(sse_out *o, const char *cid)
{
    unsigned b = hash_fnv1a_str(cid) % SSE_OUT_BUCKETS;
    int found;

    pthread_mutex_lock(stripe(o, b));
    found = client_find_locked(o, b, cid) != NULL;
    pthread_mutex_unlock(stripe(o, b));
    return found;
}

size_t sse_out_client_ids(sse_out *o, char (**out)[SSE_CLIENT_ID_MAX + 1])
{
    char (*ids)[SSE_CLIENT_ID_MAX + 1] = NULL;
    size_t n = 0, cap = 0;

    for (unsigned b = 0; b < SSE_OUT_BUCKETS; b++) {
        if (!o->buckets[b])
            continue;
        pthread_mutex_lock(stripe(o, b));
        for (sse_client *c = o->buckets[b]; c; c = c->next) {
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 256;
                void *nc = realloc(ids, ncap * sizeof(*ids));

                if (!nc)
                    break;
                ids = nc;
                cap = ncap;
            }
            fmt_copy(ids[n++], sizeof(ids[0]), client_cid(o, c));
        }
        pthread_mutex_unlock(stripe(o, b));
    }
    *out = ids;
    return n;
}

long sse_out_clients(sse_out *o)
{
    return o ? atomic_load(&o->nlive) : 0;
}

void sse_out_end_all(sse_out *o)
{
    for (int i = 0; o && o->w && i < o->nwriters; i++)
        if (o->w[i].started && push_new(&o->w[i], M_END_ALL, NULL, NULL) < 0)
            log_warn("sse: cannot end the streams of writer %d (out of memory)", i);
}

void sse_out_stop(sse_out *o)
{
    if (!o || !o->w)
        return;
    for (int i = 0; i < o->nwriters; i++) {
        sse_writer *w = &o->w[i];

        if (!w->started)
            continue;
        if (push_new(w, M_STOP, NULL, NULL) == 0)
            pthread_join(w->thread, NULL);
        w->started = 0;
    }
}

void sse_out_free(sse_out *o)
{
    if (!o)
        return;
    sse_out_stop(o);
    for (int i = 0; o->w && i < o->nwriters; i++) {
        sse_writer *w = &o->w[i];

        pthread_mutex_lock(&w->mu);
        w->dead = 1;
        for (sse_msg *m = w->in_head, *n; m; m = n) {
            n = m->next;
            writer_handle(w, m, 1);
            free(m);
        }
        w->in_head = w->in_tail = NULL;
        pthread_mutex_unlock(&w->mu);
        if (w->ep >= 0)
            close(w->ep);
        if (w->evfd >= 0)
            close(w->evfd);
        pthread_mutex_destroy(&w->mu);
    }
    free(o->w);
    for (unsigned b = 0; b < SSE_OUT_BUCKETS; b++)
        for (sse_client *c = o->buckets[b], *n; c; c = n) {
            n = c->next;
            free(c);
        }
    for (unsigned b = 0; b < SSE_OUT_IP_BUCKETS; b++)
        for (sse_ip *ip = o->ips[b], *n; ip; ip = n) {
            n = ip->next;
            free(ip);
        }
    for (int i = 0; i < SSE_OUT_STRIPES; i++)
        pthread_mutex_destroy(&o->locks[i]);
    pthread_mutex_destroy(&o->ipmu);
    free(o);
}
