/* sse_hub: the streams this instance holds (a registry by client id), the
 * hub thread (Redis subscription, heartbeats, the ingest lock) and the
 * stream route. See sse.h. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "buf.h"
#include "fmt.h"
#include "hash.h"
#include "httpstream.h"
#include "log.h"
#include "sse.h"
#include "svc.h"

#define SSE_BUCKETS 4096
#define SSE_STRIPES 64
#define SSE_LOCK_MS 3000   /* the ingest lock's lifetime; renewed every second */

typedef struct sse_conn {
    struct sse_conn *next, *prev; /* the bucket's chain, under its stripe lock */
    sse *hub;
    httpstream *out;              /* set when live */
    int replaying;                /* frames go to `pending` until the replay is written */
    int linked;
    buf pending;
    unsigned bucket;
    char cid[SSE_CLIENT_ID_MAX + 1];
} sse_conn;

struct sse {
    sse_config cfg;
    metrics *reg;
    metrics_gauge *g_clients;
    metrics_counter *c_delivered, *c_dropped, *c_replayed, *c_resets, *c_published;
    pthread_mutex_t locks[SSE_STRIPES];
    sse_conn *buckets[SSE_BUCKETS];
    atomic_long nclients;
    atomic_int stopping;
    pthread_t thread;
    int started;
    int evfd;
    char instance[64];
    int ingester;
};

const sse_config *sse_cfg(const sse *s)
{
    return &s->cfg;
}

long sse_clients(sse *s)
{
    return s ? atomic_load(&s->nclients) : 0;
}

/* ---- configuration ------------------------------------------------------ */

void sse_config_read(cfg *c, sse_config *o, const char *internal_token)
{
    memset(o, 0, sizeof(*o));
    o->heartbeat_ms = cfg_int(c, "SSE_HEARTBEAT_SECONDS", 30, 1, 3600) * 1000;
    o->buffer_events = (int)cfg_int(c, "SSE_BUFFER_EVENTS", 100, 1, 100000);
    o->buffer_ttl_s = cfg_int(c, "SSE_BUFFER_TTL_SECONDS", 300, 1, 86400L * 30);
    o->client_buffer_bytes = cfg_int(c, "SSE_CLIENT_BUFFER_BYTES", 1024 * 1024, 4096, 1L << 30);
    o->write_timeout_s = cfg_int(c, "SSE_WRITE_TIMEOUT_SECONDS", 30, 1, 3600);
    o->answer_ttl_s = cfg_int(c, "HITL_ANSWER_TTL_SECONDS", 7L * 86400, 1, 365L * 86400);
    rconn_opts_from_cfg(c, &o->redis);
    fmt_copy(o->internal_token, sizeof(o->internal_token), internal_token);
}

/* ---- the registry ------------------------------------------------------- */

static pthread_mutex_t *stripe(sse *s, unsigned bucket)
{
    return &s->locks[bucket % SSE_STRIPES];
}

static void reg_link(sse *s, sse_conn *c)
{
    c->bucket = hash_fnv1a_str(c->cid) % SSE_BUCKETS;
    pthread_mutex_lock(stripe(s, c->bucket));
    c->prev = NULL;
    c->next = s->buckets[c->bucket];
    if (c->next)
        c->next->prev = c;
    s->buckets[c->bucket] = c;
    c->linked = 1;
    pthread_mutex_unlock(stripe(s, c->bucket));
}

/* With the stripe lock held. */
static void reg_unlink_locked(sse *s, sse_conn *c)
{
    if (!c->linked)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        s->buckets[c->bucket] = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->next = c->prev = NULL;
    c->linked = 0;
}

int sse_hub_has(sse *s, const char *cid)
{
    unsigned b = hash_fnv1a_str(cid) % SSE_BUCKETS;
    int found = 0;

    pthread_mutex_lock(stripe(s, b));
    for (sse_conn *c = s->buckets[b]; c && !found; c = c->next)
        found = strcmp(c->cid, cid) == 0;
    pthread_mutex_unlock(stripe(s, b));
    return found;
}

/* Drops a live client whose buffer is full (it reads too slowly, or not at
 * all): its stream is cut, so it reconnects and replays. Stripe lock held. */
