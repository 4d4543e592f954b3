#include "jobs.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include <openssl/evp.h>

#include "buf.h"
#include "fmt.h"
#include "hash.h"
#include "jsonstr.h"
#include "pgarr.h"

/* Values per LPUSH/RPUSH command: bounds the argument vector Redis parses
 * at once. */
#define PUSH_CHUNK 1000
/* The largest batch of job documents accepted in one push. */
#define MAX_ARENA_BYTES ((size_t)1 << 30)

/* A job: its document lives in the arena already framed as a RESP bulk
 * string ("$len\r\n{...}\r\n"), so the push writes it to the socket from
 * there (writev) without copying it; its channel and Broadcast live in
 * `pub`. Offsets, since the buffers move as they grow. */
typedef struct {
    char id[65];
    int priority;
    int seq;
    size_t bulk_off, bulk_len;
    size_t ch_off, ch_len; /* ch_len 0: no Broadcast */
    size_t msg_off, msg_len;
    /* The message id (64 hex digits at mid_off in the message) is the
     * digest of trigger id and event id, kept raw at tid/eid_off; it is
     * computed at push time, and only for messages someone receives. */
    size_t mid_off, tid_off, eid_off;
    int chan; /* the channel's index among the push's distinct channels */
} job;

/* A piece of the push: `len` bytes at `off` in the arena or in resp. */
typedef struct {
    int in_arena;
    size_t off, len;
} seg;

struct jobs {
    job *v;
    int n, cap;
    int nhigh;       /* jobs with priority > 1 (0: no sorting needed) */
    buf arena;      /* job documents as RESP bulks, back to back */
    buf pub;        /* channels and Broadcast messages */
    buf ev, tr, ac; /* outbox array literals */
    buf resp;       /* command framing and the small commands of a push */
    seg *segs;       /* the push, in order */
    int nseg, capseg;
    EVP_MD_CTX *mdctx;
    EVP_MD *md;
    /* Per push: the distinct channels (index of a job holding each) and
     * their subscriber counts; an open-addressing table finds them. */
    int *chans, nchans, capchans;
    long long *subs;
    int *slots, capslots;
};

#define PUT_LIT(b, lit) buf_append_all((b), (lit), sizeof(lit) - 1)

static inline int put_str(buf *b, const char *s)
{
    return buf_append_all(b, s, strlen(s));
}

/* A RESP header: `lead` ('*' or '$'), the number, CRLF. */
static int resp_head(char *out, char lead, long long n)
{
    int k = 1;

    out[0] = lead;
    k += (int)fmt_i64(out + 1, n);
    out[k++] = '\r';
    out[k++] = '\n';
    return k;
}

/* RESP: an array header and a bulk string. */
static int resp_array(buf *b, long n)
{
    char h[32];
    int k = resp_head(h, '*', n);

    return buf_append_all(b, h, (size_t)k);
}

static int resp_bulk(buf *b, const char *s, size_t n)
{
    char h[32];
    int k = resp_head(h, '$', (long long)n);

    char *w = buf_extend(b, (size_t)k + n + 2);

    if (!w)
        return -1;
    memcpy(w, h, (size_t)k);
    memcpy(w + k, s, n);
    memcpy(w + k + n, "\r\n", 2);
    return 0;
}

static int resp_cmd(buf *b, int argc, const char **argv)
{
    if (resp_array(b, argc) < 0)
        return -1;
    for (int i = 0; i < argc; i++)
        if (resp_bulk(b, argv[i], strlen(argv[i])) < 0)
            return -1;
    return 0;
}

jobs *jobs_new(void)
{
    jobs *j = calloc(1, sizeof(jobs));

    if (!j)
        return NULL;
    buf_init(&j->arena, MAX_ARENA_BYTES);
    buf_init(&j->pub, MAX_ARENA_BYTES);
    buf_init(&j->ev, MAX_ARENA_BYTES);
    buf_init(&j->tr, MAX_ARENA_BYTES);
    buf_init(&j->ac, MAX_ARENA_BYTES);
    buf_init(&j->resp, MAX_ARENA_BYTES);
    j->mdctx = EVP_MD_CTX_new();
    j->md = EVP_MD_fetch(NULL, "SHA256", NULL);
    if (!j->mdctx || !j->md) {
        jobs_free(j);
        return NULL;
    }
    return j;
}

