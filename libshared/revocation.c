#include "revocation.h"

#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ktab.h"
#include "metrics.h"
#include "pglisten.h"
#include "svc.h"

#define RV_CAP 65536 /* users whose state is cached */
#define RV_ACQUIRE_MS 2000
/* With a read timeout (a caller on an event loop), a read that failed
 * makes the next ones fail at once for this long: a database that hangs
 * then costs the loop one timeout a second, not one per handshake. */
#define RV_QUIET_MS 1000

typedef struct {
    long long valid_after; /* unix seconds; LLONG_MIN when never set */
    long long fetched_ms;
    int base; /* REVOCATION_OK, _INACTIVE or _UNKNOWN */
} rv_state;

struct revocation {
    long ttl_ms;
    int read_timeout_ms; /* 0: wait for the database as long as it takes */
    /* Bumped by every notification and reconnection: an answer read from
     * the database is cached only if nothing was invalidated while it was
     * being read, so a stale answer never outlives its notification. */
    atomic_ullong gen;
    atomic_llong quiet_until_ms; /* reads fail at once until then (RV_QUIET_MS) */
    pglisten *listener;
    ktab *cache;
    metrics_counter *reads, *hits;
};

void revocation_forget(revocation *rv, const char *user_id)
{
    atomic_fetch_add(&rv->gen, 1);
    ktab_remove(rv->cache, user_id);
}

static void rv_notified(void *ud, const char *channel, const char *payload)
{
    revocation *rv = ud;

    (void)channel;
    if (!payload) { /* (re)connected: whatever was cached may be stale */
        atomic_fetch_add(&rv->gen, 1);
        ktab_clear(rv->cache);
        return;
    }
    revocation_forget(rv, payload);
}

revocation *revocation_new(const char *conninfo, long ttl_ms, const char *app_name, const char *metric_prefix)
{
    static const char *const channels[] = {"user_tokens", NULL};
    revocation *rv = calloc(1, sizeof(*rv));
    char name[128];

    if (!rv)
        return NULL;
    rv->ttl_ms = ttl_ms > 0 ? ttl_ms : 60000;
    atomic_init(&rv->gen, 0);
    atomic_init(&rv->quiet_until_ms, 0);
    snprintf(name, sizeof(name), "%s_token_state_reads_total", metric_prefix);
    rv->reads = metrics_counter_get(metrics_default(), name,
                                    "Users' token state read from the database (cache misses).", NULL);
    snprintf(name, sizeof(name), "%s_token_state_hits_total", metric_prefix);
    rv->hits = metrics_counter_get(metrics_default(), name,
                                   "Token checks answered from the cache of users' token state.", NULL);
    rv->cache = ktab_new(sizeof(rv_state), RV_CAP);
    snprintf(name, sizeof(name), "%s-tokens", app_name);
    if (rv->cache)
        rv->listener = pglisten_new(conninfo, name, channels, rv_notified, rv);
    if (!rv->listener) {
        revocation_free(rv);
        return NULL;
    }
    return rv;
}

void revocation_free(revocation *rv)
{
    if (!rv)
        return;
    pglisten_free(rv->listener);
    ktab_free(rv->cache);
    free(rv);
}

void revocation_set_read_timeout(revocation *rv, int ms)
{
    rv->read_timeout_ms = ms > 0 ? ms : 0;
}

int revocation_listening(const revocation *rv)
{
    return rv && pglisten_up(rv->listener);
}

static int rv_verdict(int base, long long valid_after, long long iat)
{
    if (base != REVOCATION_OK)
        return base;
    return iat <= valid_after ? REVOCATION_REVOKED : REVOCATION_OK;
}

typedef struct {
    revocation *rv;
    long long now;
    unsigned long long gen;
    rv_state st;
    int found;
} rv_op;

/* Copies a fresh record out; drops a stale one. */
static int rv_lookup_fn(void *value, int created, void *arg)
{
    rv_op *op = arg;
    rv_state *st = value;

    (void)created;
    if (op->now - st->fetched_ms >= op->rv->ttl_ms)
        return KTAB_REMOVE;
    op->st = *st;
    op->found = 1;
    return KTAB_KEEP;
}

