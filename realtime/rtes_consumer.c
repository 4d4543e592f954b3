#include "rtes_consumer.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <amqp.h>
#include <amqp_framing.h>

#include "amqpc.h"
#include "backoff.h"
#include "buf.h"
#include "fmt.h"
#include "log.h"
#include "metrics.h"
#include "migrate.h"
#include "rtes_msg.h"
#include "rtes_store.h"
#include "rtes_tokens.h"
#include "svc.h"

#define EXCHANGE "workflows"
#define BURST_MAX 4096
#define IDLE_WAIT_MS 200

typedef struct {
    rtes_msg m;
    uint64_t tag;
} item;

struct rtes_consumer {
    char *url, *migrations;
    int durable, prefetch, migrated;
    dbpool *db;
    rconn_opts ropts;
    amqpc *amqp;
    rconn *redis;
    pthread_t thread;
    int started;
    atomic_int stop;
    atomic_int ready;
    unsigned long subscribed_gen;
    item *burst;
    int n, cap;
    int *order;
    rtes_stored *res;
    backoff retry;
    int redis_down;
    metrics_counter *consumed[RTES_NKINDS], *rejected[RTES_NKINDS], *stored, *duplicates, *published;
    metrics_histogram *store_latency;
};

rtes_consumer *rtes_consumer_new(const rtes_consumer_opts *o)
{
    rtes_consumer *c = calloc(1, sizeof(*c));
    metrics *reg = metrics_default();

    if (!c)
        return NULL;
    c->url = strdup(o->amqp_url ? o->amqp_url : AMQPC_DEFAULT_URL);
    c->migrations = strdup(o->migrations_dir ? o->migrations_dir : "database/migrations");
    c->durable = o->durable;
    c->prefetch = o->prefetch > 0 ? o->prefetch : 10;
    c->db = o->db;
    c->ropts = *o->redis;
    c->cap = c->prefetch * RTES_NKINDS;
    if (c->cap > BURST_MAX)
        c->cap = BURST_MAX;
    c->burst = calloc((size_t)c->cap, sizeof(*c->burst));
    c->order = calloc((size_t)c->cap, sizeof(*c->order));
    c->res = calloc((size_t)c->cap, sizeof(*c->res));
    if (!c->url || !c->migrations || !c->burst || !c->order || !c->res)
        goto fail;
    c->amqp = amqpc_new(c->url, "realtime-rtes");
    c->redis = rconn_new(&c->ropts, 2000);
    if (!c->amqp || !c->redis)
        goto fail;
    backoff_init(&c->retry, 100, 5000);
    for (int k = 0; k < RTES_NKINDS; k++) {
        char labels[128];

        snprintf(labels, sizeof(labels), "queue=\"%s\"", rtes_kind_queue((rtes_kind)k));
        c->consumed[k] = metrics_counter_get(reg, "rtes_messages_consumed_total",
                                             "Workflow messages taken from RabbitMQ, by queue.", labels);
        c->rejected[k] = metrics_counter_get(reg, "rtes_messages_rejected_total",
                                             "Workflow messages rejected without requeue (bad JSON, missing fields, refused data), by queue.",
                                             labels);
    }
    c->stored = metrics_counter_get(reg, "rtes_events_stored_total", "Node states and completions stored.", NULL);
    c->duplicates = metrics_counter_get(reg, "rtes_redeliveries_total",
                                        "Messages recognised as already stored (redelivered after a crash or a lost ack).",
                                        NULL);
    c->published = metrics_counter_get(reg, "rtes_frames_published_total",
                                       "Frames published on Redis for the watchers of every instance.", NULL);
    c->store_latency = metrics_histogram_get(reg, "rtes_store_seconds",
                                             "Time to store one burst of messages (one transaction).", NULL,
                                             metrics_latency_buckets, metrics_latency_nbuckets);
    return c;
fail:
    rtes_consumer_free(c);
    return NULL;
}

void rtes_consumer_free(rtes_consumer *c)
{
    if (!c)
        return;
    rtes_consumer_stop(c);
    for (int i = 0; i < c->n; i++)
        rtes_msg_clear(&c->burst[i].m);
    amqpc_free(c->amqp);
    rconn_free(c->redis);
    free(c->burst);
    free(c->order);
    free(c->res);
    free(c->url);
    free(c->migrations);
    free(c);
}

