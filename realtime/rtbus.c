/* rtbus: Redis pub/sub and commands for realtime (see rtbus.h). */
#include "rtbus.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "hash.h"
#include "log.h"
#include "metrics.h"
#include "svc.h"

/* Commands waiting for the command thread, by count and by bytes: with
 * Redis slow, PUBLISHes of 64 KiB frames at 100,000 a batch would be
 * gigabytes. The batch the thread is running is held besides, so at most
 * twice these are held in all. */
#define RTBUS_MAX_QUEUE 100000
#define RTBUS_MAX_QUEUE_BYTES (64u << 20)
/* Messages handed to the loop in one post: one wake-up per batch keeps
 * the loop's cost per message low under load. */
#define RTBUS_BATCH 512

typedef struct rtbus_chan {
    struct rtbus_chan *next;
    int refs;       /* loop's count; the thread subscribes while > 0 */
    int subscribed; /* thread's view */
    size_t len;
    char name[];
} rtbus_chan;

typedef struct rtbus_op {
    struct rtbus_op *next;
    int sub; /* 1 subscribe, 0 unsubscribe (sub thread queue) */
    rtbus_reply_fn fn;
    void *ud;
    int argc;
    char **argv;
    size_t *lens;
    size_t clen;
    char chan[];
} rtbus_op;

typedef struct {
    rtbus *bus;
    int n;
    size_t bytes; /* counted in rtbus.held until the loop has run the batch */
    struct {
        char *chan, *payload;
        size_t clen, plen;
    } m[RTBUS_BATCH];
} rtbus_batch;

typedef struct {
    rtbus *bus;
    rtbus_reply_fn fn;
    void *ud;
    redisReply *r;
} rtbus_reply;

struct rtbus {
    rconn_opts o;
    wsapp *app;
    rtbus_message_fn on_message;
    void *ud;
    pthread_t sub_thread, cmd_thread;
    int started;
    atomic_int stop, up;
    int evfd;
    /* Bytes of messages the sub thread has handed to the loop and the loop
     * has not yet run, against max_held: a publisher faster than the loop
     * must not grow this process without bound. */
    size_t max_held;
    atomic_size_t held;
    metrics_counter *m_received, *m_dropped;
    metrics_gauge *m_held; /* follows `held` */
    long long last_drop_log_ms;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    rtbus_op *subq, *subq_tail;   /* subscription changes for the sub thread */
    rtbus_op *cmdq, *cmdq_tail;   /* commands for the command thread */
    int ncmd;
    size_t cmd_bytes; /* argument bytes of cmdq */
    /* Channel table, touched by the sub thread only. */
    rtbus_chan *chans[1024];
};

/* ---- queueing ----------------------------------------------------------- */

static void rtbus_op_free(rtbus_op *op)
{
    if (!op)
        return;
    for (int i = 0; i < op->argc; i++)
        free(op->argv[i]);
    free(op->argv);
    free(op->lens);
    free(op);
}

static int rtbus_sub_op(rtbus *b, int sub, const char *channel, size_t len)
{
    rtbus_op *op = calloc(1, sizeof(*op) + len + 1);
    uint64_t one = 1;

    if (!op)
        return -1;
    op->sub = sub;
    op->clen = len;
    memcpy(op->chan, channel, len);
    pthread_mutex_lock(&b->lock);
    if (b->subq_tail)
        b->subq_tail->next = op;
    else
        b->subq = op;
    b->subq_tail = op;
    pthread_mutex_unlock(&b->lock);
    if (write(b->evfd, &one, sizeof(one)) < 0)
        return 0;
    return 0;
}

int rtbus_subscribe(rtbus *b, const char *channel, size_t len) { return rtbus_sub_op(b, 1, channel, len); }
int rtbus_unsubscribe(rtbus *b, const char *channel, size_t len) { return rtbus_sub_op(b, 0, channel, len); }

