/* pusher: see pusher.h. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pusher.h"

struct pusher {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    ep *app;
    jobs *busy;  /* the batch being pushed, NULL when idle */
    jobs *spare; /* a free job buffer for the processing thread */
    char key[128];
    long long outbox_id;
    long long done[PUSHER_MAX_DONE];
    int ndone;
    int failed;
    char err[512];
    int stop;
    pthread_t th;
};

static void *pusher_main(void *arg)
{
    pusher *P = arg;
    ep *app = P->app;

    pthread_mutex_lock(&P->mu);
    for (;;) {
        jobs *j;
        char key[128], err[512];
        long long id;
        int pushed;

        while (!P->busy && !P->stop)
            pthread_cond_wait(&P->cv, &P->mu);
        if (!P->busy)
            break;
        j = P->busy;
        id = P->outbox_id;
        snprintf(key, sizeof(key), "%s", P->key);
        pthread_mutex_unlock(&P->mu);
        pushed = jobs_push(j, app->push, app->cfg.queue, key, app->cfg.seen_ttl_s, err, sizeof(err));
        if (pushed >= 0)
            metrics_counter_add(app->m_enqueued, (uint64_t)pushed);
        jobs_clear(j);
        pthread_mutex_lock(&P->mu);
        if (pushed < 0) {
            P->failed = 1;
            snprintf(P->err, sizeof(P->err), "%s", err);
        } else if (P->ndone < PUSHER_MAX_DONE) {
            P->done[P->ndone++] = id;
        } /* else: the row stays and a later outbox flush deletes it */
        P->spare = j;
        P->busy = NULL;
        pthread_cond_broadcast(&P->cv);
    }
    pthread_mutex_unlock(&P->mu);
    return NULL;
}

pusher *pusher_start(ep *app)
{
    pusher *P = calloc(1, sizeof(*P));

    if (!P)
        return NULL;
    P->app = app;
    pthread_mutex_init(&P->mu, NULL);
    pthread_cond_init(&P->cv, NULL);
    if (!(P->spare = jobs_new()) || pthread_create(&P->th, NULL, pusher_main, P) != 0) {
        jobs_free(P->spare);
        pthread_cond_destroy(&P->cv);
        pthread_mutex_destroy(&P->mu);
        free(P);
        return NULL;
    }
    return P;
}

void pusher_stop(pusher *P)
{
    if (!P)
        return;
    pthread_mutex_lock(&P->mu);
    P->stop = 1;
    pthread_cond_broadcast(&P->cv);
    pthread_mutex_unlock(&P->mu);
    pthread_join(P->th, NULL);
    jobs_free(P->spare);
    pthread_cond_destroy(&P->cv);
    pthread_mutex_destroy(&P->mu);
    free(P);
}

void pusher_submit(pusher *P, jobs **jp, const char *key, long long id)
{
    pthread_mutex_lock(&P->mu);
    while (P->busy)
        pthread_cond_wait(&P->cv, &P->mu);
    P->busy = *jp;
    P->outbox_id = id;
    snprintf(P->key, sizeof(P->key), "%s", key);
    *jp = P->spare;
    P->spare = NULL;
    pthread_cond_broadcast(&P->cv);
    pthread_mutex_unlock(&P->mu);
}

void pusher_wait_idle(pusher *P)
{
    pthread_mutex_lock(&P->mu);
    while (P->busy)
        pthread_cond_wait(&P->cv, &P->mu);
    pthread_mutex_unlock(&P->mu);
}

int pusher_collect(pusher *P, long long *ids, int *nids, int cap, char *err, size_t errlen)
{
    int failed;

    pthread_mutex_lock(&P->mu);
    while (P->ndone && *nids < cap)
        ids[(*nids)++] = P->done[--P->ndone];
    failed = P->failed;
    if (failed)
        snprintf(err, errlen, "%s", P->err);
    P->failed = 0;
    pthread_mutex_unlock(&P->mu);
    return failed;
}