int rtes_consumer_ready(const rtes_consumer *c)
{
    return c && atomic_load(&c->ready);
}

static void log_reject(rtes_kind k, const char *reason)
{
    char esc[600];

    log_event(LOG_WARN, "message rejected", "\"queue\":\"%s\",\"reason\":\"%s\"", rtes_kind_queue(k),
              log_escape(esc, sizeof(esc), reason));
}

static void lost(rtes_consumer *c, const char *why)
{
    char esc[600];

    if (atomic_load(&c->ready))
        log_event(LOG_WARN, "rtes consumer lost the broker", "\"error\":\"%s\"",
                  log_escape(esc, sizeof(esc), why));
    atomic_store(&c->ready, 0);
    amqpc_close(c->amqp);
}

/* Declares everything and subscribes. 0 or -1 (the connection is then
 * closed, to be retried after the back-off). */
static int subscribe(rtes_consumer *c)
{
    amqp_connection_state_t st;
    int ch = amqpc_channel(c->amqp);

    if (amqpc_connect(c->amqp) < 0)
        return -1;
    if (amqpc_declare_topic_exchange(c->amqp, EXCHANGE, 1) < 0)
        goto fail;
    for (int k = 0; k < RTES_NKINDS; k++) {
        const char *q = rtes_kind_queue((rtes_kind)k);

        if (amqpc_declare_queue(c->amqp, q, c->durable, k == RTES_TOKEN ? NULL : EXCHANGE,
                                k == RTES_TOKEN ? NULL : q) < 0)
            goto fail;
    }
    st = amqpc_state(c->amqp);
    if (!st)
        goto fail;
    amqp_basic_qos(st, (amqp_channel_t)ch, 0, (uint16_t)c->prefetch, 0);
    if (amqpc_check(c->amqp, amqp_get_rpc_reply(st), "basic.qos") < 0)
        goto fail;
    for (int k = 0; k < RTES_NKINDS; k++) {
        const char *q = rtes_kind_queue((rtes_kind)k);

        amqp_basic_consume(st, (amqp_channel_t)ch, amqp_cstring_bytes(q), amqp_cstring_bytes(q), 0, 0, 0,
                           amqp_empty_table);
        if (amqpc_check(c->amqp, amqp_get_rpc_reply(st), "basic.consume") < 0)
            goto fail;
    }
    c->subscribed_gen = amqpc_generation(c->amqp);
    atomic_store(&c->ready, 1);
    log_event(LOG_INFO, "rtes consumer subscribed", "\"prefetch\":%d,\"durable\":%s", c->prefetch,
              c->durable ? "true" : "false");
    return 0;
fail:
    {
        char esc[600];

        log_event(LOG_WARN, "rtes consumer cannot subscribe", "\"error\":\"%s\"",
                  log_escape(esc, sizeof(esc), amqpc_errstr(c->amqp)));
    }
    amqpc_close(c->amqp);
    return -1;
}

/* The tables first: 0 once the migrations are applied, -1 to retry. */
static int migrate(rtes_consumer *c)
{
    char err[512], esc[600];
    PGconn *pg;
    int applied = 0, rc;

    if (c->migrated)
        return 0;
    pg = dbpool_acquire(c->db, 2000);
    if (!pg)
        return -1;
    rc = migrate_run(pg, c->migrations, &applied, err, sizeof(err));
    dbpool_release(c->db, pg);
    if (rc < 0) {
        log_event(LOG_ERROR, "migrations failed", "\"error\":\"%s\"", log_escape(esc, sizeof(esc), err));
        return -1;
    }
    if (applied)
        log_event(LOG_INFO, "migrations applied", "\"count\":%d", applied);
    c->migrated = 1;
    return 0;
}

static rtes_kind kind_of_tag(amqp_bytes_t tag)
{
    for (int k = 0; k < RTES_NKINDS; k++) {
        const char *q = rtes_kind_queue((rtes_kind)k);

        if (tag.len == strlen(q) && memcmp(tag.bytes, q, tag.len) == 0)
            return (rtes_kind)k;
    }
    return RTES_NKINDS;
}

static int reject(rtes_consumer *c, uint64_t tag)
{
    amqp_connection_state_t st = amqpc_state(c->amqp);

    if (!st || amqp_basic_reject(st, (amqp_channel_t)amqpc_channel(c->amqp), tag, 0) != AMQP_STATUS_OK) {
        lost(c, "basic.reject failed");
        return -1;
    }
    return 0;
}