int rtbus_command(rtbus *b, rtbus_reply_fn fn, void *ud, int argc, const char *const *argv, const size_t *lens)
{
    rtbus_op *op = calloc(1, sizeof(*op));
    size_t bytes = 0;

    if (!op)
        return -1;
    op->fn = fn;
    op->ud = ud;
    op->argv = calloc((size_t)argc, sizeof(char *));
    op->lens = calloc((size_t)argc, sizeof(size_t));
    if (!op->argv || !op->lens)
        goto fail;
    for (int i = 0; i < argc; i++) {
        size_t n = lens ? lens[i] : strlen(argv[i]);

        op->argv[i] = malloc(n + 1);
        if (!op->argv[i])
            goto fail;
        memcpy(op->argv[i], argv[i], n);
        op->argv[i][n] = '\0';
        op->lens[i] = n;
        op->argc = i + 1;
        bytes += n;
    }
    pthread_mutex_lock(&b->lock);
    if (b->ncmd >= RTBUS_MAX_QUEUE || b->cmd_bytes + bytes > RTBUS_MAX_QUEUE_BYTES) {
        pthread_mutex_unlock(&b->lock);
        goto fail;
    }
    b->cmd_bytes += bytes;
    if (b->cmdq_tail)
        b->cmdq_tail->next = op;
    else
        b->cmdq = op;
    b->cmdq_tail = op;
    b->ncmd++;
    pthread_cond_signal(&b->cond);
    pthread_mutex_unlock(&b->lock);
    return 0;
fail:
    rtbus_op_free(op);
    return -1;
}

int rtbus_up(const rtbus *b) { return atomic_load(&((rtbus *)(uintptr_t)b)->up); }

/* ---- delivery to the loop ----------------------------------------------- */

static void rtbus_batch_free(rtbus_batch *bt)
{
    for (int i = 0; i < bt->n; i++) {
        free(bt->m[i].chan);
        free(bt->m[i].payload);
    }
    free(bt);
}

/* Gives back what the batch counted against max_held. */
static void rtbus_batch_unhold(rtbus_batch *bt)
{
    atomic_fetch_sub(&bt->bus->held, bt->bytes);
    metrics_gauge_add(bt->bus->m_held, -(double)bt->bytes);
}

/* Delivers a batch on the loop. Once the app is stopping the bus is not
 * touched: a batch posted just before the loop ended runs in wsapp_free,
 * after the module's stop freed the bus (rtbus_free), and nothing counts
 * what it held any more. */
static void rtbus_batch_run(wsapp *app, void *ud)
{
    rtbus_batch *bt = ud;

    if (!wsapp_stopping(app)) {
        for (int i = 0; i < bt->n; i++)
            bt->bus->on_message(bt->bus->ud, bt->m[i].chan, bt->m[i].clen, bt->m[i].payload, bt->m[i].plen);
        rtbus_batch_unhold(bt);
    }
    rtbus_batch_free(bt);
}

static void rtbus_reply_run(wsapp *app, void *ud)
{
    rtbus_reply *rp = ud;

    /* After the stop the module that asked may be gone. */
    if (!wsapp_stopping(app))
        rp->fn(rp->ud, rp->r);
    if (rp->r)
        freeReplyObject(rp->r);
    free(rp);
}

static void rtbus_deliver_reply(rtbus *b, rtbus_reply_fn fn, void *ud, redisReply *r)
{
    rtbus_reply *rp;

    if (!fn) {
        if (r)
            freeReplyObject(r);
        return;
    }
    rp = malloc(sizeof(*rp));
    if (!rp) {
        if (r)
            freeReplyObject(r);
        return;
    }
    rp->bus = b;
    rp->fn = fn;
    rp->ud = ud;
    rp->r = r;
    if (wsapp_post(b->app, rtbus_reply_run, rp) < 0) {
        if (r)
            freeReplyObject(r);
        free(rp);
    }
}

/* ---- the subscriber thread ---------------------------------------------- */

static rtbus_chan **rtbus_chan_slot(rtbus *b, const char *name, size_t len)
{
    rtbus_chan **p = &b->chans[hash_fnv1a(name, len) & 1023];

    while (*p && !((*p)->len == len && memcmp((*p)->name, name, len) == 0))
        p = &(*p)->next;
    return p;
}

