#include "health.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "log.h"

#define HEALTH_MAX_CHECKS 8

typedef struct {
    const char *name;
    health_check_fn fn;
    void *ud;
    atomic_int ok;
    int known;
} health_check;

struct health {
    long interval_ms;
    health_check checks[HEALTH_MAX_CHECKS];
    int nchecks;
    atomic_int all_ok;
    pthread_t thread;
    int started;
    int stop;
    int poke;
    pthread_mutex_t lock;
    pthread_cond_t cond;
};

health *health_new(long interval_ms)
{
    health *h = calloc(1, sizeof(*h));

    if (!h)
        return NULL;
    h->interval_ms = interval_ms > 0 ? interval_ms : 1000;
    pthread_mutex_init(&h->lock, NULL);
    pthread_cond_init(&h->cond, NULL);
    return h;
}

int health_add(health *h, const char *name, health_check_fn fn, void *ud)
{
    if (h->started || h->nchecks >= HEALTH_MAX_CHECKS)
        return -1;
    h->checks[h->nchecks].name = name;
    h->checks[h->nchecks].fn = fn;
    h->checks[h->nchecks].ud = ud;
    return h->nchecks++;
}

static void health_run_once(health *h)
{
    int all = 1;

    for (int i = 0; i < h->nchecks; i++) {
        health_check *c = &h->checks[i];
        int ok = c->fn(c->ud) == 0;

        if (!c->known || ok != atomic_load(&c->ok)) {
            if (ok)
                log_event(LOG_INFO, "dependency is healthy", "\"dependency\":\"%s\"", c->name);
            else
                log_event(LOG_WARN, "dependency is unavailable", "\"dependency\":\"%s\"", c->name);
        }
        c->known = 1;
        atomic_store(&c->ok, ok);
        all &= ok;
    }
    atomic_store(&h->all_ok, all);
}

static void *health_main(void *arg)
{
    health *h = arg;
    struct timespec deadline;

    pthread_mutex_lock(&h->lock);
    while (!h->stop) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += h->interval_ms / 1000;
        deadline.tv_nsec += (h->interval_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
        while (!h->stop && !h->poke)
            if (pthread_cond_timedwait(&h->cond, &h->lock, &deadline) != 0)
                break;
        if (h->stop)
            break;
        h->poke = 0;
        pthread_mutex_unlock(&h->lock);
        health_run_once(h);
        pthread_mutex_lock(&h->lock);
    }
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

int health_start(health *h)
{
    health_run_once(h);
    if (pthread_create(&h->thread, NULL, health_main, h) != 0)
        return -1;
    h->started = 1;
    return 0;
}

int health_ok(const health *h)
{
    return atomic_load(&h->all_ok);
}

int health_check_ok(const health *h, int idx)
{
    if (idx < 0 || idx >= h->nchecks)
        return 0;
    return atomic_load(&h->checks[idx].ok);
}

int health_count(const health *h)
{
    return h->nchecks;
}

const char *health_check_name(const health *h, int idx)
{
    return idx >= 0 && idx < h->nchecks ? h->checks[idx].name : NULL;
}

void health_poke(health *h)
{
    pthread_mutex_lock(&h->lock);
    h->poke = 1;
    pthread_cond_signal(&h->cond);
    pthread_mutex_unlock(&h->lock);
}

void health_free(health *h)
{
    if (!h)
        return;
    if (h->started) {
        pthread_mutex_lock(&h->lock);
        h->stop = 1;
        pthread_cond_signal(&h->cond);
        pthread_mutex_unlock(&h->lock);
        pthread_join(h->thread, NULL);
    }
    pthread_mutex_destroy(&h->lock);
    pthread_cond_destroy(&h->cond);
    free(h);
}
