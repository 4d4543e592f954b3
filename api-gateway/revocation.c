#include "revocation.h"

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "metrics.h"
#include "pglisten.h"
#include "svc.h"

#define RV_SHARDS 32
#define RV_SLOTS 1024      /* chains per shard */
#define RV_SHARD_CAP 2048  /* entries per shard: 65,536 users in all */
#define RV_KEYLEN 128
#define RV_ACQUIRE_MS 2000

typedef struct rv_entry {
    struct rv_entry *next;
    char user_id[RV_KEYLEN];
    long long valid_after; /* unix seconds; LLONG_MIN when never set */
    int verdict_base;      /* REVOCATION_OK, _INACTIVE or _UNKNOWN */
    long long fetched_ms;
} rv_entry;

typedef struct {
    pthread_mutex_t mu;
    rv_entry *slots[RV_SLOTS];
    int count;
} rv_shard;

struct revocation {
    long ttl_ms;
    /* Bumped by every notification and reconnection: an answer read from
     * the database is cached only if nothing was invalidated while it was
     * being read, so a stale answer never outlives its notification. */
    atomic_ullong gen;
    pglisten *listener;
    metrics_counter *reads, *hits;
    rv_shard shards[RV_SHARDS];
};

static void rv_chain_free(rv_entry *e)
{
    while (e) {
        rv_entry *next = e->next;

        free(e);
        e = next;
    }
}

static void rv_clear(revocation *rv)
{
    for (int i = 0; i < RV_SHARDS; i++) {
        rv_shard *sh = &rv->shards[i];

        pthread_mutex_lock(&sh->mu);
        for (int s = 0; s < RV_SLOTS; s++) {
            rv_chain_free(sh->slots[s]);
            sh->slots[s] = NULL;
        }
        sh->count = 0;
        pthread_mutex_unlock(&sh->mu);
    }
}

static rv_shard *rv_locate(revocation *rv, const char *user_id, rv_entry ***slot)
{
    uint32_t h = hash_fnv1a_str(user_id);
    rv_shard *sh = &rv->shards[h % RV_SHARDS];

    *slot = &sh->slots[(h / RV_SHARDS) % RV_SLOTS];
    return sh;
}

/* Unlinks and frees the entry of user_id in the chain; shard locked. */
static void rv_unlink(rv_shard *sh, rv_entry **pp, const char *user_id)
{
    for (; *pp; pp = &(*pp)->next) {
        rv_entry *e = *pp;

        if (strcmp(e->user_id, user_id) == 0) {
            *pp = e->next;
            free(e);
            sh->count--;
            return;
        }
    }
}

void revocation_forget(revocation *rv, const char *user_id)
{
    rv_entry **slot;
    rv_shard *sh = rv_locate(rv, user_id, &slot);

    atomic_fetch_add(&rv->gen, 1);
    pthread_mutex_lock(&sh->mu);
    rv_unlink(sh, slot, user_id);
    pthread_mutex_unlock(&sh->mu);
}

static void rv_notified(void *ud, const char *channel, const char *payload)
{
    revocation *rv = ud;

    (void)channel;
    if (!payload) { /* (re)connected: whatever was cached may be stale */
        atomic_fetch_add(&rv->gen, 1);
        rv_clear(rv);
        return;
    }
    revocation_forget(rv, payload);
}