void jobs_clear(jobs *j)
{
    j->n = j->nhigh = j->nseg = 0;
    j->arena.len = j->pub.len = j->ev.len = j->tr.len = j->ac.len = j->resp.len = 0;
}

void jobs_free(jobs *j)
{
    if (!j)
        return;
    free(j->v);
    buf_free(&j->arena);
    buf_free(&j->pub);
    free(j->segs);
    buf_free(&j->ev);
    buf_free(&j->tr);
    buf_free(&j->ac);
    buf_free(&j->resp);
    free(j->chans);
    free(j->subs);
    free(j->slots);
    EVP_MD_CTX_free(j->mdctx);
    EVP_MD_free(j->md);
    free(j);
}

int jobs_count(const jobs *j)
{
    return j->n;
}

/* Hex SHA-256 of "a|b" or "a|b|c" (c NULL: two parts). The context is
 * reused: a fresh EVP fetch per digest costs more than the digest. */
static void digest3(jobs *j, const char *a, const char *b, const char *c, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    memset(md, 0, sizeof(md));
    if (EVP_DigestInit_ex(j->mdctx, j->md, NULL) != 1 || EVP_DigestUpdate(j->mdctx, a, strlen(a)) != 1 ||
        EVP_DigestUpdate(j->mdctx, "|", 1) != 1 || EVP_DigestUpdate(j->mdctx, b, strlen(b)) != 1 ||
        (c && (EVP_DigestUpdate(j->mdctx, "|", 1) != 1 || EVP_DigestUpdate(j->mdctx, c, strlen(c)) != 1)) ||
        EVP_DigestFinal_ex(j->mdctx, md, &mdlen) != 1)
        mdlen = 32; /* all zeros: never happens short of OOM */
    fmt_hex(hex, md, 32);
}

/* A piece of a job document. */
typedef struct {
    const char *s;
    size_t n;
} piece;

#define PIECE_LIT(lit) ((piece){(lit), sizeof(lit) - 1})
#define PIECE_STR(str) ((piece){(str), strlen(str)})

