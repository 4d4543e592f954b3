/* sse_hub: the hub thread (Redis subscription, heartbeats, the ingest
 * lock) and the stream route; the streams themselves are sse_out.c's. See
 * sse.h. */
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
#include "log.h"
#include "sse.h"
#include "svc.h"

#define SSE_LOCK_MS 3000   /* the ingest lock's lifetime; renewed every second */

struct sse {
    sse_config cfg;
    metrics *reg;
    metrics_gauge *g_clients;
    metrics_counter *c_delivered, *c_dropped, *c_replayed, *c_resets, *c_published;
    sse_out *out;
    sse_connector *conn;
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
    return s ? sse_out_clients(s->out) : 0;
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
    o->send_buffer_bytes = (int)cfg_int(c, "SSE_SEND_BUFFER_BYTES", 65536, 0, 16L << 20);
    o->answer_ttl_s = cfg_int(c, "HITL_ANSWER_TTL_SECONDS", 7L * 86400, 1, 365L * 86400);
    o->writers = (int)cfg_int(c, "SSE_WRITERS", 0, 0, SSE_OUT_MAX_WRITERS);
    o->max_streams = 10000;
    rconn_opts_from_cfg(c, &o->redis);
    fmt_copy(o->internal_token, sizeof(o->internal_token), internal_token);
}

int sse_hub_has(sse *s, const char *cid)
{
    return sse_out_has(s->out, cid);
}

