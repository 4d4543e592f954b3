/* sse_store: the Redis side of SSE and HITL, as scripts so that every
 * step that must be atomic is (an id, its frame in the buffer, the
 * publication).
 *
 * Keys per client (all expire): sse:seq:{id} the id counter, sse:buf:{id}
 * the frames (a list, newest last, at most SSE_BUFFER_EVENTS), sse:lost:{id}
 * the highest id no longer in the buffer, sse:last:{id} the highest event id
 * stored, sse:est:{id} what each connection.established id stands for,
 * sse:online:{id} set while a stream is held, sse:idem:{id}:{key} the id
 * stored under a publisher's idempotency key. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fmt.h"
#include "log.h"
#include "sse.h"

/* KEYS: seq, buf, lost, last and, for a publish with an idempotency key,
 * sse:idem:{client id}:{key}. ARGV: client id, event type, data JSON,
 * timestamp, buffer size, buffer TTL, counter TTL. Returns {id, 1} when the
 * key was seen within the buffer's TTL (nothing stored: the first id), else
 * {id, 0}. The check and the store are one script, so two concurrent
 * retries of one key cannot both store. A list created anew (the old one
 * expired) means every event before it is lost for a reconnecting client. */
static const char publish_lua[] =
    "if KEYS[5] then\n"
    "  local first = redis.call('GET', KEYS[5])\n"
    "  if first then return {tonumber(first), 1} end\n"
    "end\n"
    "local id = redis.call('INCR', KEYS[1])\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[7])\n"
    "local env = '{\"id\":\"' .. id .. '\",\"event_type\":\"' .. ARGV[2] .. '\",\"timestamp\":\"' .. ARGV[4] ..\n"
    "  '\",\"data\":' .. ARGV[3] .. '}'\n"
    "local frame = 'id: ' .. id .. '\\nevent: ' .. ARGV[2] .. '\\ndata: ' .. env .. '\\n\\n'\n"
    "local prev = redis.call('GET', KEYS[4])\n"
    "local n = redis.call('RPUSH', KEYS[2], frame)\n"
    "local max = tonumber(ARGV[5])\n"
    "if n == 1 and prev then redis.call('SET', KEYS[3], prev, 'EX', ARGV[7]) end\n"
    "if n > max then\n"
    "  local gone = redis.call('LPOP', KEYS[2], n - max)\n"
    "  redis.call('SET', KEYS[3], string.match(gone[#gone], '^id: (%d+)'), 'EX', ARGV[7])\n"
    "end\n"
    "redis.call('SET', KEYS[4], id, 'EX', ARGV[7])\n"
    "redis.call('EXPIRE', KEYS[2], ARGV[6])\n"
    "if KEYS[5] then redis.call('SET', KEYS[5], id, 'EX', ARGV[6]) end\n"
    "redis.call('PUBLISH', '" SSE_DELIVER_CHANNEL "', ARGV[1] .. '\\n' .. frame)\n"
    "return {id, 0}\n";

/* KEYS: seq, buf, lost, last, online, est. ARGV: the Last-Event-ID ('' for
 * none), counter TTL, online TTL. The id given to connection.established
 * is recorded with the position it stands for, so a client that reconnects
 * with it (it was the last id it saw) is still owed the replay that came
 * after it. */
static const char connect_lua[] =
    "local eff = ARGV[1]\n"
    "if eff ~= '' then local m = redis.call('HGET', KEYS[6], eff) if m then eff = m end end\n"
    "local id = redis.call('INCR', KEYS[1])\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[2])\n"
    "if redis.call('HLEN', KEYS[6]) > 256 then redis.call('DEL', KEYS[6]) end\n"
    "redis.call('HSET', KEYS[6], id, eff)\n"
    "redis.call('EXPIRE', KEYS[6], ARGV[2])\n"
    "redis.call('SET', KEYS[5], '1', 'EX', ARGV[3])\n"
    "return {id, eff, redis.call('GET', KEYS[3]) or '0', redis.call('GET', KEYS[4]) or '0',\n"
    "        redis.call('LRANGE', KEYS[2], 0, -1)}\n";