/* Takes one delivery into the burst, or rejects it. */
static void take(rtes_consumer *c, const amqp_envelope_t *env)
{
    rtes_kind k = kind_of_tag(env->consumer_tag);
    item *it = &c->burst[c->n];
    char err[512];

    if (k == RTES_NKINDS) {
        log_reject(RTES_NODE_STATUS, "delivery for an unknown consumer");
        reject(c, env->delivery_tag);
        return;
    }
    metrics_counter_inc(c->consumed[k]);
    if (rtes_msg_parse(k, env->message.body.bytes, env->message.body.len, &it->m, err, sizeof(err)) < 0) {
        rtes_msg_clear(&it->m);
        metrics_counter_inc(c->rejected[k]);
        log_reject(k, err);
        reject(c, env->delivery_tag);
        return;
    }
    it->tag = env->delivery_tag;
    c->n++;
}

static const item *sort_base;

/* Execution order keeps each execution's messages in arrival order and
 * takes the executions' row locks in one global order, so that two
 * instances storing bursts at once never deadlock. */
static int by_execution(const void *a, const void *b)
{
    int ia = *(const int *)a, ib = *(const int *)b;
    int d = strcmp(sort_base[ia].m.execution_id, sort_base[ib].m.execution_id);

    return d ? d : (ia > ib) - (ia < ib);
}

static int store_tokens(rtes_consumer *c, char *err, size_t errlen)
{
    long long now = (long long)time(NULL);

    for (int i = 0; i < c->n; i++)
        if (c->burst[i].m.kind == RTES_TOKEN && rtes_tokens_add(c->redis, &c->burst[i].m, now, err, errlen) < 0)
            return -1;
    return 0;
}

/* Stores burst items idx[0..n) in one transaction. */
static int store(rtes_consumer *c, const int *idx, int n, rtes_stored *res, char *err, size_t errlen)
{
    rtes_msg *list[64];
    rtes_msg **msgs = n <= 64 ? list : calloc((size_t)n, sizeof(*msgs));
    PGconn *pg;
    long long t0 = svc_now_ms();
    int rc;

    if (!msgs) {
        snprintf(err, errlen, "out of memory");
        return RTES_STORE_RETRY;
    }
    for (int i = 0; i < n; i++)
        msgs[i] = &c->burst[idx[i]].m;
    pg = dbpool_acquire(c->db, 2000);
    if (!pg) {
        dbpool_errstr(c->db, err, errlen);
        rc = RTES_STORE_RETRY;
    } else {
        rc = rtes_store_batch(pg, msgs, n, res, err, errlen);
        dbpool_release(c->db, pg);
    }
    if (msgs != list)
        free(msgs);
    if (rc == RTES_STORE_OK)
        metrics_histogram_observe(c->store_latency, (double)(svc_now_ms() - t0) / 1000.0);
    return rc;
}

static void wait_retry(rtes_consumer *c, const char *what, const char *err)
{
    char esc[600];
    long d = backoff_next_ms(&c->retry);

    log_event(LOG_WARN, "rtes store failed; retrying the burst", "\"what\":\"%s\",\"error\":\"%s\",\"retry_in_ms\":%ld",
              what, log_escape(esc, sizeof(esc), err), d);
    svc_sleep_ms(d);
}

/* Appends one PUBLISH of the frames idx[from..to) (one execution, seq
 * order): "<workflow_id>\n" then "<seq> <length>\n<frame>" each (parsed by
 * rtes_hub). Returns 1 when a command was appended, 0 when there was
 * nothing to send, -1 on OOM. */
