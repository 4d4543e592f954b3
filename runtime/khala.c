/* khala: see khala.h. */
#include "khala.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmt.h"
#include "hash.h"

#define KHALA_WAYS 8
#define KHALA_KEY_MAX 192

typedef struct {
    char key[KHALA_KEY_MAX];
    long long t;     /* window start or last poll, ms */
    long count;
    long long touched;
} khala_slot;

struct khala_table {
    pthread_mutex_t mu;
    size_t nsets;
    long long clock;
    khala_slot *slots;
};

khala_class khala_topic_class(const char *topic)
{
    size_t n = strlen(topic);

    if (n > 11 && strncmp(topic, "run:", 4) == 0 && strcmp(topic + n - 7, ":events") == 0)
        return KHALA_CLASS_RUN;
    if (n > 17 && strncmp(topic, "worker:", 7) == 0 && strcmp(topic + n - 10, ":lifecycle") == 0)
        return KHALA_CLASS_WORKER;
    return KHALA_CLASS_OTHER;
}

const char *khala_class_name(khala_class c)
{
    switch (c) {
    case KHALA_CLASS_RUN: return "run_events";
    case KHALA_CLASS_WORKER: return "worker_lifecycle";
    default: return "fallback";
    }
}

int khala_stale_reasons(long long after, long long floor_seq, long long head, long long budget,
                        const char *reasons[2])
{
    int n = 0;

    if (after < floor_seq)
        reasons[n++] = "retention_floor_breach";
    if (after < head && head - after > budget)
        reasons[n++] = "replay_budget_exceeded";
    return n;
}

khala_table *khala_table_new(size_t capacity)
{
    khala_table *t = calloc(1, sizeof(*t));

    if (!t)
        return NULL;
    t->nsets = capacity / KHALA_WAYS + 1;
    t->slots = calloc(t->nsets * KHALA_WAYS, sizeof(*t->slots));
    if (!t->slots || pthread_mutex_init(&t->mu, NULL) != 0) {
        free(t->slots);
        free(t);
        return NULL;
    }
    return t;
}

void khala_table_free(khala_table *t)
{
    if (!t)
        return;
    pthread_mutex_destroy(&t->mu);
    free(t->slots);
    free(t);
}

/* The form of `key` a slot holds: the key itself when it fits, else its
 * head and two hashes of the whole. A copy cut to the slot's size never
 * matched its key again, so a long key (a long subject or worker id) was
 * a fresh slot at every call and never limited. */
static void slot_key(char out[KHALA_KEY_MAX], const char *key)
{
    size_t n = strlen(key), head = KHALA_KEY_MAX - 18;

    if (n < KHALA_KEY_MAX) {
        memcpy(out, key, n + 1);
        return;
    }
    memcpy(out, key, head);
    snprintf(out + head, KHALA_KEY_MAX - head, "#%08x%08x", (unsigned)hash_fnv1a(key, n),
             (unsigned)hash_fnv1a_add(hash_fnv1a("#", 1), key, n));
}

/* The slot of `key`, claimed (zeroed, key set) when absent and `fresh`
 * is not NULL, which is then set when the slot was just claimed; without
 * `fresh`, NULL when absent. Called with the lock held. */
static khala_slot *lookup(khala_table *t, const char *full, int *fresh)
{
    char key[KHALA_KEY_MAX];
    khala_slot *set, *victim;
    int i;

    slot_key(key, full);
    set = victim = t->slots + (hash_fnv1a_str(key) % t->nsets) * KHALA_WAYS;

    if (fresh)
        *fresh = 0;
    for (i = 0; i < KHALA_WAYS; i++) {
        if (set[i].key[0] && strcmp(set[i].key, key) == 0) {
            set[i].touched = ++t->clock;
            return &set[i];
        }
        if (set[i].touched < victim->touched)
            victim = &set[i];
    }
    if (!fresh)
        return NULL;
    memset(victim, 0, sizeof(*victim));
    fmt_copy(victim->key, sizeof(victim->key), key);
    victim->touched = ++t->clock;
    *fresh = 1;
    return victim;
}

int khala_rate_take(khala_table *t, const char *key, long limit, long long now_ms, long *retry_after_ms)
{
    khala_slot *s;
    int fresh, rc = 0;

    pthread_mutex_lock(&t->mu);
    s = lookup(t, key, &fresh);
    if (fresh || now_ms - s->t >= 1000) {
        s->t = now_ms;
        s->count = 0;
    }
    if (s->count >= limit) {
        *retry_after_ms = (long)(1000 - (now_ms - s->t));
        rc = -1;
    } else {
        s->count++;
    }
    pthread_mutex_unlock(&t->mu);
    return rc;
}

void khala_rate_give(khala_table *t, const char *key, long long taken_ms)
{
    khala_slot *s;

    pthread_mutex_lock(&t->mu);
    /* An evicted key has nothing to give back to (and claiming a slot for
     * it would evict a live one). */
    s = lookup(t, key, NULL);
    if (s && taken_ms >= s->t && taken_ms - s->t < 1000 && s->count > 0)
        s->count--;
    pthread_mutex_unlock(&t->mu);
}

int khala_guard_poll(khala_table *t, const char *key, long min_interval_ms, long long now_ms, long *retry_after_ms)
{
    khala_slot *s;
    int fresh, rc = 0;

    pthread_mutex_lock(&t->mu);
    s = lookup(t, key, &fresh);
    if (!fresh && now_ms - s->t < min_interval_ms) {
        *retry_after_ms = (long)(min_interval_ms - (now_ms - s->t));
        rc = -1;
    }
    s->t = now_ms;
    pthread_mutex_unlock(&t->mu);
    return rc;
}