static int rtbus_send_sub(redisContext *ctx, int sub, const char *name, size_t len)
{
    const char *argv[2] = {sub ? "SUBSCRIBE" : "UNSUBSCRIBE", name};
    size_t lens[2] = {strlen(argv[0]), len};
    int done = 0;

    if (redisAppendCommandArgv(ctx, 2, argv, lens) != REDIS_OK)
        return -1;
    while (!done)
        if (redisBufferWrite(ctx, &done) != REDIS_OK)
            return -1;
    return 0;
}

/* Applies queued subscription changes; with `ctx` NULL only the table. */
static int rtbus_apply_ops(rtbus *b, redisContext *ctx)
{
    rtbus_op *op;
    int rc = 0;

    pthread_mutex_lock(&b->lock);
    op = b->subq;
    b->subq = b->subq_tail = NULL;
    pthread_mutex_unlock(&b->lock);
    while (op) {
        rtbus_op *next = op->next;
        rtbus_chan **slot = rtbus_chan_slot(b, op->chan, op->clen), *ch = *slot;

        if (op->sub) {
            if (!ch) {
                ch = calloc(1, sizeof(*ch) + op->clen + 1);
                if (ch) {
                    ch->len = op->clen;
                    memcpy(ch->name, op->chan, op->clen);
                    *slot = ch;
                }
            }
            if (ch && ch->refs++ == 0 && ctx && rc == 0 && rtbus_send_sub(ctx, 1, ch->name, ch->len) < 0)
                rc = -1;
            if (ch && ctx && rc == 0)
                ch->subscribed = 1;
        } else if (ch && --ch->refs <= 0) {
            if (ctx && rc == 0 && ch->subscribed && rtbus_send_sub(ctx, 0, ch->name, ch->len) < 0)
                rc = -1;
            *slot = ch->next;
            free(ch);
        }
        rtbus_op_free(op);
        op = next;
    }
    return rc;
}

static int rtbus_resubscribe(rtbus *b, redisContext *ctx)
{
    for (int i = 0; i < 1024; i++)
        for (rtbus_chan *ch = b->chans[i]; ch; ch = ch->next) {
            ch->subscribed = 0;
            if (rtbus_send_sub(ctx, 1, ch->name, ch->len) < 0)
                return -1;
            ch->subscribed = 1;
        }
    return 0;
}

/* A message the loop has no room for: counted, and logged at most once a
 * second (a flood of them must not become a flood of log lines). */
static void rtbus_drop(rtbus *b, const redisReply *r)
{
    long long now = svc_now_ms();

    metrics_counter_inc(b->m_dropped);
    if (now - b->last_drop_log_ms < 1000)
        return;
    b->last_drop_log_ms = now;
    log_event(LOG_WARN, "bus message dropped: the loop is behind", "\"bytes\":%zu,\"held\":%zu,\"max\":%zu",
              r->element[2]->len, atomic_load(&b->held), b->max_held);
}

/* Copies one message into the batch (allocated on first use), or drops it
 * when the loop already holds max_held bytes. */
static void rtbus_batch_add(rtbus *b, rtbus_batch **btp, const redisReply *r)
{
    const redisReply *ch = r->element[1], *pl = r->element[2];
    size_t bytes = ch->len + pl->len;
    rtbus_batch *bt = *btp;

    if (atomic_load(&b->held) + bytes > b->max_held) {
        rtbus_drop(b, r);
        return;
    }
    if (!bt && !(bt = *btp = calloc(1, sizeof(*bt))))
        return;
    bt->bus = b;
    bt->m[bt->n].chan = malloc(ch->len + 1);
    bt->m[bt->n].payload = malloc(pl->len + 1);
    if (!bt->m[bt->n].chan || !bt->m[bt->n].payload) {
        free(bt->m[bt->n].chan);
        free(bt->m[bt->n].payload);
        return;
    }
    memcpy(bt->m[bt->n].chan, ch->str, ch->len + 1);
    memcpy(bt->m[bt->n].payload, pl->str, pl->len + 1);
    bt->m[bt->n].clen = ch->len;
    bt->m[bt->n].plen = pl->len;
    bt->n++;
    bt->bytes += bytes;
    /* Counted now, not when posted: the next message's check must see it. */
    atomic_fetch_add(&b->held, bytes);
    metrics_gauge_add(b->m_held, (double)bytes);
}

