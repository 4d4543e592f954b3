#include "queue.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QUEUE_TAKE_MAX 1000

struct queue {
    rconn *r;
    char list[128], inflight[140], delayed[140], dlq[140], pace[140];
    char err[256];
};

/* KEYS: list, inflight. ARGV: max, deadline. Takes up to max jobs from
 * the consuming (right) end, the rightmost first, and leases them all with
 * one LRANGE, one LTRIM and one ZADD, instead of an RPOP and a ZADD per
 * job: a batch costs three commands inside the script whatever its size. */
static const char take_lua[] =
    "local js = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)\n"
    "local k = #js\n"
    "if k == 0 then return js end\n"
    "redis.call('LTRIM', KEYS[1], 0, -k - 1)\n"
    "local out, args = {}, {}\n"
    "for i = k, 1, -1 do\n"
    "  out[#out + 1] = js[i]\n"
    "  args[#args + 1] = ARGV[2]\n"
    "  args[#args + 1] = js[i]\n"
    "end\n"
    "redis.call('ZADD', KEYS[2], unpack(args))\n"
    "return out\n";

/* KEYS: list, inflight, delayed. ARGV: now, limit. Due and expired jobs go
 * to the consuming end: they are older than anything waiting. */
static const char maintain_lua[] =
    "local function move(src)\n"
    "  local js = redis.call('ZRANGEBYSCORE', src, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))\n"
    "  for _, j in ipairs(js) do\n"
    "    redis.call('ZREM', src, j)\n"
    "    redis.call('RPUSH', KEYS[1], j)\n"
    "  end\n"
    "  return #js\n"
    "end\n"
    "return {move(KEYS[3]), move(KEYS[2])}\n";

/* KEYS: list, inflight, delayed, dlq. ARGV: groups of four (raw, kind,
 * payload, due), one per job. One script records a whole batch, so a
 * batch costs one round trip and one script call instead of one per job.
 * Returns, per job, 1 when this call recorded it and 0 when the job was
 * neither leased nor queued (another worker holds or recorded it), or was
 * to be left leased (kind 4, QUEUE_KEEP: nothing to do). */
static const char ack_lua[] =
    "local out = {}\n"
    "for i = 1, #ARGV, 4 do\n"
    "  local raw = ARGV[i]\n"
    "  local k = ARGV[i + 1]\n"
    "  local r = 0\n"
    "  if k ~= '4' then r = redis.call('ZREM', KEYS[2], raw) end\n"
    "  if r == 0 and k ~= '4' then r = redis.call('LREM', KEYS[1], -1, raw) end\n"
    "  if r ~= 0 then\n"
    "    if k == '1' then redis.call('ZADD', KEYS[3], ARGV[i + 3], ARGV[i + 2])\n"
    "    elseif k == '2' then redis.call('LPUSH', KEYS[4], ARGV[i + 2])\n"
    "    elseif k == '3' then redis.call('RPUSH', KEYS[1], raw) end\n"
    "    r = 1\n"
    "  end\n"
    "  out[#out + 1] = r\n"
    "end\n"
    "return out\n";

/* KEYS: pace key. ARGV: now, interval. Returns the wait in ms. */
static const char pace_lua[] =
    "local now = tonumber(ARGV[1])\n"
    "local slot = tonumber(redis.call('GET', KEYS[1]) or '0')\n"
    "if slot < now then slot = now end\n"
    "redis.call('SET', KEYS[1], tostring(slot + tonumber(ARGV[2])), 'PX', tonumber(ARGV[2]) + (slot - now) + 60000)\n"
    "return slot - now\n";

static const char block_lua[] =
    "local slot = tonumber(redis.call('GET', KEYS[1]) or '0')\n"
    "if slot < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'PX', 3600000) end\n"
    "return 1\n";

queue *queue_new(const rconn_opts *o, const char *prefix, int timeout_ms)
{
    queue *q = calloc(1, sizeof(*q));

    if (!q)
        return NULL;
    q->r = rconn_new(o, timeout_ms);
    if (!q->r) {
        free(q);
        return NULL;
    }
    if (!prefix)
        prefix = "action_jobs";
    snprintf(q->list, sizeof(q->list), "%s", prefix);
    snprintf(q->inflight, sizeof(q->inflight), "%s_inflight", q->list);
    snprintf(q->delayed, sizeof(q->delayed), "%s_delayed", q->list);
    snprintf(q->dlq, sizeof(q->dlq), "%s_dlq", q->list);
    snprintf(q->pace, sizeof(q->pace), "%s_pace:", q->list);
    return q;
}