static int add_common(jobs *j, const char *tid, const char *tid_esc, const char *name_esc, const char *user_esc,
                      int action_id, const char *action_type, int priority, const char *config_json,
                      const jobs_event *ev, const char *now, int publish)
{
    char prio[FMT_I64_MAX], aid[FMT_I64_MAX], hdr[32];
    buf *a = &j->arena, *pb = &j->pub;
    size_t arena_len = a->len, pub_len = pb->len, ev_len = j->ev.len, tr_len = j->tr.len, ac_len = j->ac.len;
    size_t total = 0;
    char *w;
    int hlen;
    job *x;

    if (j->n == j->cap) {
        int cap = j->cap ? j->cap * 2 : 256;
        job *p = realloc(j->v, (size_t)cap * sizeof(*p));

        if (!p)
            return -1;
        j->v = p;
        j->cap = cap;
    }
    x = &j->v[j->n];
    fmt_i64(aid, action_id);
    fmt_i64(prio, priority);
    /* The id hashes the raw ids, so it never depends on escaping. */
    digest3(j, tid, ev->id, aid, x->id);
    x->priority = priority;
    x->seq = j->n;
    x->ch_len = x->msg_len = 0;
    {
        /* The document is spliced from prebuilt pieces (the event's JSON is
         * built once per event, the trigger's escaped strings once per
         * load), after its RESP bulk header, whose length is known once
         * the pieces are. */
        const piece pieces[] = {
            PIECE_LIT("{\"id\":\""), {x->id, 64}, PIECE_LIT("\",\"trigger_id\":\""), PIECE_STR(tid_esc),
            PIECE_LIT("\",\"event_id\":\""), PIECE_STR(ev->id_esc), PIECE_LIT("\",\"action_type\":\""),
            PIECE_STR(action_type), PIECE_LIT("\",\"action_id\":"), PIECE_STR(aid), PIECE_LIT(",\"priority\":"),
            PIECE_STR(prio), PIECE_LIT(",\"config\":"), PIECE_STR(config_json), PIECE_LIT(",\"event\":"),
            {ev->json, ev->json_len}, PIECE_LIT(",\"created_at\":\""), PIECE_STR(now),
            PIECE_LIT("\",\"attempt\":0,\"trigger_name\":\""), PIECE_STR(name_esc), PIECE_LIT("\",\"user_id\":\""),
            PIECE_STR(user_esc), PIECE_LIT("\"}"),
        };
        const int np = (int)(sizeof(pieces) / sizeof(pieces[0]));

        for (int i = 0; i < np; i++)
            total += pieces[i].n;
        hlen = resp_head(hdr, '$', (long long)total);
        x->bulk_off = a->len;
        if (!(w = buf_extend(a, (size_t)hlen + total + 2)))
            goto fail;
        memcpy(w, hdr, (size_t)hlen);
        w += hlen;
        for (int i = 0; i < np; i++) {
            memcpy(w, pieces[i].s, pieces[i].n);
            w += pieces[i].n;
        }
        memcpy(w, "\r\n", 2);
        x->bulk_len = a->len - x->bulk_off;
    }
    if (publish) {
        static const char nomid[] = "0000000000000000000000000000000000000000000000000000000000000000";

        x->tid_off = pb->len;
        if (buf_append_all(pb, tid, strlen(tid) + 1) < 0)
            goto fail;
        x->eid_off = pb->len;
        if (buf_append_all(pb, ev->id, strlen(ev->id) + 1) < 0)
            goto fail;
        x->ch_off = pb->len;
        if (PUT_LIT(pb, "rt:topic:user:") < 0 || put_str(pb, user_esc) < 0)
            goto fail;
        x->ch_len = pb->len - x->ch_off;
        x->msg_off = pb->len;
        if (PUT_LIT(pb, "{\"topic\":\"user:") < 0 || put_str(pb, user_esc) < 0 ||
            PUT_LIT(pb, "\",\"payload\":{\"type\":\"trigger.fired\",\"trigger_id\":\"") < 0 ||
            put_str(pb, tid_esc) < 0 || PUT_LIT(pb, "\",\"event_id\":\"") < 0 || put_str(pb, ev->id_esc) < 0 ||
            PUT_LIT(pb, "\",\"event_type\":\"") < 0 || put_str(pb, ev->type_esc) < 0 ||
            PUT_LIT(pb, "\",\"agent_id\":") < 0 || put_str(pb, ev->agent) < 0 ||
            PUT_LIT(pb, "},\"from\":\"event-processor\",\"message_id\":\"") < 0 ||
            (x->mid_off = pb->len, buf_append_all(pb, nomid, 64) < 0) ||
            PUT_LIT(pb, "\",\"timestamp\":\"") < 0 || put_str(pb, now) < 0 || PUT_LIT(pb, "\"}") < 0)
            goto fail;
        x->msg_len = pb->len - x->msg_off;
    }
    if (j->ev.len == 0 && (put_str(&j->ev, "{") < 0 || put_str(&j->tr, "{") < 0 || put_str(&j->ac, "{") < 0))
        goto fail;
    if (pgarr_add(&j->ev, ev->id, 0) < 0 || pgarr_add(&j->tr, tid, 0) < 0 || j->ev.truncated || j->tr.truncated ||
        put_str(&j->ac, j->ac.len > 1 ? "," : "") < 0 || put_str(&j->ac, aid) < 0)
        goto fail;
    if (priority > 1)
        j->nhigh++;
    j->n++;
    return 0;
fail:
    a->len = arena_len;
    pb->len = pub_len;
    j->ev.len = ev_len;
    j->tr.len = tr_len;
    j->ac.len = ac_len;
    j->ev.truncated = j->tr.truncated = 0;
    return -1;
}