/* Out of memory the batch is lost: its callbacks belong on the loop. */
static void rtbus_batch_post(rtbus *b, rtbus_batch *bt)
{
    if (wsapp_post(b->app, rtbus_batch_run, bt) < 0) {
        metrics_counter_add(b->m_dropped, (uint64_t)bt->n);
        rtbus_batch_unhold(bt);
        rtbus_batch_free(bt);
    }
}

static int rtbus_is_message(const redisReply *r)
{
    return r->type == REDIS_REPLY_ARRAY && r->elements == 3 && r->element[0]->type == REDIS_REPLY_STRING &&
           strcmp(r->element[0]->str, "message") == 0 && r->element[1]->type == REDIS_REPLY_STRING &&
           r->element[2]->type == REDIS_REPLY_STRING;
}

/* Reads every complete reply in the buffer; messages go to the loop in
 * batches. Returns -1 on a protocol error. */
static int rtbus_drain(rtbus *b, redisContext *ctx)
{
    rtbus_batch *bt = NULL;
    void *rv;
    int rc = 0;

    for (;;) {
        if (redisGetReplyFromReader(ctx, &rv) != REDIS_OK) {
            rc = -1;
            break;
        }
        if (!rv)
            break;
        if (rtbus_is_message(rv)) {
            metrics_counter_inc(b->m_received);
            rtbus_batch_add(b, &bt, rv);
        }
        freeReplyObject(rv);
        if (bt && bt->n == RTBUS_BATCH) {
            rtbus_batch_post(b, bt);
            bt = NULL;
        }
    }
    /* What was read before a protocol error is good. */
    if (bt)
        rtbus_batch_post(b, bt);
    return rc;
}

static void *rtbus_sub_main(void *arg)
{
    rtbus *b = arg;
    rconn *rc = rconn_new(&b->o, 2000);

    while (rc && !atomic_load(&b->stop)) {
        redisContext *ctx;
        struct pollfd pfd[2];
        uint64_t v;

        if (rconn_connect(rc) < 0 || !(ctx = rconn_context(rc))) {
            atomic_store(&b->up, 0);
            rtbus_apply_ops(b, NULL);
            usleep(100000);
            continue;
        }
        if (!atomic_load(&b->up)) {
            if (rtbus_apply_ops(b, NULL) < 0 || rtbus_resubscribe(b, ctx) < 0) {
                rconn_mark_broken(rc);
                continue;
            }
            atomic_store(&b->up, 1);
            log_info("redis pub/sub connected");
        }
        pfd[0].fd = ctx->fd;
        pfd[0].events = POLLIN;
        pfd[1].fd = b->evfd;
        pfd[1].events = POLLIN;
        if (poll(pfd, 2, 200) < 0 && errno != EINTR)
            break;
        if (pfd[1].revents & POLLIN) {
            if (read(b->evfd, &v, sizeof(v)) < 0)
                v = 0;
            if (rtbus_apply_ops(b, ctx) < 0)
                goto broken;
        }
        if (pfd[0].revents & (POLLIN | POLLERR | POLLHUP)) {
            if (redisBufferRead(ctx) != REDIS_OK || rtbus_drain(b, ctx) < 0)
                goto broken;
        }
        continue;
    broken:
        log_warn("redis pub/sub connection lost: %s", ctx->errstr[0] ? ctx->errstr : "protocol error");
        atomic_store(&b->up, 0);
        rconn_mark_broken(rc);
    }
    atomic_store(&b->up, 0);
    rconn_free(rc);
    return NULL;
}

/* ---- the command thread ------------------------------------------------- */