void queue_free(queue *q)
{
    if (!q)
        return;
    rconn_free(q->r);
    free(q);
}

const char *queue_errstr(const queue *q)
{
    return q->err;
}

/* hiredis frees its read buffer after each reply once more than 16 KiB of
 * it is unused, so every batch of taken jobs (tens of KiB) had it
 * allocated anew. The buffer is bounded by the largest reply (a take is at
 * most QUEUE_TAKE_MAX jobs), so it is kept instead. Set on each call: a
 * reconnect makes a new reader. */
static void keep_read_buffer(queue *q)
{
    redisContext *ctx = rconn_context(q->r);

    if (ctx && ctx->reader)
        ctx->reader->maxbuf = 0;
}

static void set_err(queue *q, redisReply *rep)
{
    if (!rep)
        snprintf(q->err, sizeof(q->err), "%s", rconn_errstr(q->r));
    else if (rep->type == REDIS_REPLY_ERROR)
        snprintf(q->err, sizeof(q->err), "%s", rep->str);
    else
        snprintf(q->err, sizeof(q->err), "unexpected reply type %d", rep->type);
}

/* Fills the take's argv (7 entries) for up to `max` jobs. */
static void take_argv(queue *q, int max, long long deadline_ms, char *smax, size_t smaxlen, char *sdl, size_t sdllen,
                      const char **argv)
{
    /* The script passes two arguments per job to one ZADD, and Lua 5.1
     * unpacks at most 8000 values. */
    if (max > QUEUE_TAKE_MAX)
        max = QUEUE_TAKE_MAX;
    snprintf(smax, smaxlen, "%d", max);
    snprintf(sdl, sdllen, "%lld", deadline_ms);
    argv[0] = "EVAL";
    argv[1] = take_lua;
    argv[2] = "2";
    argv[3] = q->list;
    argv[4] = q->inflight;
    argv[5] = smax;
    argv[6] = sdl;
}

/* Turns the take's reply into the jobs (and frees it). */
static int take_reply(queue *q, redisReply *rep, char ***out, int *n)
{
    char **jobs;

    if (!rep || rep->type != REDIS_REPLY_ARRAY) {
        set_err(q, rep);
        if (rep)
            freeReplyObject(rep);
        return -1;
    }
    if (rep->elements == 0) {
        freeReplyObject(rep);
        return 0;
    }
    jobs = calloc(rep->elements, sizeof(*jobs));
    if (!jobs) {
        freeReplyObject(rep);
        snprintf(q->err, sizeof(q->err), "out of memory");
        return -1;
    }
    for (size_t i = 0; i < rep->elements; i++) {
        redisReply *e = rep->element[i];

        jobs[*n] = e->type == REDIS_REPLY_STRING ? malloc(e->len + 1) : NULL;
        if (jobs[*n]) {
            memcpy(jobs[*n], e->str, e->len);
            jobs[*n][e->len] = '\0';
            (*n)++;
        }
    }
    freeReplyObject(rep);
    *out = jobs;
    return 0;
}

int queue_take_send(queue *q, int max, long long deadline_ms)
{
    char smax[16], sdl[32];
    const char *argv[7];
    redisContext *ctx;
    int done = 0;

    if (max <= 0 || rconn_connect(q->r) < 0 || !(ctx = rconn_context(q->r))) {
        snprintf(q->err, sizeof(q->err), "%s", max <= 0 ? "nothing to take" : rconn_errstr(q->r));
        return -1;
    }
    keep_read_buffer(q);
    take_argv(q, max, deadline_ms, smax, sizeof(smax), sdl, sizeof(sdl), argv);
    /* Sent once: a retry after a lost answer could take jobs twice, so a
     * failure is reported and the lease reaper recovers any taken job. */
    if (redisAppendCommandArgv(ctx, 7, argv, NULL) != REDIS_OK)
        goto fail;
    /* The command is small: on the blocking socket this returns once it
     * is all written (or failed). */
    do {
        if (redisBufferWrite(ctx, &done) != REDIS_OK)
            goto fail;
    } while (!done);
    return ctx->fd;
fail:
    snprintf(q->err, sizeof(q->err), "%s", ctx->errstr[0] ? ctx->errstr : "redis I/O error");
    rconn_mark_broken(q->r);
    return -1;
}

void queue_take_drop(queue *q)
{
    rconn_mark_broken(q->r);
}