int jobs_add(jobs *j, const tindex_trigger *t, const tindex_action *a, const jobs_event *ev, const char *now,
             int publish)
{
    return add_common(j, t->id, t->id_esc, t->name_esc, t->user_esc, a->id, a->type, a->priority, a->config_json,
                      ev, now, publish);
}

int jobs_add_parts(jobs *j, const char *trigger_id, const char *trigger_name, const char *user_id, int action_id,
                   const char *action_type, int priority, const char *config_json, const jobs_event *ev,
                   const char *now, int publish)
{
    char *tid = jsonstr_dup(trigger_id), *name = jsonstr_dup(trigger_name);
    char *user = jsonstr_dup(user_id), *type = jsonstr_dup(action_type);
    int rc = -1;

    if (tid && name && user && type)
        rc = add_common(j, trigger_id, tid, name, user, action_id, type, priority, config_json, ev, now, publish);
    free(tid);
    free(name);
    free(user);
    free(type);
    return rc;
}

int jobs_outbox_arrays(jobs *j, const char **event_ids, const char **trigger_ids, const char **action_ids)
{
    if (j->n == 0)
        return -1;
    if (put_str(&j->ev, "}") < 0 || put_str(&j->tr, "}") < 0 || put_str(&j->ac, "}") < 0)
        return -1;
    *event_ids = j->ev.p;
    *trigger_ids = j->tr.p;
    *action_ids = j->ac.p;
    /* Leave the builders reusable: drop the closing braces again. */
    j->ev.len--;
    j->tr.len--;
    j->ac.len--;
    return 0;
}

/* Ordinary jobs first in batch order, then priority > 1 ascending (stable). */
static int job_cmp(const void *pa, const void *pb)
{
    const job *a = pa, *b = pb;
    int ua = a->priority > 1, ub = b->priority > 1;

    if (ua != ub)
        return ua - ub;
    if (ua && a->priority != b->priority)
        return a->priority < b->priority ? -1 : 1;
    return a->seq < b->seq ? -1 : (a->seq > b->seq);
}

/* Appends a piece to the push, merged with the previous one when they are
 * adjacent in the same buffer (consecutive job documents are). */
static int seg_add(jobs *j, int in_arena, size_t off, size_t len)
{
    seg *last = j->nseg ? &j->segs[j->nseg - 1] : NULL;

    if (len == 0)
        return 0;
    if (last && last->in_arena == in_arena && last->off + last->len == off) {
        last->len += len;
        return 0;
    }
    if (j->nseg == j->capseg) {
        int cap = j->capseg ? j->capseg * 2 : 64;
        seg *p = realloc(j->segs, (size_t)cap * sizeof(*p));

        if (!p)
            return -1;
        j->segs = p;
        j->capseg = cap;
    }
    /* NOLINTNEXTLINE(clang-analyzer-core.NullDereference): nseg < capseg, so segs is allocated. */
    j->segs[j->nseg++] = (seg){in_arena, off, len};
    return 0;
}

/* Adds what was appended to j->resp since *mark to the push. */
static int seg_resp(jobs *j, size_t *mark)
{
    int rc = seg_add(j, 0, *mark, j->resp.len - *mark);

    *mark = j->resp.len;
    return rc;
}

/* Appends LPUSH (ordinary) and RPUSH (priority) commands of every job in
 * chunks, then the PUBLISHes to channels with subscribers (all when
 * `numpat`: a pattern may match any of them), to the push (j->resp from
 * *mark on holds what precedes). Returns the number of commands or -1. */