static void *rtbus_cmd_main(void *arg)
{
    rtbus *b = arg;
    rconn *rc = rconn_new(&b->o, 2000);

    while (rc) {
        rtbus_op *ops, *op;
        redisContext *ctx;
        int n = 0, broken = 0;

        pthread_mutex_lock(&b->lock);
        while (!b->cmdq && !atomic_load(&b->stop))
            pthread_cond_wait(&b->cond, &b->lock);
        ops = b->cmdq;
        b->cmdq = b->cmdq_tail = NULL;
        b->ncmd = 0;
        b->cmd_bytes = 0;
        pthread_mutex_unlock(&b->lock);
        if (!ops && atomic_load(&b->stop))
            break;
        ctx = rconn_connect(rc) == 0 ? rconn_context(rc) : NULL;
        /* Pipelined: every command of the batch is written, then every
         * reply read in order. */
        for (op = ops; op && ctx; op = op->next, n++)
            if (redisAppendCommandArgv(ctx, op->argc, (const char **)op->argv, op->lens) != REDIS_OK) {
                broken = 1;
                break;
            }
        for (op = ops; op;) {
            rtbus_op *next = op->next;
            void *r = NULL;

            if (ctx && !broken && redisGetReply(ctx, &r) != REDIS_OK) {
                broken = 1;
                r = NULL;
            }
            rtbus_deliver_reply(b, op->fn, op->ud, r);
            rtbus_op_free(op);
            op = next;
        }
        if (broken)
            rconn_mark_broken(rc);
        (void)n;
    }
    rconn_free(rc);
    return NULL;
}

/* ---- lifecycle ------------------------------------------------------------ */

rtbus *rtbus_new(const rconn_opts *o, wsapp *app, size_t max_held, metrics *mx, rtbus_message_fn on_message,
                 void *ud)
{
    rtbus *b = calloc(1, sizeof(*b));

    if (!b)
        return NULL;
    b->o = *o;
    b->app = app;
    b->max_held = max_held;
    mx = mx ? mx : metrics_default();
    b->m_received = metrics_counter_get(mx, "realtime_bus_messages_total",
                                        "Redis messages read on subscribed channels", NULL);
    b->m_dropped = metrics_counter_get(mx, "realtime_bus_dropped_total",
                                       "Redis messages dropped because the loop held REDIS_QUEUE_BYTES of them",
                                       NULL);
    b->m_held = metrics_gauge_get(mx, "realtime_bus_held_bytes", "Bytes of Redis messages waiting for the loop", NULL);
    b->on_message = on_message;
    b->ud = ud;
    b->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    if (b->evfd < 0 || !b->m_received || !b->m_dropped || !b->m_held) {
        rtbus_free(b);
        return NULL;
    }
    return b;
}

int rtbus_start(rtbus *b)
{
    if (pthread_create(&b->sub_thread, NULL, rtbus_sub_main, b) != 0)
        return -1;
    if (pthread_create(&b->cmd_thread, NULL, rtbus_cmd_main, b) != 0) {
        atomic_store(&b->stop, 1);
        pthread_join(b->sub_thread, NULL);
        return -1;
    }
    b->started = 1;
    return 0;
}

void rtbus_free(rtbus *b)
{
    if (!b)
        return;
    if (b->started) {
        uint64_t one = 1;

        atomic_store(&b->stop, 1);
        pthread_mutex_lock(&b->lock);
        pthread_cond_broadcast(&b->cond);
        pthread_mutex_unlock(&b->lock);
        if (write(b->evfd, &one, sizeof(one)) < 0)
            one = 0;
        pthread_join(b->sub_thread, NULL);
        pthread_join(b->cmd_thread, NULL);
    }
    while (b->subq) {
        rtbus_op *n = b->subq->next;

        rtbus_op_free(b->subq);
        b->subq = n;
    }
    while (b->cmdq) {
        rtbus_op *n = b->cmdq->next;

        rtbus_op_free(b->cmdq);
        b->cmdq = n;
    }
    for (int i = 0; i < 1024; i++)
        while (b->chans[i]) {
            rtbus_chan *n = b->chans[i]->next;

            free(b->chans[i]);
            b->chans[i] = n;
        }
    if (b->evfd >= 0)
        close(b->evfd);
    pthread_mutex_destroy(&b->lock);
    pthread_cond_destroy(&b->cond);
    free(b);
}