static void conn_drop_locked(sse *s, sse_conn *c)
{
    reg_unlink_locked(s, c);
    if (c->out)
        httpstream_end(c->out, 1);
    metrics_counter_inc(s->c_dropped);
    if (log_enabled(LOG_INFO))
        log_event(LOG_INFO, "sse_client_dropped", "\"client_id\":\"%s\",\"reason\":\"buffer full\"", c->cid);
}

/* Hands one frame to one client. Stripe lock held. */
static void conn_send_locked(sse *s, sse_conn *c, const char *frame, size_t len)
{
    int rc;

    if (c->replaying) {
        if (buf_append(&c->pending, frame, len) < 0 || c->pending.truncated)
            c->replaying = 2; /* overflowed: the handler drops it */
        return;
    }
    rc = httpstream_write_max(c->out, frame, len, (size_t)s->cfg.client_buffer_bytes);
    if (rc == 0)
        metrics_counter_inc(s->c_delivered);
    else if (rc == -2)
        conn_drop_locked(s, c);
}

/* The MHD thread is done with a stream (client gone, or stream ended). */
static void conn_closed(void *ud)
{
    sse_conn *c = ud;
    sse *s = c->hub;

    pthread_mutex_lock(stripe(s, c->bucket));
    reg_unlink_locked(s, c);
    pthread_mutex_unlock(stripe(s, c->bucket));
    atomic_fetch_sub(&s->nclients, 1);
    metrics_gauge_add(s->g_clients, -1);
    httpstream_release(c->out);
    buf_free(&c->pending);
    free(c);
}

static long long frame_id(const char *frame, size_t len)
{
    if (len < 5 || memcmp(frame, "id: ", 4) != 0)
        return -1;
    return strtoll(frame + 4, NULL, 10);
}

/* A frame from the deliver channel: "client_id\nframe". */
static void hub_deliver(sse *s, const char *msg, size_t len)
{
    const char *nl = memchr(msg, '\n', len);
    char cid[SSE_CLIENT_ID_MAX + 1];
    size_t n;
    unsigned b;

    if (!nl || (size_t)(nl - msg) > SSE_CLIENT_ID_MAX)
        return;
    n = (size_t)(nl - msg);
    memcpy(cid, msg, n);
    cid[n] = '\0';
    b = hash_fnv1a_str(cid) % SSE_BUCKETS;
    pthread_mutex_lock(stripe(s, b));
    for (sse_conn *c = s->buckets[b], *next; c; c = next) {
        next = c->next;
        if (strcmp(c->cid, cid) == 0)
            conn_send_locked(s, c, nl + 1, len - n - 1);
    }
    pthread_mutex_unlock(stripe(s, b));
}

/* ---- publishing --------------------------------------------------------- */

int sse_event_type_ok(const char *t)
{
    size_t n = 0;

    for (const char *p = t; *p; p++, n++) {
        char c = *p;

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
              c == '.' || c == ':'))
            return 0;
    }
    return n >= 1 && n <= 64 && strcmp(t, "heartbeat") != 0 && strcmp(t, "connection.established") != 0 &&
           strcmp(t, "stream.reset") != 0;
}

int sse_publish(sse *s, rconn *r, const char *cid, const char *type, const cJSON *data, long long *id)
{
    char *text = data ? cJSON_PrintUnformatted(data) : NULL;
    int rc;

    if (data && !text)
        return -1;
    rc = sse_store_publish(s, r, cid, type, text ? text : "null", id);
    free(text);
    if (rc == 0)
        metrics_counter_inc(s->c_published);
    return rc;
}

/* A backend's own PUBLISH sse:{client_id} {"event_type","data"}: stored
 * (and so delivered) by the instance holding the ingest lock. */
static void hub_ingest(sse *s, rconn *cmd, const char *channel, const char *payload, size_t len)
{
    const char *cid = channel + 4;
    cJSON *msg, *type;
    long long id;

    if (!s->ingester || !sse_client_id_ok(cid))
        return;
    msg = cJSON_ParseWithLength(payload, len);
    type = cJSON_GetObjectItemCaseSensitive(msg, "event_type");
    if (!cJSON_IsObject(msg) || !cJSON_IsString(type) || !sse_event_type_ok(type->valuestring)) {
        char ecid[300];

        log_warn("sse: a message on sse:%s is not {\"event_type\": <type>, \"data\": ...}; dropped",
                 log_escape(ecid, sizeof(ecid), cid));
    } else if (sse_publish(s, cmd, cid, type->valuestring, cJSON_GetObjectItemCaseSensitive(msg, "data"), &id) < 0) {
        log_warn("sse: cannot store an event published on Redis: %s", rconn_errstr(cmd));
    }
    cJSON_Delete(msg);
}

