#include "jobs.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "migrate.h"

/* Jobs per script call: bounds the argument vector Redis parses at once. */
#define CHUNK 512
/* The largest job document accepted (an event carries at most a few text
 * columns of 64 KiB). */
#define MAX_JOB_BYTES (8u << 20)

typedef struct {
    char *s;
    size_t len, cap;
} sbuf;

typedef struct {
    char id[65];
    int priority;
    size_t seq;
    char *json;
    size_t json_len;
    char *channel; /* NULL: no Broadcast */
    char *msg;
    size_t msg_len;
} job;

struct jobs {
    job *v;
    int n, cap;
    sbuf ev, tr, ac; /* outbox array literals */
};

static int sb_grow(sbuf *b, size_t add)
{
    size_t cap;
    char *p;

    if (b->len + add + 1 <= b->cap)
        return 0;
    if (b->len + add + 1 > (64u << 20) * 4u)
        return -1;
    cap = b->cap ? b->cap : 256;
    while (cap < b->len + add + 1)
        cap *= 2;
    if (!(p = realloc(b->s, cap)))
        return -1;
    b->s = p;
    b->cap = cap;
    return 0;
}

static int sb_put(sbuf *b, const char *s, size_t n)
{
    if (sb_grow(b, n) < 0)
        return -1;
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
    return 0;
}

static int sb_str(sbuf *b, const char *s)
{
    return sb_put(b, s, strlen(s));
}

/* Appends `s` as an element of a PostgreSQL array literal (quoted). */
static int sb_arr_elem(sbuf *b, const char *s)
{
    if (sb_str(b, b->len > 1 ? ",\"" : "\"") < 0)
        return -1;
    for (; *s; s++) {
        if ((*s == '"' || *s == '\\') && sb_put(b, "\\", 1) < 0)
            return -1;
        if (sb_put(b, s, 1) < 0)
            return -1;
    }
    return sb_put(b, "\"", 1);
}

jobs *jobs_new(void)
{
    return calloc(1, sizeof(jobs));
}

void jobs_clear(jobs *j)
{
    for (int i = 0; i < j->n; i++) {
        free(j->v[i].json);
        free(j->v[i].channel);
        free(j->v[i].msg);
    }
    j->n = 0;
    j->ev.len = j->tr.len = j->ac.len = 0;
}

void jobs_free(jobs *j)
{
    if (!j)
        return;
    jobs_clear(j);
    free(j->v);
    free(j->ev.s);
    free(j->tr.s);
    free(j->ac.s);
    free(j);
}

int jobs_count(const jobs *j)
{
    return j->n;
}

void jobs_now_rfc3339(char out[32])
{
    struct timespec ts;
    struct tm tm;

    char date[24];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, 32, "%.19s.%06dZ", date, (int)((ts.tv_nsec / 1000) % 1000000));
}

/* Builds a string of the pieces given (NULL-terminated list). */
static char *concat(size_t *len, ...)
{
    va_list ap;
    sbuf b = {0};
    const char *s;

    va_start(ap, len);
    while ((s = va_arg(ap, const char *))) {
        if (sb_str(&b, s) < 0) {
            va_end(ap);
            free(b.s);
            return NULL;
        }
    }
    va_end(ap);
    if (b.len > MAX_JOB_BYTES) {
        free(b.s);
        return NULL;
    }
    *len = b.len;
    return b.s;
}