/* A frame from the deliver channel: "client_id\nframe". */
static void hub_deliver(sse *s, const char *msg, size_t len)
{
    const char *nl = memchr(msg, '\n', len);

    if (!nl || (size_t)(nl - msg) > SSE_CLIENT_ID_MAX)
        return;
    sse_out_deliver(s->out, msg, (size_t)(nl - msg), nl + 1, len - (size_t)(nl - msg) - 1);
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

int sse_publish(sse *s, rconn *r, const char *cid, const char *type, const cJSON *data, const char *idem_key,
                long long *id, int *replayed)
{
    char *text = data ? cJSON_PrintUnformatted(data) : NULL;
    int rc;

    if (data && !text)
        return -1;
    rc = sse_store_publish(s, r, cid, type, text ? text : "null", idem_key, id, replayed);
    free(text);
    if (rc == 0 && !*replayed)
        metrics_counter_inc(s->c_published);
    return rc;
}

/* A backend's own PUBLISH sse:{client_id} {"event_type","data"} (and an
 * optional "idempotency_key", as the HTTP route's header): stored (and so
 * delivered) by the instance holding the ingest lock. */
static void hub_ingest(sse *s, rconn *cmd, const char *channel, const char *payload, size_t len)
{
    const char *cid = channel + 4;
    cJSON *msg, *type, *key;
    long long id;
    int replayed;

    if (!s->ingester || !sse_client_id_ok(cid))
        return;
    msg = cJSON_ParseWithLength(payload, len);
    type = cJSON_GetObjectItemCaseSensitive(msg, "event_type");
    key = cJSON_GetObjectItemCaseSensitive(msg, "idempotency_key");
    if (!cJSON_IsObject(msg) || !cJSON_IsString(type) || !sse_event_type_ok(type->valuestring) ||
        (key && !cJSON_IsNull(key) && !(cJSON_IsString(key) && sse_idem_key_ok(key->valuestring)))) {
        char ecid[300];

        log_warn("sse: a message on sse:%s is not {\"event_type\": <type>, \"data\": ..., \"idempotency_key\": "
                 "<1-255 printable ASCII, optional>}; dropped",
                 log_escape(ecid, sizeof(ecid), cid));
    } else if (sse_publish(s, cmd, cid, type->valuestring, cJSON_GetObjectItemCaseSensitive(msg, "data"),
                           cJSON_IsString(key) ? key->valuestring : NULL, &id, &replayed) < 0) {
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
    size_t len, ncids;
    char (*cids)[SSE_CLIENT_ID_MAX + 1] = NULL;
    long ttl = s->cfg.heartbeat_ms / 1000 * 2 + 10;
    redisContext *rc;

    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    len = (size_t)snprintf(frame, sizeof(frame), "event: heartbeat\ndata: {\"timestamp\":\"%s\"}\n\n", ts);
    sse_out_heartbeat(s->out, frame, len);
    ncids = sse_out_client_ids(s->out, &cids);
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

/* The subscription is back after a break: what was published meanwhile is
 * stored but reached no stream held here. Each live one is ended cleanly,
 * so its client reconnects with Last-Event-ID and replays it (a stream
 * still replaying read the buffer after the break and stays). */
static void hub_end_streams(sse *s)
{
    long n = sse_out_clients(s->out);

    if (n > 0) {
        log_event(LOG_INFO, "sse_streams_ended", "\"count\":%ld,\"reason\":\"Redis subscription restored\"", n);
        sse_out_end_all(s->out);
    }
}

static void *hub_main(void *ud)
{
    sse *s = ud;
    rconn *sub = rconn_new(&s->cfg.redis, 2000), *cmd = rconn_new(&s->cfg.redis, 2000);
    long long next_beat = svc_now_ms() + s->cfg.heartbeat_ms, next_lock = 0;
    int subscribed = 0, broke = 0;

    while (sub && cmd && !atomic_load(&s->stopping)) {
        struct pollfd fds[2];
        long long now = svc_now_ms(), due = next_beat < next_lock ? next_beat : next_lock;
        int nfds = 1, timeout;

        if (!subscribed && hub_subscribe(s, sub) == 0) {
            subscribed = 1;
            if (broke)
                hub_end_streams(s);
            broke = 0;
        }
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
                broke = 1;
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

    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
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

static long long frame_id(const char *frame, size_t len)
{
    if (len < 5 || memcmp(frame, "id: ", 4) != 0)
        return -1;
    return strtoll(frame + 4, NULL, 10);
}

/* What the connect script said: the first bytes of the stream
 * (connection.established, maybe stream.reset, the replay) into `init`,
 * and the highest id they cover. */
static long long build_replay(sse *s, const char *cid, const char *last, redisReply *rep, buf *init)
{
    char est[FMT_I64_MAX], cjson[SSE_CLIENT_ID_MAX * 2 + 96];
    long long e = -1, lost, lastev, maxid = 0;
    redisReply *frames = rep->element[4];
    size_t replayed = 0;
    int reset = 0;

    fmt_i64(est, rep->element[0]->integer);
    lost = rep->element[2]->type == REDIS_REPLY_STRING ? strtoll(rep->element[2]->str, NULL, 10) : 0;
    lastev = rep->element[3]->type == REDIS_REPLY_STRING ? strtoll(rep->element[3]->str, NULL, 10) : 0;
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
    /* The id's alphabet needs no JSON escaping. */
    snprintf(cjson, sizeof(cjson), "{\"client_id\":\"%s\",\"message\":\"Connected to event stream\"}", cid);
    append_event(init, est, "connection.established", cjson);
    if (reset) {
        char data[160];

        snprintf(data, sizeof(data), "{\"reason\":\"%s\",\"last_event_id\":\"%.24s\",\"oldest_available\":%lld}",
                 e >= 0 ? "last_event_id_too_old" : "last_event_id_unknown", last ? last : "", lost + 1);
        append_event(init, NULL, "stream.reset", data);
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
            buf_append(init, f->str, f->len);
            replayed++;
        }
    }
    metrics_counter_add(s->c_replayed, replayed);
    return maxid > e ? maxid : e;
}

/* The stream's second half, on its MHD thread once its connect script
 * has run (sse_connect.c): the replay, then the socket to a writer. */
static void stream_resumed(httpd_req *req, void *ud)
{
    sse_connect_job *j = ud;
    sse *s = j->s;
    buf init, head;
    long long threshold;
    int fd, chunked = 0;

    if (!j->rep) {
        sse_out_cancel(s->out, j->st);
        httpd_respond_error(req, 503, "unavailable", "the event store (Redis) is unavailable", NULL);
        free(j);
        return;
    }
    /* The replay is bounded by the buffer (SSE_BUFFER_EVENTS events, each
     * under the publish route's body limit). */
    buf_init(&init, (size_t)1 << 30);
    buf_init(&head, 8192);
    threshold = build_replay(s, j->cid, j->has_last ? j->last : NULL, j->rep, &init);
    freeReplyObject(j->rep);
    httpd_req_add_header(req, "Cache-Control", "no-cache");
    httpd_req_add_header(req, "X-Accel-Buffering", "no");
    fd = init.truncated ? -1 : httpd_req_detach(req, 200, "text/event-stream", &head, &chunked);
    if (fd < 0) {
        sse_out_cancel(s->out, j->st);
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
    } else {
        /* From here the socket and the stream are the writer's. */
        sse_out_start(s->out, j->st, fd, chunked, head.p, head.len, init.p, init.len, threshold);
    }
    buf_free(&head);
    buf_free(&init);
    free(j);
}

void sse_stream_handler(httpd_req *req, void *ud)
{
    sse *s = ud;
    const char *cid = httpd_req_param(req, "client_id"), *last = httpd_req_header(req, "Last-Event-ID");
    sse_connect_job *j;
    int why;

    if (!cid || !sse_client_id_ok(cid)) {
        httpd_respond_error(req, 400, "invalid_request", "client_id must be 1-128 of A-Z a-z 0-9 _ . -", NULL);
        return;
    }
    if (atomic_load(&s->stopping)) {
        httpd_respond_error(req, 503, "unavailable", "the gateway is stopping", NULL);
        return;
    }
    if (strcmp(httpd_req_method(req), "HEAD") == 0) {
        httpd_respond_static(req, 200, "text/event-stream", "", 0);
        httpd_req_add_header(req, "Cache-Control", "no-cache");
        return;
    }
    j = calloc(1, sizeof(*j));
    if (!j) {
        httpd_respond_error(req, 500, "internal", "out of memory", NULL);
        return;
    }
    /* Registered first, so nothing published from now on is missed: what
     * arrives while the replay is read is held for the stream. */
    j->st = sse_out_open(s->out, cid, httpd_req_remote(req), &why);
    if (!j->st) {
        free(j);
        if (why == SSE_OUT_FAILED)
            httpd_respond_error(req, 503, "unavailable", "cannot open a stream now", NULL);
        else
            httpd_respond_error(req, 503, "unavailable",
                                why == SSE_OUT_FULL ? "Server at capacity" : "too many streams from this address",
                                NULL);
        return;
    }
    j->req = req;
    j->s = s;
    j->online_ttl_s = s->cfg.heartbeat_ms / 1000 * 2 + 10;
    snprintf(j->cid, sizeof(j->cid), "%s", cid);
    if (last) {
        j->has_last = 1;
        /* No id of ours is that long: unknown. */
        snprintf(j->last, sizeof(j->last), "%s", strlen(last) > 20 ? "x" : last);
    }
    /* The script's round trip is the connect thread's, pipelined with
     * the other connects': this thread goes on serving. */
    if (httpd_req_defer_answer(req, stream_resumed, j) < 0) {
        sse_out_cancel(s->out, j->st);
        free(j);
        return;
    }
    if (sse_connector_submit(s->conn, j) < 0)
        httpd_req_resume(req); /* stopping: rep NULL answers 503 */
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
    {
        sse_out_config oc = {sc->writers, sc->max_streams, sc->max_per_ip, sc->client_buffer_bytes,
                             sc->write_timeout_s, sc->send_buffer_bytes};
        sse_out_metrics om = {s->g_clients, s->c_delivered, s->c_dropped};

        if (oc.writers <= 0) {
            long n = sysconf(_SC_NPROCESSORS_ONLN);

            oc.writers = n < 1 ? 1 : n > 8 ? 8 : (int)n;
        }
        s->out = sse_out_new(&oc, &om, err, errlen);
        if (!s->out) {
            s->evfd = -1;
            sse_free(s);
            return NULL;
        }
    }
    s->evfd = -1;
    s->conn = sse_connector_new(s, err, errlen);
    if (!s->conn) {
        sse_free(s);
        return NULL;
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
    /* Connects still queued get 503; then the live streams end cleanly:
     * the clients reconnect (to another instance) and replay from Redis. */
    sse_connector_stop(s->conn);
    sse_out_stop(s->out);
}

void sse_free(sse *s)
{
    if (!s)
        return;
    sse_stop(s);
    if (s->evfd >= 0)
        close(s->evfd);
    sse_connector_free(s->conn);
    sse_out_free(s->out);
    free(s);
}