static long build_pushes(jobs *j, const char *queue, long long numpat, size_t *mark)
{
    long ncmd = 0;

    for (int i = 0; i < j->n;) {
        int right = j->v[i].priority > 1, k = i;

        while (k < j->n && (j->v[k].priority > 1) == right && k - i < PUSH_CHUNK)
            k++;
        if (resp_array(&j->resp, 2 + (k - i)) < 0 || resp_bulk(&j->resp, right ? "RPUSH" : "LPUSH", 5) < 0 ||
            resp_bulk(&j->resp, queue, strlen(queue)) < 0 || seg_resp(j, mark) < 0)
            return -1;
        for (int m = i; m < k; m++)
            if (seg_add(j, 1, j->v[m].bulk_off, j->v[m].bulk_len) < 0)
                return -1;
        ncmd++;
        i = k;
    }
    for (int i = 0; i < j->n; i++) {
        job *x = &j->v[i];
        char mid[65];

        if (!x->ch_len || (!numpat && j->subs[x->chan] <= 0))
            continue;
        digest3(j, j->pub.p + x->tid_off, j->pub.p + x->eid_off, NULL, mid);
        memcpy(j->pub.p + x->mid_off, mid, 64);
        if (resp_array(&j->resp, 3) < 0 || resp_bulk(&j->resp, "PUBLISH", 7) < 0 ||
            resp_bulk(&j->resp, j->pub.p + x->ch_off, x->ch_len) < 0 ||
            resp_bulk(&j->resp, j->pub.p + x->msg_off, x->msg_len) < 0)
            return -1;
        ncmd++;
    }
    return seg_resp(j, mark) < 0 ? -1 : ncmd;
}

/* Writes the push's pieces to the connection's socket with writev, from
 * where they are (the documents are not copied into hiredis's output
 * buffer, which is flushed first). hiredis reads the replies afterwards:
 * in blocking mode it only reads what the socket holds. */
static int send_segs(jobs *j, redisContext *c, char *err, size_t errlen)
{
    struct iovec iov[IOV_MAX < 1024 ? IOV_MAX : 1024];
    int done = 0, k = 0;
    size_t skip = 0; /* bytes of segs[k] already written */

    while (!done)
        if (redisBufferWrite(c, &done) != REDIS_OK) {
            snprintf(err, errlen, "redis: %s", c->errstr[0] ? c->errstr : "write failed");
            return -1;
        }
    while (k < j->nseg) {
        int n = 0;
        ssize_t w;

        for (int i = k; i < j->nseg && n < (int)(sizeof(iov) / sizeof(iov[0])); i++, n++) {
            const seg *g = &j->segs[i];
            size_t off = i == k ? skip : 0;

            iov[n].iov_base = (g->in_arena ? j->arena.p : j->resp.p) + g->off + off;
            iov[n].iov_len = g->len - off;
        }
        w = writev(c->fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            snprintf(err, errlen, "redis: write: %s", errno == EAGAIN ? "timed out" : strerror(errno));
            return -1;
        }
        /* Advance past what was written. */
        while (w > 0 && k < j->nseg) {
            size_t left = j->segs[k].len - skip;

            if ((size_t)w >= left) {
                w -= (ssize_t)left;
                k++;
                skip = 0;
            } else {
                skip += (size_t)w;
                w = 0;
            }
        }
    }
    return 0;
}

static redisReply *get_reply(redisContext *c, char *err, size_t errlen)
{
    redisReply *rep = NULL;

    if (redisGetReply(c, (void **)&rep) != REDIS_OK || !rep) {
        snprintf(err, errlen, "redis: %s", c->errstr[0] ? c->errstr : "no reply");
        return NULL;
    }
    return rep;
}

/* Sends what j->resp holds. */
static int send_resp(jobs *j, redisContext *c, char *err, size_t errlen)
{
    if (redisAppendFormattedCommand(c, j->resp.p, j->resp.len) != REDIS_OK) {
        snprintf(err, errlen, "redis: %s", c->errstr[0] ? c->errstr : "out of memory");
        return -1;
    }
    j->resp.len = 0;
    return 0;
}

/* Numbers the distinct channels of the Broadcasts (job.chan) and lists
 * them (j->chans: a job holding each). Returns 0 or -1 (OOM). */