/* KEYS: the answer, online, buf. ARGV: client id, question id, answer JSON,
 * received_at, TTL, '1' when this instance holds the client. */
static const char answer_lua[] =
    "if ARGV[6] ~= '1' and redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[3]) == 0 then\n"
    "  return 'unknown' end\n"
    "local prev = redis.call('GET', KEYS[1])\n"
    "if prev then if prev == ARGV[3] then return 'retry' end return 'conflict' end\n"
    "redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])\n"
    "redis.call('XADD', 'hitl:responses', '*', 'client_id', ARGV[1], 'question_id', ARGV[2], 'answer', ARGV[3],\n"
    "  'received_at', ARGV[4])\n"
    "return 'ok'\n";

static long store_counter_ttl(const sse_config *c)
{
    /* Ids must keep increasing for a client that stays connected with
     * nothing to say for a long time: the counter outlives the buffer. */
    return c->buffer_ttl_s > 86400 ? c->buffer_ttl_s : 86400;
}

static pthread_key_t store_key;
static pthread_once_t store_once = PTHREAD_ONCE_INIT;

static void store_free_conn(void *p)
{
    rconn_free(p);
}

static void store_make_key(void)
{
    pthread_key_create(&store_key, store_free_conn);
}

rconn *sse_store_conn(sse *s)
{
    rconn *r;

    pthread_once(&store_once, store_make_key);
    r = pthread_getspecific(store_key);
    if (!r) {
        r = rconn_new(&sse_cfg(s)->redis, 2000);
        if (r)
            pthread_setspecific(store_key, r);
    }
    return r;
}

int sse_client_id_ok(const char *id)
{
    size_t n = 0;

    for (const char *p = id; *p; p++, n++) {
        char c = *p;

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
              c == '.'))
            return 0;
    }
    return n >= 1 && n <= SSE_CLIENT_ID_MAX;
}

int sse_idem_key_ok(const char *key)
{
    size_t n = 0;

    for (const char *p = key; *p; p++, n++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e)
            return 0;
    return n >= 1 && n <= SSE_IDEM_KEY_MAX;
}

int sse_store_publish(sse *s, rconn *r, const char *client_id, const char *event_type, const char *data_json,
                      const char *idem_key, long long *id, int *replayed)
{
    const sse_config *c = sse_cfg(s);
    char k_seq[160], k_buf[160], k_lost[160], k_last[160], k_idem[SSE_CLIENT_ID_MAX + SSE_IDEM_KEY_MAX + 16];
    char ts[40], max[24], ttl[24], cttl[24];
    const char *ka[12] = {k_seq, k_buf, k_lost, k_last, k_idem, client_id, event_type, data_json, ts, max, ttl, cttl};
    int nkeys = idem_key ? 5 : 4;
    redisReply *rep;
    int rc = -1;

    snprintf(k_seq, sizeof(k_seq), "sse:seq:%s", client_id);
    snprintf(k_buf, sizeof(k_buf), "sse:buf:%s", client_id);
    snprintf(k_lost, sizeof(k_lost), "sse:lost:%s", client_id);
    snprintf(k_last, sizeof(k_last), "sse:last:%s", client_id);
    if (idem_key)
        snprintf(k_idem, sizeof(k_idem), "sse:idem:%s:%s", client_id, idem_key);
    else
        memmove(ka + 4, ka + 5, 7 * sizeof(ka[0])); /* no fifth key */
    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    snprintf(max, sizeof(max), "%d", c->buffer_events);
    snprintf(ttl, sizeof(ttl), "%ld", c->buffer_ttl_s);
    snprintf(cttl, sizeof(cttl), "%ld", store_counter_ttl(c));
    /* With a key the script is idempotent, so rconn may send it again after
     * a broken connection; without one a retry could store it twice. */
    rep = rconn_eval(r, idem_key != NULL, publish_lua, nkeys, 7, ka, NULL);
    if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->type == REDIS_REPLY_INTEGER &&
        rep->element[1]->type == REDIS_REPLY_INTEGER) {
        *id = rep->element[0]->integer;
        *replayed = rep->element[1]->integer != 0;
        rc = 0;
    } else if (rep && rep->type == REDIS_REPLY_ERROR) {
        log_warn("sse: publish script failed: %s", rep->str);
    }
    freeReplyObject(rep);
    return rc;
}