int queue_take_recv(queue *q, int block, char ***out, int *n)
{
    redisContext *ctx = rconn_context(q->r);
    void *rep = NULL;

    *out = NULL;
    *n = 0;
    if (!ctx) {
        snprintf(q->err, sizeof(q->err), "%s", rconn_errstr(q->r));
        return -1;
    }
    if (block) {
        if (redisGetReply(ctx, &rep) != REDIS_OK)
            goto fail;
    } else {
        /* What the socket has now (epoll said it is readable), then a
         * reply if it is complete. */
        if (redisBufferRead(ctx) != REDIS_OK || redisGetReplyFromReader(ctx, &rep) != REDIS_OK)
            goto fail;
        if (!rep)
            return 0;
    }
    return take_reply(q, rep, out, n) < 0 ? -1 : 1;
fail:
    snprintf(q->err, sizeof(q->err), "%s", ctx->errstr[0] ? ctx->errstr : "redis I/O error");
    rconn_mark_broken(q->r);
    return -1;
}

/* Sends `n` pipelined commands already appended and reads their replies;
 * `ok[i]` (may be NULL) is set for each reply that is an integer 1. */
static int pipeline_read(queue *q, redisContext *ctx, int n, int *ok)
{
    int got = 0;

    for (int i = 0; i < n; i++) {
        void *vp = NULL;
        redisReply *rep;

        if (redisGetReply(ctx, &vp) != REDIS_OK) {
            snprintf(q->err, sizeof(q->err), "%s", ctx->errstr[0] ? ctx->errstr : "redis I/O error");
            rconn_mark_broken(q->r);
            return got ? got : -1;
        }
        rep = vp;
        if (rep->type == REDIS_REPLY_ERROR)
            set_err(q, rep);
        else {
            if (ok)
                ok[i] = 1;
            got++;
        }
        freeReplyObject(rep);
    }
    return got;
}

int queue_extend(queue *q, char *const *raws, int n, long long deadline_ms)
{
    redisContext *ctx;
    char sdl[32];

    if (n <= 0)
        return 0;
    if (rconn_connect(q->r) < 0) {
        snprintf(q->err, sizeof(q->err), "%s", rconn_errstr(q->r));
        return -1;
    }
    ctx = rconn_context(q->r);
    snprintf(sdl, sizeof(sdl), "%lld", deadline_ms);
    for (int i = 0; i < n; i++) {
        const char *argv[5] = {"ZADD", q->inflight, "XX", sdl, raws[i]};

        redisAppendCommandArgv(ctx, 5, argv, NULL);
    }
    return pipeline_read(q, ctx, n, NULL) < 0 ? -1 : 0;
}

int queue_maintain(queue *q, long long now_ms, int limit, int *moved, int *reaped)
{
    char snow[32], slim[16];
    const char *ka[5] = {q->list, q->inflight, q->delayed, snow, slim};
    redisReply *rep;

    snprintf(snow, sizeof(snow), "%lld", now_ms);
    snprintf(slim, sizeof(slim), "%d", limit);
    rep = rconn_eval(q->r, 1, maintain_lua, 3, 2, ka, NULL);
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 2) {
        set_err(q, rep);
        if (rep)
            freeReplyObject(rep);
        return -1;
    }
    if (moved)
        *moved = (int)rep->element[0]->integer;
    if (reaped)
        *reaped = (int)rep->element[1]->integer;
    freeReplyObject(rep);
    return 0;
}

#define ACK_CHUNK 512

/* Records acks[0..n) (n <= ACK_CHUNK) with one script call. */
static int record_chunk(queue *q, queue_ack *acks, int n)
{
    const char **ka = calloc((size_t)(4 + 4 * n), sizeof(*ka));
    char (*nums)[2][24] = calloc((size_t)n, sizeof(*nums));
    redisReply *rep = NULL;
    int got = -1;

    if (!ka || !nums) {
        snprintf(q->err, sizeof(q->err), "out of memory");
        goto out;
    }
    ka[0] = q->list;
    ka[1] = q->inflight;
    ka[2] = q->delayed;
    ka[3] = q->dlq;
    for (int i = 0; i < n; i++) {
        const char **a = ka + 4 + 4 * i;

        snprintf(nums[i][0], sizeof(nums[i][0]), "%d", (int)acks[i].kind);
        snprintf(nums[i][1], sizeof(nums[i][1]), "%lld", acks[i].due_ms);
        a[0] = acks[i].raw;
        a[1] = nums[i][0];
        a[2] = acks[i].payload ? acks[i].payload : "";
        a[3] = nums[i][1];
    }
    /* Not retried inside rconn: the caller keeps every job whose ack is not
     * confirmed and sends it again, and a repeated ack is harmless (the job
     * is no longer leased, so the second one is a no-op). */
    rep = rconn_eval(q->r, 0, ack_lua, 4, 4 * n, ka, NULL);
    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != (size_t)n) {
        set_err(q, rep);
        goto out;
    }
    for (int i = 0; i < n; i++)
        acks[i].done = 1;
    got = n;