static int collect_channels(jobs *j)
{
    int want = 16;

    j->nchans = 0;
    while (want < 2 * j->n)
        want *= 2;
    if (want > j->capslots) {
        int *s = realloc(j->slots, (size_t)want * sizeof(*s));

        if (!s)
            return -1;
        j->slots = s;
        j->capslots = want;
    }
    memset(j->slots, -1, (size_t)want * sizeof(*j->slots));
    for (int i = 0; i < j->n; i++) {
        job *x = &j->v[i];
        const char *ch;
        uint32_t h;
        int *slot;

        if (!x->ch_len)
            continue;
        ch = j->pub.p + x->ch_off;
        h = hash_fnv1a(ch, x->ch_len) & (uint32_t)(want - 1);
        for (;; h = (h + 1) & (uint32_t)(want - 1)) {
            slot = &j->slots[h];
            if (*slot < 0)
                break;
            {
                const job *y = &j->v[j->chans[*slot]];

                if (y->ch_len == x->ch_len && !memcmp(j->pub.p + y->ch_off, ch, x->ch_len))
                    break;
            }
        }
        if (*slot < 0) {
            if (j->nchans == j->capchans) {
                int cap = j->capchans ? j->capchans * 2 : 16;
                int *c = realloc(j->chans, (size_t)cap * sizeof(*c));
                long long *s = c ? realloc(j->subs, (size_t)cap * sizeof(*s)) : NULL;

                if (c)
                    j->chans = c;
                if (!s)
                    return -1;
                j->subs = s;
                j->capchans = cap;
            }
            j->chans[j->nchans] = i;
            j->subs[j->nchans] = 0;
            *slot = j->nchans++;
        }
        x->chan = *slot;
    }
    return 0;
}

/* Appends PUBSUB NUMSUB of the distinct channels to j->resp. */
static int numsub_cmd(jobs *j)
{
    if (resp_array(&j->resp, 2 + j->nchans) < 0 || resp_bulk(&j->resp, "PUBSUB", 6) < 0 ||
        resp_bulk(&j->resp, "NUMSUB", 6) < 0)
        return -1;
    for (int i = 0; i < j->nchans; i++) {
        const job *x = &j->v[j->chans[i]];

        if (resp_bulk(&j->resp, j->pub.p + x->ch_off, x->ch_len) < 0)
            return -1;
    }
    return 0;
}

/* Reads the NUMSUB reply ([channel, count, ...] in request order). */
static void numsub_read(jobs *j, const redisReply *rep)
{
    if (rep->type != REDIS_REPLY_ARRAY)
        return;
    for (int i = 0; i < j->nchans && (size_t)(2 * i + 1) < rep->elements; i++) {
        const redisReply *n = rep->element[2 * i + 1];

        j->subs[i] = n->type == REDIS_REPLY_INTEGER ? n->integer : 1;
    }
}

/* One attempt. Returns pushed (>= 0), -1 (error, connection usable) or -2
 * (the connection is unusable). */