static int add_common(jobs *j, const char *tid, const char *tid_esc, const char *name_esc, const char *user_esc,
                      int action_id, const char *action_type, int priority, const char *config_json,
                      const jobs_event *ev, const char *now, int publish)
{
    char key[1024], prio[16], aid[16];
    job *x;

    if (j->n == j->cap) {
        int cap = j->cap ? j->cap * 2 : 64;
        job *p = realloc(j->v, (size_t)cap * sizeof(*p));

        if (!p)
            return -1;
        j->v = p;
        j->cap = cap;
    }
    x = &j->v[j->n];
    memset(x, 0, sizeof(*x));
    snprintf(aid, sizeof(aid), "%d", action_id);
    snprintf(prio, sizeof(prio), "%d", priority);
    {
        /* The id hashes the raw ids, so it never depends on escaping. */
        sbuf k = {0};

        if (sb_str(&k, tid) < 0 || sb_put(&k, "|", 1) < 0 || sb_str(&k, ev->id) < 0 || sb_put(&k, "|", 1) < 0 ||
            sb_str(&k, aid) < 0) {
            free(k.s);
            return -1;
        }
        migrate_sha256_hex(k.s, k.len, x->id);
        free(k.s);
    }
    x->priority = priority;
    x->seq = (size_t)j->n;
    x->json = concat(&x->json_len, "{\"id\":\"", x->id, "\",\"trigger_id\":\"", tid_esc, "\",\"event_id\":\"",
                     ev->id_esc, "\",\"action_type\":\"", action_type, "\",\"action_id\":", aid,
                     ",\"priority\":", prio, ",\"config\":", config_json, ",\"event\":", ev->json,
                     ",\"created_at\":\"", now, "\",\"attempt\":0,\"trigger_name\":\"", name_esc,
                     "\",\"user_id\":\"", user_esc, "\"}", (const char *)NULL);
    if (!x->json)
        return -1;
    if (publish) {
        char mid[65];
        sbuf k = {0};

        if (sb_str(&k, tid) < 0 || sb_put(&k, "|", 1) < 0 || sb_str(&k, ev->id) < 0) {
            free(k.s);
            free(x->json);
            return -1;
        }
        migrate_sha256_hex(k.s, k.len, mid);
        free(k.s);
        snprintf(key, sizeof(key), "rt:topic:user:%s", user_esc);
        x->channel = strdup(key);
        x->msg = concat(&x->msg_len, "{\"topic\":\"user:", user_esc,
                        "\",\"payload\":{\"type\":\"trigger.fired\",\"trigger_id\":\"", tid_esc,
                        "\",\"event_id\":\"", ev->id_esc, "\",\"event_type\":\"", ev->type_esc,
                        "\",\"agent_id\":", ev->agent, "},\"from\":\"event-processor\",\"message_id\":\"", mid,
                        "\",\"timestamp\":\"", now, "\"}", (const char *)NULL);
        if (!x->channel || !x->msg) {
            free(x->json);
            free(x->channel);
            free(x->msg);
            return -1;
        }
    }
    if (j->ev.len == 0 && (sb_str(&j->ev, "{") < 0 || sb_str(&j->tr, "{") < 0 || sb_str(&j->ac, "{") < 0))
        goto fail;
    if (sb_arr_elem(&j->ev, ev->id) < 0 || sb_arr_elem(&j->tr, tid) < 0 ||
        sb_str(&j->ac, j->ac.len > 1 ? "," : "") < 0 || sb_str(&j->ac, aid) < 0)
        goto fail;
    j->n++;
    return 0;
fail:
    free(x->json);
    free(x->channel);
    free(x->msg);
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
    char *tid = tindex_json_escape(trigger_id), *name = tindex_json_escape(trigger_name);
    char *user = tindex_json_escape(user_id), *type = tindex_json_escape(action_type);
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
    if (sb_str(&j->ev, "}") < 0 || sb_str(&j->tr, "}") < 0 || sb_str(&j->ac, "}") < 0)
        return -1;
    *event_ids = j->ev.s;
    *trigger_ids = j->tr.s;
    *action_ids = j->ac.s;
    /* Leave the builders reusable: drop the closing braces again. */
    j->ev.len--;
    j->tr.len--;
    j->ac.len--;
    return 0;
}

/* KEYS[1]: the list. ARGV[1]: ttl; then 5 per job: id, L|R, job, channel
 * ("" for none), message. */
static const char push_lua[] =
    "local n = 0\n"
    "for i = 2, #ARGV, 5 do\n"
    "  if redis.call('SET', 'job:seen:' .. ARGV[i], '1', 'NX', 'EX', ARGV[1]) then\n"
    "    if ARGV[i + 1] == 'R' then redis.call('RPUSH', KEYS[1], ARGV[i + 2])\n"
    "    else redis.call('LPUSH', KEYS[1], ARGV[i + 2]) end\n"
    "    if ARGV[i + 3] ~= '' then redis.call('PUBLISH', ARGV[i + 3], ARGV[i + 4]) end\n"
    "    n = n + 1\n"
    "  end\n"
    "end\n"
    "return n\n";

static char push_sha[41];

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