out:
    if (rep)
        freeReplyObject(rep);
    free(nums);
    free(ka);
    return got;
}

/* Records acks[0..n) (n <= ACK_CHUNK, all QUEUE_DONE) with one ZREM, the
 * common case: no script, so Redis spends about 1.2 us per job instead of
 * 2.8 (the script copies every job into Lua and back). Returns n when
 * every job was leased; 0 when some were not (a lease ran out and the job
 * went back to the list): then the caller records the chunk with the
 * script, which finds those in the list (the others, already removed,
 * are no-ops there); -1 when Redis failed. */
static int record_done(queue *q, queue_ack *acks, int n)
{
    const char **argv = malloc((size_t)(2 + n) * sizeof(*argv));
    redisReply *rep;
    int got = -1;

    if (!argv) {
        snprintf(q->err, sizeof(q->err), "out of memory");
        return -1;
    }
    argv[0] = "ZREM";
    argv[1] = q->inflight;
    for (int i = 0; i < n; i++)
        argv[2 + i] = acks[i].raw;
    rep = rconn_command_argv(q->r, 0, 2 + n, argv, NULL);
    if (!rep || rep->type != REDIS_REPLY_INTEGER) {
        set_err(q, rep);
    } else if (rep->integer == n) {
        for (int i = 0; i < n; i++)
            acks[i].done = 1;
        got = n;
    } else {
        got = 0;
    }
    if (rep)
        freeReplyObject(rep);
    free(argv);
    return got;
}

static int all_done(const queue_ack *acks, int n)
{
    for (int i = 0; i < n; i++)
        if (acks[i].kind != QUEUE_DONE)
            return 0;
    return 1;
}

int queue_record(queue *q, queue_ack *acks, int n)
{
    int got = 0;

    for (int i = 0; i < n; i += ACK_CHUNK) {
        int k = n - i < ACK_CHUNK ? n - i : ACK_CHUNK, r = all_done(acks + i, k) ? record_done(q, acks + i, k) : 0;

        if (r == 0)
            r = record_chunk(q, acks + i, k);
        if (r < 0)
            return got ? got : -1;
        got += r;
    }
    return got;
}

int queue_pace(queue *q, const char *chat, long interval_ms, long long now_ms, long *wait_ms)
{
    char key[300], snow[32], sint[32];
    const char *ka[3] = {key, snow, sint};
    redisReply *rep;

    snprintf(key, sizeof(key), "%s%s", q->pace, chat);
    snprintf(snow, sizeof(snow), "%lld", now_ms);
    snprintf(sint, sizeof(sint), "%ld", interval_ms);
    rep = rconn_eval(q->r, 0, pace_lua, 1, 2, ka, NULL);
    if (!rep || rep->type != REDIS_REPLY_INTEGER) {
        set_err(q, rep);
        if (rep)
            freeReplyObject(rep);
        return -1;
    }
    *wait_ms = (long)rep->integer;
    freeReplyObject(rep);
    return 0;
}

int queue_pace_block(queue *q, const char *chat, long long until_ms)
{
    char key[300], suntil[32];
    const char *ka[2] = {key, suntil};
    redisReply *rep;

    snprintf(key, sizeof(key), "%s%s", q->pace, chat);
    snprintf(suntil, sizeof(suntil), "%lld", until_ms);
    rep = rconn_eval(q->r, 1, block_lua, 1, 1, ka, NULL);
    if (!rep || rep->type == REDIS_REPLY_ERROR) {
        set_err(q, rep);
        if (rep)
            freeReplyObject(rep);
        return -1;
    }
    freeReplyObject(rep);
    return 0;
}

int queue_push(queue *q, const char *job)
{
    redisReply *rep = rconn_command(q->r, 0, "LPUSH %s %s", q->list, job);

    if (!rep || rep->type != REDIS_REPLY_INTEGER) {
        set_err(q, rep);
        if (rep)
            freeReplyObject(rep);
        return -1;
    }
    freeReplyObject(rep);
    return 0;
}