static int push_once(jobs *j, redisContext *c, const char *queue, const char *key, const char *ttl, char *err,
                     size_t errlen)
{
    const char *watch[] = {"WATCH", key}, *exists[] = {"EXISTS", key}, *multi[] = {"MULTI"};
    const char *set[] = {"SET", key, "1", "EX", ttl}, *exec[] = {"EXEC"}, *unwatch[] = {"UNWATCH"};
    const char *numpat_cmd[] = {"PUBSUB", "NUMPAT"};
    redisReply *rep;
    long ncmd;
    long long numpat = 0;
    size_t mark = 0;
    int done = 0, bad = 0, nq;

    /* Besides the batch key: who listens. A Broadcast nobody is
     * subscribed to is not sent (pub/sub delivers to the subscribers of
     * the moment of PUBLISH; one that subscribes between this question
     * and the EXEC is no different from one that subscribed a moment
     * after it). */
    j->resp.len = 0;
    if (collect_channels(j) < 0) {
        snprintf(err, errlen, "out of memory");
        return -2;
    }
    nq = j->nchans ? 4 : 2;
    if (resp_cmd(&j->resp, 2, watch) < 0 || resp_cmd(&j->resp, 2, exists) < 0 ||
        (j->nchans && (resp_cmd(&j->resp, 2, numpat_cmd) < 0 || numsub_cmd(j) < 0)) ||
        send_resp(j, c, err, errlen) < 0)
        return -2;
    for (int i = 0; i < nq; i++) {
        if (!(rep = get_reply(c, err, errlen)))
            return -2;
        if (rep->type == REDIS_REPLY_ERROR) {
            snprintf(err, errlen, "redis: %s", rep->str);
            freeReplyObject(rep);
            return -2;
        }
        if (i == 1)
            done = rep->type == REDIS_REPLY_INTEGER && rep->integer != 0;
        else if (i == 2)
            numpat = rep->type == REDIS_REPLY_INTEGER ? rep->integer : 1;
        else if (i == 3)
            numsub_read(j, rep);
        freeReplyObject(rep);
    }
    if (done) {
        /* Already pushed (a replay of a batch that reached Redis). */
        if (resp_cmd(&j->resp, 1, unwatch) < 0 || send_resp(j, c, err, errlen) < 0 ||
            !(rep = get_reply(c, err, errlen)))
            return -2;
        freeReplyObject(rep);
        return 0;
    }
    j->resp.len = 0;
    j->nseg = 0;
    if (resp_cmd(&j->resp, 1, multi) < 0 || (ncmd = build_pushes(j, queue, numpat, &mark)) < 0 ||
        resp_cmd(&j->resp, 5, set) < 0 || resp_cmd(&j->resp, 1, exec) < 0 || seg_resp(j, &mark) < 0) {
        snprintf(err, errlen, "out of memory");
        return -2;
    }
    /* A write that fails midway leaves half a transaction on the
     * connection: -2 drops the connection, which discards it. */
    if (send_segs(j, c, err, errlen) < 0)
        return -2;
    /* MULTI, each queued command and the SET answer +OK/+QUEUED (or an
     * error, which makes EXEC abort); then EXEC. */
    for (long i = 0; i < ncmd + 2; i++) {
        if (!(rep = get_reply(c, err, errlen)))
            return -2;
        if (rep->type == REDIS_REPLY_ERROR && !bad) {
            snprintf(err, errlen, "redis: %s", rep->str);
            bad = 1;
        }
        freeReplyObject(rep);
    }
    if (!(rep = get_reply(c, err, errlen)))
        return -2;
    if (rep->type == REDIS_REPLY_NIL) {
        /* WATCH fired: another pusher took this batch meanwhile. */
        freeReplyObject(rep);
        return 0;
    }
    if (rep->type != REDIS_REPLY_ARRAY || bad) {
        if (!bad)
            snprintf(err, errlen, "redis: %s", rep->type == REDIS_REPLY_ERROR ? rep->str : "EXEC failed");
        freeReplyObject(rep);
        return -1;
    }
    freeReplyObject(rep);
    return j->n;
}

int jobs_push(jobs *j, rconn *r, const char *queue, const char *batch_key, long ttl_s, char *err, size_t errlen)
{
    char ttl[24];
    redisContext *c;
    int rc;

    if (j->n == 0)
        return 0;
    if (j->nhigh)
        qsort(j->v, (size_t)j->n, sizeof(*j->v), job_cmp);
    snprintf(ttl, sizeof(ttl), "%ld", ttl_s);
    if (rconn_connect(r) < 0 || !(c = rconn_context(r))) {
        snprintf(err, errlen, "redis: %s", rconn_errstr(r));
        return -1;
    }
    rc = push_once(j, c, queue, batch_key, ttl, err, errlen);
    if (rc == -2) {
        /* Whatever state the connection is in (a WATCH, a half-read
         * transaction), a new one starts clean. */
        rconn_mark_broken(r);
        return -1;
    }
    return rc;
}