static void hub_message(sse *s, rconn *cmd, redisReply *m)
{
    if (m->type != REDIS_REPLY_ARRAY || m->elements < 3 || m->element[0]->type != REDIS_REPLY_STRING)
        return;
    if (!strcmp(m->element[0]->str, "message") && m->element[2]->type == REDIS_REPLY_STRING)
        hub_deliver(s, m->element[2]->str, m->element[2]->len);
    else if (!strcmp(m->element[0]->str, "pmessage") && m->elements == 4 &&
             m->element[2]->type == REDIS_REPLY_STRING && m->element[3]->type == REDIS_REPLY_STRING)
        hub_ingest(s, cmd, m->element[2]->str, m->element[3]->str, m->element[3]->len);
}

/* ---- the hub thread ----------------------------------------------------- */

static int hub_subscribe(sse *s, rconn *sub)
{
    redisContext *c;
    int done = 0;

    (void)s;
    if (rconn_connect(sub) < 0)
        return -1;
    c = rconn_context(sub);
    redisAppendCommand(c, "SUBSCRIBE %s", SSE_DELIVER_CHANNEL);
    redisAppendCommand(c, "PSUBSCRIBE sse:*");
    while (!done)
        if (redisBufferWrite(c, &done) != REDIS_OK) {
            rconn_mark_broken(sub);
            return -1;
        }
    return 0;
}

static void hub_lock(sse *s, rconn *cmd)
{
    static const char lua[] =
        "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end\n"
        "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end\n"
        "return 0\n";
    redisReply *r = rconn_command(cmd, 1, "EVAL %s 1 sse:ingest:lock %s %d", lua, s->instance, SSE_LOCK_MS);
    int was = s->ingester;

    s->ingester = r && r->type == REDIS_REPLY_INTEGER && r->integer == 1;
    if (s->ingester != was)
        log_event(LOG_INFO, "sse_ingest", "\"holder\":%s", s->ingester ? "true" : "false");
    freeReplyObject(r);
}

/* Heartbeats to every live stream (no id, so Last-Event-ID never moves),
 * and the online marks of the clients held, refreshed in one pipeline. */
static void hub_heartbeat(sse *s, rconn *cmd)
{
    char ts[40], frame[128];
    size_t len, ncids = 0, cap = 0;
    char (*cids)[SSE_CLIENT_ID_MAX + 1] = NULL;
    long ttl = s->cfg.heartbeat_ms / 1000 * 2 + 10;
    redisContext *rc;

    sse_timestamp(ts, sizeof(ts));
    len = (size_t)snprintf(frame, sizeof(frame), "event: heartbeat\ndata: {\"timestamp\":\"%s\"}\n\n", ts);
    for (unsigned b = 0; b < SSE_BUCKETS; b++) {
        if (!s->buckets[b])
            continue;
        pthread_mutex_lock(stripe(s, b));
        for (sse_conn *c = s->buckets[b], *next; c; c = next) {
            next = c->next;
            if (ncids == cap) {
                size_t ncap = cap ? cap * 2 : 256;
                void *nc = realloc(cids, ncap * sizeof(*cids));

                if (nc) {
                    cids = nc;
                    cap = ncap;
                }
            }
            if (ncids < cap && (ncids == 0 || strcmp(cids[ncids - 1], c->cid) != 0))
                fmt_copy(cids[ncids++], sizeof(cids[0]), c->cid);
            if (!c->replaying)
                conn_send_locked(s, c, frame, len);
        }
        pthread_mutex_unlock(stripe(s, b));
    }
    if (ncids && rconn_connect(cmd) == 0 && (rc = rconn_context(cmd))) {
        size_t sent = 0;
        int ok = 1;

        for (size_t i = 0; i < ncids; i++, sent++)
            if (redisAppendCommand(rc, "SET sse:online:%s 1 EX %ld", cids[i], ttl) != REDIS_OK)
                break;
        for (size_t i = 0; i < sent && ok; i++) {
            void *rep = NULL;

            ok = redisGetReply(rc, &rep) == REDIS_OK;
            freeReplyObject(rep);
        }
        if (!ok)
            rconn_mark_broken(cmd);
    }
    free(cids);
}