static int publish_one(rtes_consumer *c, redisContext *ctx, const int *idx, int from, int to, buf *b)
{
    const rtes_msg *first = &c->burst[idx[from]].m;
    char chan[RTES_ID_MAX + 16], num[FMT_I64_MAX + 1];
    const char *argv[3] = {"PUBLISH", chan, NULL};
    size_t lens[3];
    int frames = 0;

    buf_reset(b);
    if (buf_append_all(b, first->workflow_id, strlen(first->workflow_id)) < 0 || buf_append_all(b, "\n", 1) < 0)
        return -1;
    for (int i = from; i < to; i++) {
        const rtes_msg *m = &c->burst[idx[i]].m;
        const rtes_stored *r = &c->res[i];
        size_t nl;

        if (r->seq <= 0 || !m->frame)
            continue;
        nl = fmt_i64(num, r->seq);
        num[nl++] = ' ';
        if (buf_append_all(b, num, nl) < 0)
            return -1;
        nl = fmt_i64(num, (long long)m->frame_len);
        num[nl++] = '\n';
        if (buf_append_all(b, num, nl) < 0 || buf_append_all(b, m->frame, m->frame_len) < 0)
            return -1;
        frames++;
    }
    if (!frames)
        return 0;
    snprintf(chan, sizeof(chan), "rtes:exec:%s", first->execution_id);
    argv[2] = buf_str(b);
    lens[0] = 7;
    lens[1] = strlen(chan);
    lens[2] = b->len;
    if (redisAppendCommandArgv(ctx, 3, argv, lens) != REDIS_OK)
        return -1;
    metrics_counter_add(c->published, (uint64_t)frames);
    return 1;
}

/* Publishes the frames of the stored events, one message per execution of
 * the burst (the burst is sorted by execution, each in seq order), so a
 * watcher's instance takes a burst in one piece and writes it in one
 * system call. A failure loses only live copies: watchers find the missing
 * seqs in PostgreSQL. */
static void publish(rtes_consumer *c, const int *idx, int n)
{
    redisContext *ctx;
    int sent = 0, ok = 1;
    buf b;

    buf_init(&b, (size_t)1 << 30);
    if (rconn_connect(c->redis) < 0 || !(ctx = rconn_context(c->redis)))
        goto fail;
    for (int i = 0; i < n;) {
        int j = i + 1, r;

        while (j < n && strcmp(c->burst[idx[j]].m.execution_id, c->burst[idx[i]].m.execution_id) == 0)
            j++;
        r = publish_one(c, ctx, idx, i, j, &b);
        if (r > 0)
            sent++;
        i = j;
    }
    buf_free(&b);
    for (int i = 0; i < sent; i++) {
        void *rep = NULL;

        if (redisGetReply(ctx, &rep) != REDIS_OK) {
            ok = 0;
            break;
        }
        freeReplyObject(rep);
    }
    if (!ok)
        goto fail;
    if (c->redis_down)
        log_info("rtes: publishing frames on Redis again");
    c->redis_down = 0;
    return;
fail:
    buf_free(&b);
    rconn_mark_broken(c->redis);
    if (!c->redis_down)
        log_event(LOG_WARN, "rtes: cannot publish frames on Redis; watchers will read them from PostgreSQL",
                  NULL);
    c->redis_down = 1;
}

/* Stores the burst, acknowledges it and publishes its frames. */
static void flush(rtes_consumer *c)
{
    char err[512];
    int rc, n = c->n;
    uint64_t last = 0;
    amqp_connection_state_t st;

    if (n == 0)
        return;
    for (int i = 0; i < n; i++) {
        c->order[i] = i;
        if (c->burst[i].tag > last)
            last = c->burst[i].tag;
    }
    sort_base = c->burst;
    qsort(c->order, (size_t)n, sizeof(*c->order), by_execution);
    for (;;) {
        if (store_tokens(c, err, sizeof(err)) < 0) {
            if (atomic_load(&c->stop))
                goto drop;
            wait_retry(c, "tokens", err);
            continue;
        }
        rc = store(c, c->order, n, c->res, err, sizeof(err));
        if (rc == RTES_STORE_OK)
            break;
        if (rc == RTES_STORE_DATA) {
            /* One of them carries a value PostgreSQL refuses (a \u0000 in
             * a string, say): store them one by one and reject that one. */
            for (int i = 0; i < n; i++) {
                int one = c->order[i];

                for (;;) {
                    rc = store(c, &one, 1, &c->res[i], err, sizeof(err));
                    if (rc != RTES_STORE_RETRY || atomic_load(&c->stop))
                        break;
                    wait_retry(c, "one message", err);
                }
                if (rc == RTES_STORE_RETRY)
                    goto drop;
                if (rc == RTES_STORE_DATA) {
                    metrics_counter_inc(c->rejected[c->burst[one].m.kind]);
                    log_reject(c->burst[one].m.kind, err);
                    if (reject(c, c->burst[one].tag) < 0)
                        goto drop;
                }
            }
            break;
        }
        if (atomic_load(&c->stop))
            goto drop;
        wait_retry(c, "burst", err);
    }
    backoff_reset(&c->retry);
    for (int i = 0; i < n; i++) {
        if (c->res[i].seq > 0)
            metrics_counter_inc(c->stored);
        else if (c->burst[c->order[i]].m.kind <= RTES_COMPLETION)
            metrics_counter_inc(c->duplicates);
    }
    /* Only on the connection the burst came from: delivery tags mean
     * nothing on another. What the broker never saw acknowledged comes
     * again and is recognised as stored. */
    st = amqpc_state(c->amqp);
    if (st && amqpc_generation(c->amqp) == c->subscribed_gen &&
        amqp_basic_ack(st, (amqp_channel_t)amqpc_channel(c->amqp), last, 1) != AMQP_STATUS_OK)
        lost(c, "basic.ack failed");
    publish(c, c->order, n);
    for (int i = 0; i < n; i++)
        c->res[i].seq = 0;
drop:
    for (int i = 0; i < n; i++)
        rtes_msg_clear(&c->burst[i].m);
    c->n = 0;
}