static int send_chunks(jobs *j, redisContext *c, const char *queue, const char *ttl, int *noscript, int *pushed,
                       char *err, size_t errlen)
{
    int nchunks = (j->n + CHUNK - 1) / CHUNK, rc = 0;
    const char **argv = malloc((size_t)(4 + 5 * CHUNK) * sizeof(*argv));
    size_t *lens = malloc((size_t)(4 + 5 * CHUNK) * sizeof(*lens));

    if (!argv || !lens) {
        free(argv);
        free(lens);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (int k = 0; k < nchunks; k++) {
        int first = k * CHUNK, last = first + CHUNK < j->n ? first + CHUNK : j->n, argc = 0;

        argv[argc] = "EVALSHA";
        lens[argc++] = 7;
        argv[argc] = push_sha;
        lens[argc++] = 40;
        argv[argc] = "1";
        lens[argc++] = 1;
        argv[argc] = queue;
        lens[argc++] = strlen(queue);
        argv[argc] = ttl;
        lens[argc++] = strlen(ttl);
        for (int i = first; i < last; i++) {
            job *x = &j->v[i];

            argv[argc] = x->id;
            lens[argc++] = 64;
            argv[argc] = x->priority > 1 ? "R" : "L";
            lens[argc++] = 1;
            argv[argc] = x->json;
            lens[argc++] = x->json_len;
            argv[argc] = x->channel ? x->channel : "";
            lens[argc++] = x->channel ? strlen(x->channel) : 0;
            argv[argc] = x->msg ? x->msg : "";
            lens[argc++] = x->msg ? x->msg_len : 0;
        }
        if (redisAppendCommandArgv(c, argc, argv, lens) != REDIS_OK) {
            snprintf(err, errlen, "redis: %s", c->errstr);
            rc = -1;
            goto out;
        }
    }
    for (int k = 0; k < nchunks; k++) {
        redisReply *rep = NULL;

        if (redisGetReply(c, (void **)&rep) != REDIS_OK || !rep) {
            snprintf(err, errlen, "redis: %s", c->errstr[0] ? c->errstr : "no reply");
            rc = -2; /* the connection is unusable */
            goto out;
        }
        if (rep->type == REDIS_REPLY_ERROR) {
            if (!strncmp(rep->str, "NOSCRIPT", 8))
                *noscript = 1;
            else if (!rc) {
                snprintf(err, errlen, "redis: %s", rep->str);
                rc = -1;
            }
        } else if (rep->type == REDIS_REPLY_INTEGER) {
            *pushed += (int)rep->integer;
        }
        freeReplyObject(rep);
    }
out:
    free(argv);
    free(lens);
    return rc;
}

int jobs_push(jobs *j, rconn *r, const char *queue, long ttl_s, char *err, size_t errlen)
{
    char ttl[24];
    redisContext *c;
    int pushed = 0;

    if (j->n == 0)
        return 0;
    qsort(j->v, (size_t)j->n, sizeof(*j->v), job_cmp);
    snprintf(ttl, sizeof(ttl), "%ld", ttl_s);
    for (int attempt = 0; attempt < 2; attempt++) {
        int noscript = 0, rc;

        if (rconn_connect(r) < 0 || !(c = rconn_context(r))) {
            snprintf(err, errlen, "redis: %s", rconn_errstr(r));
            return -1;
        }
        if (!push_sha[0] || attempt > 0) {
            redisReply *rep = rconn_command(r, 1, "SCRIPT LOAD %s", push_lua);

            if (!rep || rep->type != REDIS_REPLY_STRING || rep->len != 40) {
                snprintf(err, errlen, "redis: cannot load the push script: %s",
                         rep && rep->type == REDIS_REPLY_ERROR ? rep->str : rconn_errstr(r));
                if (rep)
                    freeReplyObject(rep);
                return -1;
            }
            memcpy(push_sha, rep->str, 40);
            push_sha[40] = '\0';
            freeReplyObject(rep);
            if (!(c = rconn_context(r))) {
                snprintf(err, errlen, "redis: %s", rconn_errstr(r));
                return -1;
            }
        }
        pushed = 0;
        rc = send_chunks(j, c, queue, ttl, &noscript, &pushed, err, errlen);
        if (rc == -2 || (rc < 0 && c->err)) {
            rconn_mark_broken(r);
            return -1;
        }
        if (rc < 0)
            return -1;
        /* A server restarted without the script: load it and send again;
         * the chunks that ran are skipped by their job:seen keys. */
        if (!noscript)
            return pushed;
    }
    snprintf(err, errlen, "redis: the push script keeps disappearing");
    return -1;
}