static void *hub_main(void *ud)
{
    sse *s = ud;
    rconn *sub = rconn_new(&s->cfg.redis, 2000), *cmd = rconn_new(&s->cfg.redis, 2000);
    long long next_beat = svc_now_ms() + s->cfg.heartbeat_ms, next_lock = 0;
    int subscribed = 0;

    while (sub && cmd && !atomic_load(&s->stopping)) {
        struct pollfd fds[2];
        long long now = svc_now_ms(), due = next_beat < next_lock ? next_beat : next_lock;
        int nfds = 1, timeout;

        if (!subscribed && hub_subscribe(s, sub) == 0)
            subscribed = 1;
        timeout = due > now ? (int)(due - now) : 0;
        if (timeout > 250)
            timeout = 250;
        fds[0].fd = s->evfd;
        fds[0].events = POLLIN;
        if (subscribed) {
            fds[1].fd = rconn_context(sub)->fd;
            fds[1].events = POLLIN;
            nfds = 2;
        }
        if (poll(fds, (nfds_t)nfds, timeout) > 0 && nfds == 2 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            redisContext *c = rconn_context(sub);
            void *rep = NULL;

            if (redisBufferRead(c) != REDIS_OK) {
                log_warn("sse: the Redis subscription broke (%s); resubscribing", c->errstr);
                rconn_mark_broken(sub);
                subscribed = 0;
            } else {
                while (redisGetReplyFromReader(c, &rep) == REDIS_OK && rep) {
                    hub_message(s, cmd, rep);
                    freeReplyObject(rep);
                    rep = NULL;
                }
            }
        }
        now = svc_now_ms();
        if (now >= next_lock) {
            hub_lock(s, cmd);
            next_lock = now + 1000;
        }
        if (now >= next_beat) {
            hub_heartbeat(s, cmd);
            next_beat = now + s->cfg.heartbeat_ms;
        }
    }
    if (cmd && s->ingester) {
        /* Handed over at once rather than when it expires: raw publishes
         * meanwhile would have no instance to store them. */
        redisReply *r = rconn_command(cmd, 0, "EVAL %s 1 sse:ingest:lock %s",
                                      "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end",
                                      s->instance);

        freeReplyObject(r);
    }
    rconn_free(sub);
    rconn_free(cmd);
    return NULL;
}

/* ---- the stream route --------------------------------------------------- */

static void append_event(buf *b, const char *id, const char *type, const char *data_json)
{
    char ts[40];

    sse_timestamp(ts, sizeof(ts));
    if (id) {
        buf_puts(b, "id: ");
        buf_puts(b, id);
        buf_puts(b, "\n");
    }
    buf_puts(b, "event: ");
    buf_puts(b, type);
    buf_puts(b, "\ndata: {\"id\":");
    if (id) {
        buf_puts(b, "\"");
        buf_puts(b, id);
        buf_puts(b, "\"");
    } else {
        buf_puts(b, "null");
    }
    buf_puts(b, ",\"event_type\":\"");
    buf_puts(b, type);
    buf_puts(b, "\",\"timestamp\":\"");
    buf_puts(b, ts);
    buf_puts(b, "\",\"data\":");
    buf_puts(b, data_json);
    buf_puts(b, "}\n\n");
}

