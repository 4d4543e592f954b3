#include "ktab.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"

#define KTAB_SLOTS 512 /* chains per shard */

typedef struct ktab_entry {
    struct ktab_entry *next;
    long long touched;
    char *key; /* stored after the value */
    _Alignas(max_align_t) unsigned char value[];
} ktab_entry;

typedef struct {
    pthread_mutex_t mu;
    ktab_entry *slots[KTAB_SLOTS];
    long count;
} ktab_shard;

struct ktab {
    size_t value_size;
    long shard_cap;
    ktab_shard shards[KTAB_SHARDS];
};

ktab *ktab_new(size_t value_size, long cap)
{
    ktab *t;

    if (cap < KTAB_SHARDS)
        return NULL;
    t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->value_size = value_size;
    t->shard_cap = cap / KTAB_SHARDS;
    for (int i = 0; i < KTAB_SHARDS; i++)
        pthread_mutex_init(&t->shards[i].mu, NULL);
    return t;
}

static void ktab_shard_clear(ktab_shard *sh)
{
    for (int s = 0; s < KTAB_SLOTS; s++) {
        ktab_entry *e = sh->slots[s];

        while (e) {
            ktab_entry *next = e->next;

            free(e);
            e = next;
        }
        sh->slots[s] = NULL;
    }
    sh->count = 0;
}

void ktab_clear(ktab *t)
{
    for (int i = 0; i < KTAB_SHARDS; i++) {
        pthread_mutex_lock(&t->shards[i].mu);
        ktab_shard_clear(&t->shards[i]);
        pthread_mutex_unlock(&t->shards[i].mu);
    }
}

void ktab_free(ktab *t)
{
    if (!t)
        return;
    for (int i = 0; i < KTAB_SHARDS; i++) {
        ktab_shard_clear(&t->shards[i]);
        pthread_mutex_destroy(&t->shards[i].mu);
    }
    free(t);
}

static ktab_shard *ktab_shard_of(ktab *t, const char *key, ktab_entry ***chain)
{
    uint32_t h = hash_fnv1a_str(key);
    ktab_shard *sh = &t->shards[h % KTAB_SHARDS];

    *chain = &sh->slots[(h / KTAB_SHARDS) % KTAB_SLOTS];
    return sh;
}

/* The link that points at the record of `key` in `chain`, or at the
 * chain's end when absent. Shard locked. */
static ktab_entry **ktab_link(ktab_entry **chain, const char *key)
{
    while (*chain && strcmp((*chain)->key, key) != 0)
        chain = &(*chain)->next;
    return chain;
}

/* Drops the least recently touched record of a full shard. */
static void ktab_evict(ktab_shard *sh)
{
    ktab_entry **oldest = NULL, *e;

    for (int s = 0; s < KTAB_SLOTS; s++)
        for (ktab_entry **pp = &sh->slots[s]; *pp; pp = &(*pp)->next)
            if (!oldest || (*pp)->touched < (*oldest)->touched)
                oldest = pp;
    if (!oldest)
        return;
    e = *oldest;
    *oldest = e->next;
    free(e);
    sh->count--;
}

static ktab_entry *ktab_entry_new(ktab *t, const char *key)
{
    size_t klen = strlen(key);
    ktab_entry *e = calloc(1, sizeof(*e) + t->value_size + klen + 1);

    if (!e)
        return NULL;
    e->key = (char *)e->value + t->value_size;
    memcpy(e->key, key, klen + 1);
    return e;
}

int ktab_with(ktab *t, const char *key, int create, long long now_ms, ktab_fn fn, void *arg)
{
    ktab_entry **chain, **link, *e;
    ktab_shard *sh = ktab_shard_of(t, key, &chain);
    int created = 0;

    pthread_mutex_lock(&sh->mu);
    link = ktab_link(chain, key);
    e = *link;
    if (!e) {
        if (!create) {
            pthread_mutex_unlock(&sh->mu);
            return 0;
        }
        if (sh->count >= t->shard_cap) {
            ktab_evict(sh);
            link = ktab_link(chain, key); /* the eviction may have freed the link's holder */
        }
        if (!(e = ktab_entry_new(t, key))) {
            pthread_mutex_unlock(&sh->mu);
            return -1;
        }
        *link = e;
        sh->count++;
        created = 1;
    }
    e->touched = now_ms;
    if (fn(e->value, created, arg) == KTAB_REMOVE) {
        *link = e->next;
        free(e);
        sh->count--;
    }
    pthread_mutex_unlock(&sh->mu);
    return 1;
}

void ktab_remove(ktab *t, const char *key)
{
    ktab_entry **chain, **link, *e;
    ktab_shard *sh = ktab_shard_of(t, key, &chain);

    pthread_mutex_lock(&sh->mu);
    link = ktab_link(chain, key);
    if ((e = *link) != NULL) {
        *link = e->next;
        free(e);
        sh->count--;
    }
    pthread_mutex_unlock(&sh->mu);
}

long ktab_size(ktab *t)
{
    long n = 0;

    for (int i = 0; i < KTAB_SHARDS; i++) {
        pthread_mutex_lock(&t->shards[i].mu);
        n += t->shards[i].count;
        pthread_mutex_unlock(&t->shards[i].mu);
    }
    return n;
}
