#include "loginguard.h"

#include <stdatomic.h>
#include <stdlib.h>

#include "ktab.h"

#define LG_ACCOUNTS 65536

typedef struct {
    int failures;
    long long locked_until; /* monotonic ms */
} lg_account;

struct loginguard {
    int free_failures;
    long backoff_max_ms;
    int max_hashes;
    atomic_int hashing;
    ktab *accounts;
};

loginguard *loginguard_new(int free_failures, long backoff_max_ms, int max_hashes)
{
    loginguard *g;

    if (free_failures < 1 || backoff_max_ms < 1000 || max_hashes < 1)
        return NULL;
    g = calloc(1, sizeof(*g));
    if (!g)
        return NULL;
    g->free_failures = free_failures;
    g->backoff_max_ms = backoff_max_ms;
    g->max_hashes = max_hashes;
    atomic_init(&g->hashing, 0);
    g->accounts = ktab_new(sizeof(lg_account), LG_ACCOUNTS);
    if (!g->accounts) {
        free(g);
        return NULL;
    }
    return g;
}

void loginguard_free(loginguard *g)
{
    if (!g)
        return;
    ktab_free(g->accounts);
    free(g);
}

typedef struct {
    const loginguard *g;
    long long now;
    int ok;
    int wait_s;
} lg_op;

/* A record whose lock ended longer ago than the longest back-off is
 * forgotten: the account starts afresh. */
static int lg_quiet(const lg_op *op, const lg_account *a)
{
    return op->now - a->locked_until > op->g->backoff_max_ms;
}

static int lg_wait_fn(void *value, int created, void *arg)
{
    lg_op *op = arg;
    const lg_account *a = value;

    (void)created;
    if (lg_quiet(op, a))
        return KTAB_REMOVE;
    if (a->locked_until > op->now)
        op->wait_s = (int)((a->locked_until - op->now + 999) / 1000);
    return KTAB_KEEP;
}

static int lg_fail_fn(void *value, int created, void *arg)
{
    lg_op *op = arg;
    lg_account *a = value;
    int over;
    long long delay;

    if (created || lg_quiet(op, a)) {
        a->failures = 0;
        a->locked_until = op->now;
    }
    a->failures++;
    over = a->failures - op->g->free_failures;
    if (over >= 0) {
        delay = 1000LL << (over < 30 ? over : 30);
        if (delay > op->g->backoff_max_ms)
            delay = op->g->backoff_max_ms;
        a->locked_until = op->now + delay;
    }
    return KTAB_KEEP;
}

int loginguard_wait(loginguard *g, const char *account, long long now_ms)
{
    lg_op op = {g, now_ms, 0, 0};

    ktab_with(g->accounts, account, 0, now_ms, lg_wait_fn, &op);
    return op.wait_s;
}

void loginguard_record(loginguard *g, const char *account, int ok, long long now_ms)
{
    lg_op op = {g, now_ms, ok, 0};

    if (ok)
        ktab_remove(g->accounts, account);
    else
        ktab_with(g->accounts, account, 1, now_ms, lg_fail_fn, &op);
}

int loginguard_hash_take(loginguard *g)
{
    int n = atomic_load(&g->hashing);

    while (n < g->max_hashes)
        if (atomic_compare_exchange_weak(&g->hashing, &n, n + 1))
            return 0;
    return -1;
}

void loginguard_hash_give(loginguard *g)
{
    atomic_fetch_sub(&g->hashing, 1);
}
