/* sse_connect: the connect scripts of new streams, pipelined on one Redis
 * connection by one thread, so that a burst of connects (a restart and its
 * mass reconnect) costs a round trip per batch instead of holding a
 * libmicrohttpd thread per stream for one each (those queued behind one
 * another past the header deadline). The stream handler defers its request
 * (httpd_req_defer_answer) and queues a job; this thread runs the job's
 * script and resumes the request, whose second half (sse_hub.c) detaches
 * the stream. See sse.h. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "sse.h"

/* Scripts per pipeline: bounds what one batch holds in replies (each up
 * to a buffer of frames) and how long the first of it waits for the last. */
#define SSE_CONNECT_BATCH 512

struct sse_connector {
    sse *s;
    rconn *r;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    sse_connect_job *head, *tail;
    int stopping, started;
    pthread_t thread;
};

/* Every job of the list to its request, answered or failed (rep NULL). */
static void connect_resume_all(sse_connect_job *j)
{
    while (j) {
        sse_connect_job *next = j->next;

        /* After this the job is the request's thread's (sse_hub.c). */
        httpd_req_resume(j->req);
        j = next;
    }
}

/* One pipeline: every script sent, then every reply read. A broken
 * connection fails the jobs whose replies did not come (their clients get
 * 503 and retry); they are not sent again, since a script that ran without
 * its reply arriving has counted an id and a second run is harmless but
 * the client may be long gone. */
static void connect_batch(sse_connector *c, sse_connect_job *first, int n)
{
    redisContext *ctx = rconn_connect(c->r) == 0 ? rconn_context(c->r) : NULL;
    sse_connect_job *j = first;
    int sent = 0;

    for (int i = 0; ctx && i < n; i++, j = j->next) {
        if (sse_store_connect_append(c->s, ctx, j->cid, j->has_last ? j->last : NULL, j->online_ttl_s) < 0)
            break;
        sent++;
    }
    j = first;
    for (int i = 0; i < sent; i++, j = j->next) {
        void *rep = NULL;

        if (redisGetReply(ctx, &rep) != REDIS_OK) {
            log_warn("sse: connect pipeline: %s", ctx->errstr[0] ? ctx->errstr : "connection lost");
            rconn_mark_broken(c->r);
            break;
        }
        j->rep = sse_store_connect_check(rep);
    }
    if (sent < n && ctx) {
        log_warn("sse: connect pipeline: cannot send: %s", ctx->errstr[0] ? ctx->errstr : "out of memory");
        rconn_mark_broken(c->r);
    }
}

static void *connect_main(void *arg)
{
    sse_connector *c = arg;

    pthread_mutex_lock(&c->mu);
    for (;;) {
        sse_connect_job *first, *last;
        int n = 0;

        while (!c->head && !c->stopping)
            pthread_cond_wait(&c->cv, &c->mu);
        if (!c->head)
            break;
        first = last = c->head;
        for (n = 1; n < SSE_CONNECT_BATCH && last->next; n++)
            last = last->next;
        c->head = last->next;
        if (!c->head)
            c->tail = NULL;
        last->next = NULL;
        pthread_mutex_unlock(&c->mu);
        if (!c->stopping)
            connect_batch(c, first, n);
        connect_resume_all(first);
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

sse_connector *sse_connector_new(sse *s, char *err, size_t errlen)
{
    sse_connector *c = calloc(1, sizeof(*c));

    if (!c || !(c->r = rconn_new(&sse_cfg(s)->redis, 2000))) {
        free(c);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->s = s;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    if (pthread_create(&c->thread, NULL, connect_main, c) != 0) {
        snprintf(err, errlen, "cannot start the SSE connect thread");
        sse_connector_free(c);
        return NULL;
    }
    c->started = 1;
    return c;
}

int sse_connector_submit(sse_connector *c, sse_connect_job *j)
{
    pthread_mutex_lock(&c->mu);
    if (c->stopping) {
        pthread_mutex_unlock(&c->mu);
        return -1;
    }
    j->next = NULL;
    if (c->tail)
        c->tail->next = j;
    else
        c->head = j;
    c->tail = j;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

void sse_connector_stop(sse_connector *c)
{
    if (!c || !c->started)
        return;
    pthread_mutex_lock(&c->mu);
    c->stopping = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->thread, NULL);
    c->started = 0;
}

void sse_connector_free(sse_connector *c)
{
    if (!c)
        return;
    sse_connector_stop(c);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    rconn_free(c->r);
    free(c);
}