revocation *revocation_new(const char *conninfo, long ttl_ms)
{
    static const char *const channels[] = {"user_tokens", NULL};
    revocation *rv = calloc(1, sizeof(*rv));

    if (!rv)
        return NULL;
    rv->ttl_ms = ttl_ms > 0 ? ttl_ms : 60000;
    atomic_init(&rv->gen, 0);
    rv->reads = metrics_counter_get(metrics_default(), "gateway_token_state_reads_total",
                                    "Users' token state read from the database (cache misses).", NULL);
    rv->hits = metrics_counter_get(metrics_default(), "gateway_token_state_hits_total",
                                   "Token checks answered from the cache of users' token state.", NULL);
    for (int i = 0; i < RV_SHARDS; i++)
        pthread_mutex_init(&rv->shards[i].mu, NULL);
    rv->listener = pglisten_new(conninfo, "api-gateway-tokens", channels, rv_notified, rv);
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
    rv_clear(rv);
    for (int i = 0; i < RV_SHARDS; i++)
        pthread_mutex_destroy(&rv->shards[i].mu);
    free(rv);
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

/* The cached state of user_id when fresh. Returns 1 and fills the outputs. */
static int rv_lookup(revocation *rv, const char *user_id, long long now, int *base, long long *valid_after)
{
    rv_entry **slot, *e;
    rv_shard *sh = rv_locate(rv, user_id, &slot);
    int found = 0;

    pthread_mutex_lock(&sh->mu);
    for (e = *slot; e; e = e->next) {
        if (strcmp(e->user_id, user_id) != 0)
            continue;
        if (now - e->fetched_ms < rv->ttl_ms) {
            *base = e->verdict_base;
            *valid_after = e->valid_after;
            found = 1;
        } else {
            rv_unlink(sh, slot, user_id);
        }
        break;
    }
    pthread_mutex_unlock(&sh->mu);
    return found;
}

static void rv_store(revocation *rv, const char *user_id, long long now, int base, long long valid_after,
                     unsigned long long gen)
{
    rv_entry **slot, *e;
    rv_shard *sh = rv_locate(rv, user_id, &slot);

    if (strlen(user_id) >= RV_KEYLEN || !(e = calloc(1, sizeof(*e))))
        return;
    snprintf(e->user_id, sizeof(e->user_id), "%s", user_id);
    e->verdict_base = base;
    e->valid_after = valid_after;
    e->fetched_ms = now;
    pthread_mutex_lock(&sh->mu);
    /* Checked under the lock that a notification's removal also takes, so
     * a notification cannot slip between the check and the insert. */
    if (atomic_load(&rv->gen) != gen || !pglisten_up(rv->listener)) {
        pthread_mutex_unlock(&sh->mu);
        free(e);
        return;
    }
    rv_unlink(sh, slot, user_id);
    if (sh->count >= RV_SHARD_CAP) {
        /* Full: this chain goes (bounded memory; its users are re-read). */
        for (rv_entry *x = *slot; x; x = x->next)
            sh->count--;
        rv_chain_free(*slot);
        *slot = NULL;
    }
    if (sh->count < RV_SHARD_CAP) {
        e->next = *slot;
        *slot = e;
        sh->count++;
        e = NULL;
    }
    pthread_mutex_unlock(&sh->mu);
    free(e);
}

/* Reads the user's state from the database. Returns 0 or -1. */
static int rv_fetch(dbpool *db, const char *user_id, int *base, long long *valid_after, char *err, size_t errlen)
{
    const char *params[1] = {user_id};
    PGconn *conn = dbpool_acquire(db, RV_ACQUIRE_MS);
    PGresult *res;

    if (!conn) {
        dbpool_errstr(db, err, errlen);
        return -1;
    }
    res = dbpool_exec(conn,
                      "SELECT is_active IS NOT FALSE, "
                      "coalesce(floor(extract(epoch FROM tokens_valid_after))::bigint::text, '') "
                      "FROM users WHERE id = $1",
                      1, params, err, errlen);
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
    long long now = svc_now_ms(), valid_after;
    unsigned long long gen;
    int base;

    if (rv_lookup(rv, user_id, now, &base, &valid_after)) {
        metrics_counter_inc(rv->hits);
        return rv_verdict(base, valid_after, iat);
    }
    metrics_counter_inc(rv->reads);
    gen = atomic_load(&rv->gen);
    if (rv_fetch(db, user_id, &base, &valid_after, err, errlen) < 0)
        return -1;
    rv_store(rv, user_id, now, base, valid_after, gen);
    return rv_verdict(base, valid_after, iat);
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