static int all_digits(const char *p)
{
    if (!*p)
        return 0;
    for (; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    return 1;
}

void sse_stream_handler(httpd_req *req, void *ud)
{
    sse *s = ud;
    const char *cid = httpd_req_param(req, "client_id"), *last = httpd_req_header(req, "Last-Event-ID");
    rconn *r;
    sse_conn *c;
    redisReply *rep = NULL, *frames;
    httpstream *out;
    buf init;
    char est[FMT_I64_MAX], cjson[SSE_CLIENT_ID_MAX * 2 + 96];
    long long e = -1, lost, lastev, maxid = 0, threshold;
    int reset = 0;
    size_t replayed = 0;

    if (!cid || !sse_client_id_ok(cid)) {
        httpd_respond_error(req, 400, "invalid_request", "client_id must be 1-128 of A-Z a-z 0-9 _ . -", NULL);
        return;
    }
    if (atomic_load(&s->stopping)) {
        httpd_respond_error(req, 503, "unavailable", "the gateway is stopping", NULL);
        return;
    }
    r = sse_store_conn(s);
    c = calloc(1, sizeof(*c));
    if (!r || !c) {
        free(c);
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    c->hub = s;
    c->replaying = 1;
    buf_init(&c->pending, (size_t)s->cfg.client_buffer_bytes);
    fmt_copy(c->cid, sizeof(c->cid), cid);
    /* Registered first, so nothing published from now on is missed: what
     * arrives while the replay is read waits in `pending`. */
    reg_link(s, c);
    if (last && strlen(last) > 20)
        last = "x"; /* no id of ours is that long: unknown */
    if (sse_store_connect(s, r, cid, last, s->cfg.heartbeat_ms / 1000 * 2 + 10, &rep) < 0) {
        pthread_mutex_lock(stripe(s, c->bucket));
        reg_unlink_locked(s, c);
        pthread_mutex_unlock(stripe(s, c->bucket));
        buf_free(&c->pending);
        free(c);
        httpd_respond_error(req, 503, "unavailable", "the event store (Redis) is unavailable", NULL);
        return;
    }
    fmt_i64(est, rep->element[0]->integer);
    lost = rep->element[2]->type == REDIS_REPLY_STRING ? strtoll(rep->element[2]->str, NULL, 10) : 0;
    lastev = rep->element[3]->type == REDIS_REPLY_STRING ? strtoll(rep->element[3]->str, NULL, 10) : 0;
    frames = rep->element[4];
    if (last) {
        const char *eff = rep->element[1]->type == REDIS_REPLY_STRING ? rep->element[1]->str : "x";

        if (*eff == '\0') {
            e = -1; /* it stood for a fresh connection */
        } else if (!all_digits(eff)) {
            reset = 1;
        } else {
            e = strtoll(eff, NULL, 10);
            /* Unknown (beyond the counter), or older than the buffer. */
            if (e >= rep->element[0]->integer || e < lost || (frames->elements == 0 && lastev > e))
                reset = 1;
        }
    }
    /* The replay is bounded by the buffer (SSE_BUFFER_EVENTS events, each
     * under the publish route's body limit). */
    buf_init(&init, (size_t)1 << 30);
    /* The id's alphabet needs no JSON escaping. */
    snprintf(cjson, sizeof(cjson), "{\"client_id\":\"%s\",\"message\":\"Connected to event stream\"}", cid);
    append_event(&init, est, "connection.established", cjson);
    if (reset) {
        char data[160];

        snprintf(data, sizeof(data), "{\"reason\":\"%s\",\"last_event_id\":\"%.24s\",\"oldest_available\":%lld}",
                 e >= 0 ? "last_event_id_too_old" : "last_event_id_unknown", last ? last : "", lost + 1);
        append_event(&init, NULL, "stream.reset", data);
        metrics_counter_inc(s->c_resets);
        e = -1;
    }
    for (size_t i = 0; i < frames->elements; i++) {
        redisReply *f = frames->element[i];
        long long fid;

        if (f->type != REDIS_REPLY_STRING)
            continue;
        fid = frame_id(f->str, f->len);
        if (fid > maxid)
            maxid = fid;
        if (fid > e) {
            buf_append(&init, f->str, f->len);
            replayed++;
        }
    }
    metrics_counter_add(s->c_replayed, replayed);
    threshold = maxid > e ? maxid : e;
    /* A small read block: each of thousands of idle streams pays for it. */
    out = httpstream_new(req, 200, "text/event-stream", -1, 0, 1024);
    if (!out || httpstream_write_max(out, init.p, init.len, (size_t)-1) != 0) {
        pthread_mutex_lock(stripe(s, c->bucket));
        reg_unlink_locked(s, c);
        pthread_mutex_unlock(stripe(s, c->bucket));
        buf_free(&c->pending);
        buf_free(&init);
        freeReplyObject(rep);
        httpstream_release(out);
        free(c);
        if (!out)
            httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    buf_free(&init);
    freeReplyObject(rep);
    httpstream_add_header(out, "Cache-Control", "no-cache");
    httpstream_add_header(out, "X-Accel-Buffering", "no");
    c->out = out;
    httpstream_set_callbacks(out, NULL, conn_closed, c);
    atomic_fetch_add(&s->nclients, 1);
    metrics_gauge_add(s->g_clients, 1);
    /* Live from here: what came during the replay, less what it held. */
    pthread_mutex_lock(stripe(s, c->bucket));
    if (c->replaying == 2) {
        conn_drop_locked(s, c);
    } else {
        const char *p = c->pending.p, *end = p + c->pending.len;

        c->replaying = 0;
        while (p && p < end) {
            const char *stop = strstr(p, "\n\n");
            size_t n = stop ? (size_t)(stop + 2 - p) : (size_t)(end - p);

            if (frame_id(p, n) > threshold)
                conn_send_locked(s, c, p, n);
            p += n;
        }
    }
    buf_free(&c->pending);
    pthread_mutex_unlock(stripe(s, c->bucket));
    /* A client that takes nothing for this long (its window full) is
     * closed; a healthy idle stream is suspended and never times out. */
    httpd_req_set_timeout(req, (unsigned int)s->cfg.write_timeout_s);
}

/* ---- lifecycle ---------------------------------------------------------- */

sse *sse_new(const sse_config *sc, metrics *reg, char *err, size_t errlen)
{
    sse *s = calloc(1, sizeof(*s));
    unsigned char rnd[8];

    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->cfg = *sc;
    s->reg = reg ? reg : metrics_default();
    for (int i = 0; i < SSE_STRIPES; i++)
        pthread_mutex_init(&s->locks[i], NULL);
    s->g_clients = metrics_gauge_get(s->reg, "sse_clients", "SSE streams held by this instance.", NULL);
    s->c_delivered = metrics_counter_get(s->reg, "sse_events_delivered_total", "Events written to SSE streams.", NULL);
    s->c_dropped = metrics_counter_get(s->reg, "sse_clients_dropped_total",
                                       "SSE clients cut off because they did not keep up.", NULL);
    s->c_replayed = metrics_counter_get(s->reg, "sse_events_replayed_total",
                                        "Buffered events replayed to connecting SSE clients.", NULL);
    s->c_resets = metrics_counter_get(s->reg, "sse_stream_resets_total",
                                      "stream.reset sent for a Last-Event-ID older than the buffer or unknown.", NULL);
    s->c_published = metrics_counter_get(s->reg, "sse_events_published_total", "Events stored and published.", NULL);
    {
        FILE *f = fopen("/dev/urandom", "rb");
        size_t got = f ? fread(rnd, 1, sizeof(rnd), f) : 0;

        if (f)
            fclose(f);
        if (got != sizeof(rnd))
            memset(rnd, 0, sizeof(rnd));
        snprintf(s->instance, sizeof(s->instance), "%ld-%02x%02x%02x%02x%02x%02x%02x%02x", (long)getpid(), rnd[0],
                 rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
    }
    s->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->evfd < 0 || pthread_create(&s->thread, NULL, hub_main, s) != 0) {
        snprintf(err, errlen, "cannot start the SSE hub: %s", strerror(errno));
        sse_free(s);
        return NULL;
    }
    s->started = 1;
    return s;
}

void sse_stop(sse *s)
{
    uint64_t one = 1;

    if (!s || atomic_exchange(&s->stopping, 1))
        return;
    if (s->started) {
        if (write(s->evfd, &one, sizeof(one)) < 0)
            log_warn("sse: cannot wake the hub: %s", strerror(errno));
        pthread_join(s->thread, NULL);
        s->started = 0;
    }
    /* Ended cleanly: the clients reconnect (to another instance) and
     * replay from Redis. Their connections must not stay suspended. */
    for (unsigned b = 0; b < SSE_BUCKETS; b++) {
        pthread_mutex_lock(stripe(s, b));
        for (sse_conn *c = s->buckets[b]; c; c = c->next)
            if (c->out)
                httpstream_end(c->out, 0);
        pthread_mutex_unlock(stripe(s, b));
    }
}

void sse_free(sse *s)
{
    if (!s)
        return;
    sse_stop(s);
    if (s->evfd >= 0)
        close(s->evfd);
    for (int i = 0; i < SSE_STRIPES; i++)
        pthread_mutex_destroy(&s->locks[i]);
    free(s);
}
