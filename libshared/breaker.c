#include "breaker.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"

#define NBUCKETS 1024

typedef struct entry {
    struct entry *next;
    char host[256];
    int fails;
    int probing;           /* a half-open probe is in flight */
    long long open_until;  /* 0 when closed */
} entry;

struct breaker {
    pthread_mutex_t mu;
    int threshold, count;
    long cooldown_ms;
    entry *buckets[NBUCKETS];
};

breaker *breaker_new(int threshold, long cooldown_ms)
{
    breaker *b = calloc(1, sizeof(*b));

    if (!b)
        return NULL;
    pthread_mutex_init(&b->mu, NULL);
    b->threshold = threshold;
    b->cooldown_ms = cooldown_ms > 0 ? cooldown_ms : 1;
    return b;
}

void breaker_free(breaker *b)
{
    if (!b)
        return;
    for (int i = 0; i < NBUCKETS; i++) {
        entry *e = b->buckets[i];

        while (e) {
            entry *n = e->next;

            free(e);
            e = n;
        }
    }
    pthread_mutex_destroy(&b->mu);
    free(b);
}

static unsigned hash(const char *s)
{
    return hash_fnv1a_str(s) % NBUCKETS;
}

static entry *lookup(breaker *b, const char *host, int create)
{
    unsigned h = hash(host);
    entry *e;

    for (e = b->buckets[h]; e; e = e->next)
        if (!strcmp(e->host, host))
            return e;
    if (!create || b->count >= BREAKER_MAX_HOSTS)
        return NULL;
    e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    strncpy(e->host, host, sizeof(e->host) - 1);
    e->next = b->buckets[h];
    b->buckets[h] = e;
    b->count++;
    return e;
}

long breaker_allow(breaker *b, const char *host, long long now_ms)
{
    entry *e;
    long wait = 0;

    if (!b || b->threshold <= 0)
        return 0;
    pthread_mutex_lock(&b->mu);
    e = lookup(b, host, 0);
    if (e && e->open_until) {
        if (now_ms < e->open_until)
            wait = (long)(e->open_until - now_ms);
        else if (e->probing)
            wait = b->cooldown_ms < 1000 ? b->cooldown_ms : 1000;
        else
            e->probing = 1;
    }
    pthread_mutex_unlock(&b->mu);
    return wait;
}

void breaker_report(breaker *b, const char *host, int ok, long long now_ms)
{
    entry *e;

    if (!b || b->threshold <= 0)
        return;
    pthread_mutex_lock(&b->mu);
    e = lookup(b, host, !ok);
    if (e) {
        if (ok) {
            e->fails = 0;
            e->probing = 0;
            e->open_until = 0;
        } else {
            e->fails++;
            if (e->probing || e->fails >= b->threshold) {
                e->open_until = now_ms + b->cooldown_ms;
                e->probing = 0;
            }
        }
    }
    pthread_mutex_unlock(&b->mu);
}

int breaker_open_count(breaker *b, long long now_ms)
{
    int n = 0;

    if (!b)
        return 0;
    pthread_mutex_lock(&b->mu);
    for (int i = 0; i < NBUCKETS; i++)
        for (entry *e = b->buckets[i]; e; e = e->next)
            if (e->open_until && now_ms < e->open_until)
                n++;
    pthread_mutex_unlock(&b->mu);
    return n;
}

void breaker_cancel(breaker *b, const char *host)
{
    entry *e;

    if (!b || b->threshold <= 0)
        return;
    pthread_mutex_lock(&b->mu);
    e = lookup(b, host, 0);
    if (e)
        e->probing = 0;
    pthread_mutex_unlock(&b->mu);
}

int breaker_state(breaker *b, const char *host, long long now_ms)
{
    entry *e;
    int st = BREAKER_CLOSED;

    if (!b || b->threshold <= 0)
        return st;
    pthread_mutex_lock(&b->mu);
    e = lookup(b, host, 0);
    if (e && e->open_until)
        st = now_ms < e->open_until ? BREAKER_OPEN : BREAKER_HALF_OPEN;
    pthread_mutex_unlock(&b->mu);
    return st;
}

const char *breaker_state_name(int state)
{
    return state == BREAKER_OPEN ? "open" : state == BREAKER_HALF_OPEN ? "half_open" : "closed";
}
