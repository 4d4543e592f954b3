#include "ratelimit.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"
#include "svc.h"

#define RL_BUCKETS 2048 /* hash slots per shard (chained) */
#define RL_KEYLEN 64    /* an IPv6 address in text is at most 45 */

typedef struct rl_entry {
    struct rl_entry *next;
    char key[RL_KEYLEN];
    double tokens;
    long long last_ms;
} rl_entry;

typedef struct {
    pthread_mutex_t mu;
    rl_entry *slots[RL_BUCKETS];
    int count;
} rl_shard;

struct ratelimit {
    double capacity;
    double per_ms;
    long long full_ms; /* idle time after which a bucket is full again */
    rl_shard shards[RATELIMIT_SHARDS];
};

ratelimit *ratelimit_new(long per_min)
{
    ratelimit *rl;

    if (per_min < 1)
        return NULL;
    rl = calloc(1, sizeof(*rl));
    if (!rl)
        return NULL;
    rl->capacity = (double)per_min;
    rl->per_ms = (double)per_min / 60000.0;
    rl->full_ms = 60000;
    for (int i = 0; i < RATELIMIT_SHARDS; i++)
        pthread_mutex_init(&rl->shards[i].mu, NULL);
    return rl;
}

void ratelimit_free(ratelimit *rl)
{
    if (!rl)
        return;
    for (int i = 0; i < RATELIMIT_SHARDS; i++) {
        for (int s = 0; s < RL_BUCKETS; s++) {
            rl_entry *e = rl->shards[i].slots[s];

            while (e) {
                rl_entry *next = e->next;

                free(e);
                e = next;
            }
        }
        pthread_mutex_destroy(&rl->shards[i].mu);
    }
    free(rl);
}

/* Drops buckets that have refilled completely; if none, the least
 * recently seen one. Called with the shard locked and full. */
static void rl_evict(ratelimit *rl, rl_shard *sh, long long now_ms)
{
    rl_entry **oldest = NULL;

    for (int s = 0; s < RL_BUCKETS; s++) {
        rl_entry **pp = &sh->slots[s];

        while (*pp) {
            rl_entry *e = *pp;

            if (now_ms - e->last_ms >= rl->full_ms) {
                *pp = e->next;
                free(e);
                sh->count--;
                continue;
            }
            if (!oldest || e->last_ms < (*oldest)->last_ms)
                oldest = pp;
            pp = &e->next;
        }
    }
    if (sh->count >= RATELIMIT_SHARD_CAP && oldest) {
        rl_entry *e = *oldest;

        *oldest = e->next;
        free(e);
        sh->count--;
    }
}

int ratelimit_take(ratelimit *rl, const char *key, long long now_ms)
{
    uint32_t h = hash_fnv1a_str(key);
    rl_shard *sh = &rl->shards[h % RATELIMIT_SHARDS];
    rl_entry **slot = &sh->slots[(h / RATELIMIT_SHARDS) % RL_BUCKETS], *e;
    int wait = 0;

    pthread_mutex_lock(&sh->mu);
    for (e = *slot; e; e = e->next)
        if (strcmp(e->key, key) == 0)
            break;
    if (!e) {
        if (sh->count >= RATELIMIT_SHARD_CAP)
            rl_evict(rl, sh, now_ms);
        e = calloc(1, sizeof(*e));
        if (!e) {
            /* Out of memory: fail open rather than refuse every client. */
            pthread_mutex_unlock(&sh->mu);
            return 0;
        }
        snprintf(e->key, sizeof(e->key), "%s", key);
        e->tokens = rl->capacity;
        e->last_ms = now_ms;
        e->next = *slot;
        *slot = e;
        sh->count++;
    } else {
        double t = e->tokens + (double)(now_ms - e->last_ms) * rl->per_ms;

        e->tokens = t > rl->capacity ? rl->capacity : t;
        e->last_ms = now_ms;
    }
    if (e->tokens >= 1.0) {
        e->tokens -= 1.0;
    } else {
        double ms = (1.0 - e->tokens) / rl->per_ms;

        wait = (int)((ms + 999.0) / 1000.0);
        if (wait < 1)
            wait = 1;
    }
    pthread_mutex_unlock(&sh->mu);
    return wait;
}

long ratelimit_size(ratelimit *rl)
{
    long n = 0;

    for (int i = 0; i < RATELIMIT_SHARDS; i++) {
        pthread_mutex_lock(&rl->shards[i].mu);
        n += rl->shards[i].count;
        pthread_mutex_unlock(&rl->shards[i].mu);
    }
    return n;
}

static int rl_exempt(const char *path)
{
    return strcmp(path, "/health") == 0 || strcmp(path, "/api/v1/health") == 0 || strcmp(path, "/metrics") == 0;
}

int ratelimit_wait(gateway *gw, const char *path, const char *remote)
{
    if (!gw->limiter || rl_exempt(path))
        return 0;
    return ratelimit_take(gw->limiter, remote, svc_now_ms());
}

int ratelimit_hook(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    char secs[16];
    int wait = ratelimit_wait(gw, httpd_req_path(req), httpd_req_remote(req));

    if (!wait)
        return 0;
    snprintf(secs, sizeof(secs), "%d", wait);
    httpd_respond_errorf(req, 429, "rate_limited", "too many requests; retry in %d s", wait);
    httpd_req_add_header(req, "Retry-After", secs);
    return 1;
}