/* Handles a frame that is not a delivery. Returns 0 to go on, -1 when the
 * channel or connection is gone. */
static int other_frame(rtes_consumer *c, amqp_connection_state_t st)
{
    amqp_frame_t f;

    if (amqp_simple_wait_frame(st, &f) != AMQP_STATUS_OK)
        return -1;
    if (f.frame_type != AMQP_FRAME_METHOD)
        return 0;
    switch (f.payload.method.id) {
    case AMQP_BASIC_ACK_METHOD:
        return 0;
    case AMQP_BASIC_RETURN_METHOD: {
        amqp_message_t m;
        amqp_rpc_reply_t r = amqp_read_message(st, f.channel, &m, 0);

        if (r.reply_type != AMQP_RESPONSE_NORMAL)
            return -1;
        amqp_destroy_message(&m);
        return 0;
    }
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD:
    case AMQP_BASIC_CANCEL_METHOD:
    default:
        (void)c;
        return -1;
    }
}

static void *run(void *arg)
{
    rtes_consumer *c = arg;

    while (!atomic_load(&c->stop)) {
        amqp_connection_state_t st;
        amqp_envelope_t env;
        amqp_rpc_reply_t r;
        struct timeval tv;

        if (!atomic_load(&c->ready) || !amqpc_is_connected(c->amqp)) {
            atomic_store(&c->ready, 0);
            if (migrate(c) < 0) {
                svc_sleep_ms(backoff_next_ms(&c->retry));
                continue;
            }
            if (subscribe(c) < 0) {
                svc_sleep_ms(IDLE_WAIT_MS);
                continue;
            }
        }
        st = amqpc_state(c->amqp);
        if (!st) {
            lost(c, "no connection");
            continue;
        }
        /* Wait for the first message of a burst; then take what is
         * already there without waiting. */
        tv.tv_sec = 0;
        tv.tv_usec = c->n ? 0 : IDLE_WAIT_MS * 1000;
        amqp_maybe_release_buffers(st);
        r = amqp_consume_message(st, &env, &tv, 0);
        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            take(c, &env);
            amqp_destroy_envelope(&env);
            if (c->n == c->cap)
                flush(c);
            continue;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) {
            flush(c);
            continue;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE &&
            other_frame(c, st) == 0)
            continue;
        /* The broker went away: what is in hand was not acknowledged and
         * will be delivered again; storing it now would only be undone by
         * the redelivery's digest check, so it is dropped. */
        for (int i = 0; i < c->n; i++)
            rtes_msg_clear(&c->burst[i].m);
        c->n = 0;
        lost(c, r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION ? amqp_error_string2(r.library_error)
                                                                 : "connection closed");
        svc_sleep_ms(IDLE_WAIT_MS);
    }
    if (c->n)
        flush(c);
    atomic_store(&c->ready, 0);
    amqpc_close(c->amqp);
    return NULL;
}

int rtes_consumer_start(rtes_consumer *c)
{
    if (!c || c->started)
        return -1;
    if (pthread_create(&c->thread, NULL, run, c) != 0)
        return -1;
    c->started = 1;
    return 0;
}

void rtes_consumer_stop(rtes_consumer *c)
{
    if (!c || !c->started)
        return;
    atomic_store(&c->stop, 1);
    pthread_join(c->thread, NULL);
    c->started = 0;
}