/* Writes a state read from the database, unless something was invalidated
 * meanwhile. Runs under the shard lock that revocation_forget's removal also
 * takes, so a notification cannot slip between the check and the write. */
static int rv_store_fn(void *value, int created, void *arg)
{
    rv_op *op = arg;

    (void)created;
    if (atomic_load(&op->rv->gen) != op->gen || !pglisten_up(op->rv->listener))
        return KTAB_REMOVE;
    *(rv_state *)value = op->st;
    return KTAB_KEEP;
}

/* Reads the user's state from the database. Returns 0 or -1. */
static int rv_fetch(const revocation *rv, dbpool *db, const char *user_id, int *base, long long *valid_after,
                    char *err, size_t errlen)
{
    static const char sql[] = "SELECT is_active IS NOT FALSE, "
                              "coalesce(floor(extract(epoch FROM tokens_valid_after))::bigint::text, '') "
                              "FROM users WHERE id = $1";
    const char *params[1] = {user_id};
    int to = rv->read_timeout_ms;
    PGconn *conn = dbpool_acquire(db, to > 0 && to < RV_ACQUIRE_MS ? to : RV_ACQUIRE_MS);
    PGresult *res;

    if (!conn) {
        dbpool_errstr(db, err, errlen);
        return -1;
    }
    res = to > 0 ? dbpool_exec_within(conn, sql, 1, params, to, err, errlen)
                 : dbpool_exec(conn, sql, 1, params, err, errlen);
    dbpool_release(db, conn);
    if (!res)
        return -1;
    *valid_after = LLONG_MIN;
    if (PQntuples(res) != 1) {
        *base = REVOCATION_UNKNOWN;
    } else {
        const char *va = PQgetvalue(res, 0, 1);

        *base = PQgetvalue(res, 0, 0)[0] == 't' ? REVOCATION_OK : REVOCATION_INACTIVE;
        if (va[0])
            *valid_after = strtoll(va, NULL, 10);
    }
    PQclear(res);
    return 0;
}

int revocation_check(revocation *rv, dbpool *db, const char *user_id, long long iat, char *err, size_t errlen)
{
    rv_op op = {rv, svc_now_ms(), 0, {LLONG_MIN, 0, REVOCATION_OK}, 0};

    /* While the listener is down a change made elsewhere would go unheard,
     * so what is cached is not trusted until it is back (and the cache
     * emptied). */
    if (pglisten_up(rv->listener))
        ktab_with(rv->cache, user_id, 0, op.now, rv_lookup_fn, &op);
    if (op.found) {
        metrics_counter_inc(rv->hits);
        return rv_verdict(op.st.base, op.st.valid_after, iat);
    }
    if (rv->read_timeout_ms > 0 && op.now < atomic_load(&rv->quiet_until_ms)) {
        snprintf(err, errlen, "the database did not answer a moment ago");
        return -1;
    }
    metrics_counter_inc(rv->reads);
    op.gen = atomic_load(&rv->gen);
    if (rv_fetch(rv, db, user_id, &op.st.base, &op.st.valid_after, err, errlen) < 0) {
        if (rv->read_timeout_ms > 0)
            atomic_store(&rv->quiet_until_ms, svc_now_ms() + RV_QUIET_MS);
        return -1;
    }
    op.st.fetched_ms = op.now;
    ktab_with(rv->cache, user_id, 1, op.now, rv_store_fn, &op);
    return rv_verdict(op.st.base, op.st.valid_after, iat);
}

const char *revocation_message(int verdict)
{
    switch (verdict) {
    case REVOCATION_REVOKED: return "token revoked (signed out everywhere)";
    case REVOCATION_INACTIVE: return "account deactivated";
    case REVOCATION_UNKNOWN: return "no such account";
    default: return "token valid";
    }
}
