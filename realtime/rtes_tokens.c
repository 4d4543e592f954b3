#include "rtes_tokens.h"

#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "fmt.h"

/* Prunes, adds, and makes the key live as long as its longest token. */
static const char add_script[] =
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3]) "
    "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) "
    "local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES') "
    "redis.call('EXPIREAT', KEYS[1], top[2]) "
    "return 1";

/* Prunes and returns the live members. */
static const char live_script[] =
    "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) "
    "return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')";

static int key_of(char *out, size_t len, const char *prefix, const char *id)
{
    return snprintf(out, len, "%s%s", prefix, id) < (int)len ? 0 : -1;
}

static int add_one(rconn *r, const char *key, const rtes_msg *m, long long now, char *err, size_t errlen)
{
    char exp[FMT_I64_MAX], nows[FMT_I64_MAX];
    const char *ka[4] = {key, exp, m->member, nows};
    redisReply *rep;
    int rc = -1;

    fmt_i64(exp, m->exp);
    fmt_i64(nows, now);
    rep = rconn_eval(r, 1, add_script, 1, 3, ka, NULL);
    if (!rep)
        snprintf(err, errlen, "redis: %s", rconn_errstr(r));
    else if (rep->type == REDIS_REPLY_ERROR)
        snprintf(err, errlen, "redis: %s", rep->str);
    else
        rc = 0;
    if (rep)
        freeReplyObject(rep);
    return rc;
}

int rtes_tokens_add(rconn *r, const rtes_msg *m, long long now, char *err, size_t errlen)
{
    char key[RTES_ID_MAX + 32];

    if (m->exp <= now)
        return 0;
    if (key_of(key, sizeof(key), "user_id_", m->user_id) < 0 || add_one(r, key, m, now, err, errlen) < 0)
        return -1;
    if (m->execution_id[0])
        key_of(key, sizeof(key), "execution_id_", m->execution_id);
    else
        key_of(key, sizeof(key), "workflow_id_", m->workflow_id);
    return add_one(r, key, m, now, err, errlen);
}

/* Calls match on each live member of key; returns 1 at the first match, 0
 * when none, -1 on error. */
static int any_live(rconn *r, const char *key, long long now, const char *eid, const char *wid,
                    int (*match)(const cJSON *t, const char *eid, const char *wid), char *err, size_t errlen)
{
    char nows[FMT_I64_MAX];
    const char *ka[2] = {key, nows};
    redisReply *rep;
    int rc = 0;

    fmt_i64(nows, now);
    rep = rconn_eval(r, 1, live_script, 1, 1, ka, NULL);
    if (!rep || rep->type != REDIS_REPLY_ARRAY) {
        snprintf(err, errlen, "redis: %s", !rep ? rconn_errstr(r) : rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
        if (rep)
            freeReplyObject(rep);
        return -1;
    }
    for (size_t i = 0; i < rep->elements && !rc; i++) {
        const redisReply *e = rep->element[i];
        cJSON *t;

        if (e->type != REDIS_REPLY_STRING)
            continue;
        t = cJSON_ParseWithLength(e->str, e->len);
        if (cJSON_IsObject(t) && match(t, eid, wid))
            rc = 1;
        cJSON_Delete(t);
    }
    freeReplyObject(rep);
    return rc;
}

static int str_is(const cJSON *t, const char *name, const char *want)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(t, name);

    return cJSON_IsString(v) && strcmp(v->valuestring, want) == 0;
}

/* The original's rule: same workflow, and the token's execution is the
 * target's or absent (workflow-wide). An empty wid (the caller did not say)
 * accepts only tokens naming the execution. */
static int grants(const cJSON *t, const char *eid, const char *wid)
{
    const cJSON *te = cJSON_GetObjectItemCaseSensitive(t, "execution_id");

    if (cJSON_IsString(te))
        return strcmp(te->valuestring, eid) == 0 && (!wid[0] || str_is(t, "workflow_id", wid));
    return wid[0] && str_is(t, "workflow_id", wid);
}

static int any_member(const cJSON *t, const char *eid, const char *wid)
{
    (void)t;
    (void)eid;
    (void)wid;
    return 1;
}

int rtes_tokens_user_grants(rconn *r, const char *uid, const char *eid, const char *wid, long long now,
                            char *err, size_t errlen)
{
    char key[RTES_ID_MAX + 32];

    if (key_of(key, sizeof(key), "user_id_", uid) < 0)
        return 0;
    return any_live(r, key, now, eid, wid, grants, err, errlen);
}

int rtes_tokens_execution_live(rconn *r, const char *eid, const char *wid, long long now, char *err,
                               size_t errlen)
{
    char key[RTES_ID_MAX + 32];
    int rc;

    if (key_of(key, sizeof(key), "execution_id_", eid) < 0)
        return 0;
    rc = any_live(r, key, now, eid, wid, grants, err, errlen);
    if (rc != 0 || !wid[0])
        return rc;
    if (key_of(key, sizeof(key), "workflow_id_", wid) < 0)
        return 0;
    return any_live(r, key, now, eid, wid, any_member, err, errlen);
}