int sse_store_connect_append(sse *s, redisContext *ctx, const char *client_id, const char *last_event_id,
                             long online_ttl_s)
{
    const sse_config *c = sse_cfg(s);
    char k[6][160], cttl[24], ottl[24];
    static const char *const names[6] = {"seq", "buf", "lost", "last", "online", "est"};
    const char *argv[12] = {"EVAL", connect_lua, "6", k[0], k[1], k[2], k[3], k[4], k[5],
                            last_event_id ? last_event_id : "", cttl, ottl};

    for (int i = 0; i < 6; i++)
        snprintf(k[i], sizeof(k[i]), "sse:%s:%s", names[i], client_id);
    snprintf(cttl, sizeof(cttl), "%ld", store_counter_ttl(c));
    snprintf(ottl, sizeof(ottl), "%ld", online_ttl_s);
    return redisAppendCommandArgv(ctx, 12, argv, NULL) == REDIS_OK ? 0 : -1;
}

redisReply *sse_store_connect_check(void *r)
{
    redisReply *rep = r;

    if (!rep || rep->type != REDIS_REPLY_ARRAY || rep->elements != 5 || rep->element[0]->type != REDIS_REPLY_INTEGER ||
        rep->element[4]->type != REDIS_REPLY_ARRAY) {
        if (rep && rep->type == REDIS_REPLY_ERROR)
            log_warn("sse: connect script failed: %s", rep->str);
        freeReplyObject(rep);
        return NULL;
    }
    return rep;
}

int sse_store_answer(sse *s, rconn *r, const char *client_id, const char *question_id, const char *answer_json,
                     int held_here)
{
    const sse_config *c = sse_cfg(s);
    char k_online[160], k_buf[160], ts[40], ttl[24];
    const char *ka[9];
    char *k_answer;
    size_t klen = strlen(client_id) + strlen(question_id) + 16;
    redisReply *rep;
    int rc = SSE_ANSWER_FAILED;

    k_answer = malloc(klen);
    if (!k_answer)
        return rc;
    snprintf(k_answer, klen, "hitl:answer:%s:%s", client_id, question_id);
    snprintf(k_online, sizeof(k_online), "sse:online:%s", client_id);
    snprintf(k_buf, sizeof(k_buf), "sse:buf:%s", client_id);
    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    snprintf(ttl, sizeof(ttl), "%ld", c->answer_ttl_s);
    ka[0] = k_answer;
    ka[1] = k_online;
    ka[2] = k_buf;
    ka[3] = client_id;
    ka[4] = question_id;
    ka[5] = answer_json;
    ka[6] = ts;
    ka[7] = ttl;
    ka[8] = held_here ? "1" : "0";
    /* Idempotent by construction: the script stores an answer once. */
    rep = rconn_eval(r, 1, answer_lua, 3, 6, ka, NULL);
    if (rep && (rep->type == REDIS_REPLY_STATUS || rep->type == REDIS_REPLY_STRING)) {
        rc = !strcmp(rep->str, "ok")        ? SSE_ANSWER_STORED
             : !strcmp(rep->str, "retry")   ? SSE_ANSWER_RETRY
             : !strcmp(rep->str, "conflict") ? SSE_ANSWER_CONFLICT
                                             : SSE_ANSWER_UNKNOWN_CLIENT;
    } else if (rep && rep->type == REDIS_REPLY_ERROR) {
        log_warn("sse: answer script failed: %s", rep->str);
    }
    freeReplyObject(rep);
    free(k_answer);
    return rc;
}
