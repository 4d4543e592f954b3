/* writer: records finished jobs, off the event loops.
 *
 * The worker threads hand every finished job here and go straight back to
 * their transfers. One writer thread per process writes the jobs'
 * action_results rows in one statement per batch, and only after that
 * statement committed records their outcomes in Redis with one script call
 * per batch (which is what removes them from action_jobs_inflight). A
 * batch is whatever accumulated while the previous one was being written,
 * so under load batches grow by themselves and when idle a job is written
 * at once.
 *
 * Until its outcome is recorded a job stays leased, and the writer extends
 * the leases of the jobs it holds like a worker does, so a database or
 * Redis outage only delays recording; if the process dies first, the
 * leases run out and the jobs are delivered again (at least once). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aw.h"
#include "log.h"
#include "queue.h"

#define WRITE_BATCH 2000
#define RETRY_MS 200
/* A batch is written once WRITE_MIN jobs wait or the oldest has waited
 * LINGER_MS. Each batch costs PostgreSQL a commit (a WAL flush) and Redis a
 * script call, so under load a few milliseconds of waiting make batches of
 * hundreds instead of tens and halve the database's work per row. Only
 * the recording waits; deliveries go on meanwhile, and the jobs stay
 * leased. */
#define WRITE_MIN 1000
#define LINGER_MS 8

struct writer {
    aw *app;
    queue *q;
    pthread_t th;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    job *in_head, *in_tail; /* handed over, not yet taken by the thread */
    int in_n;               /* how many */
    int idle;               /* the thread waits with nothing in hand */
    job *dead;              /* recorded, to be freed by a worker thread (under mu) */
    atomic_int ndead;       /* how many */
    int stopping;
    long long stop_deadline;
    atomic_long pending;    /* handed over and not yet recorded */
};

static long long now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

writer *writer_new(aw *app)
{
    writer *w = calloc(1, sizeof(*w));

    if (!w)
        return NULL;
    w->app = app;
    w->q = queue_new(&app->cfg.redis, app->cfg.queue_prefix, 5000);
    if (!w->q) {
        free(w);
        return NULL;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    atomic_init(&w->pending, 0);
    atomic_init(&w->ndead, 0);
    return w;
}

void writer_submit(writer *w, job *head, job *tail, int n)
{
    if (!head)
        return;
    tail->next = NULL;
    atomic_fetch_add(&w->pending, n);
    pthread_mutex_lock(&w->mu);
    /* The writer needs waking only to start a batch's linger time or to
     * write a full batch; in between it sleeps until the linger ends. */
    if ((w->idle && !w->in_head) || (w->in_n < WRITE_MIN && w->in_n + n >= WRITE_MIN))
        pthread_cond_signal(&w->cv);
    if (w->in_tail)
        w->in_tail->next = head;
    else
        w->in_head = head;
    w->in_tail = tail;
    w->in_n += n;
    pthread_mutex_unlock(&w->mu);
}

job *writer_reap(writer *w)
{
    job *j;

    if (!atomic_load(&w->ndead))
        return NULL;
    pthread_mutex_lock(&w->mu);
    j = w->dead;
    w->dead = NULL;
    atomic_store(&w->ndead, 0);
    pthread_mutex_unlock(&w->mu);
    return j;
}

long writer_pending(writer *w)
{
    return atomic_load(&w->pending);
}

/* Writes the rows of up to WRITE_BATCH jobs that need one. */
static int write_rows(writer *w, job *list, long long now, long long *next_log)
{
    job *batch[WRITE_BATCH];
    char err[512];
    int n = 0;

    for (job *j = list; j && n < WRITE_BATCH; j = j->next)
        if (!j->row_done)
            batch[n++] = j;
    if (!n)
        return 0;
    if (results_write(w->app, batch, n, err, sizeof(err)) < 0) {
        if (now >= *next_log) {
            char e[600];

            log_event(LOG_WARN, "cannot write action_results; jobs stay leased", "\"pending\":%ld,\"error\":\"%s\"",
                      writer_pending(w), log_escape(e, sizeof(e), err));
            *next_log = now + 10000;
        }
        return -1;
    }
    for (int i = 0; i < n; i++)
        batch[i]->row_done = 1;
    return 0;
}

/* Records the outcomes of the jobs whose rows are written and frees them.
 * Returns -1 when Redis failed (the jobs stay in the list). */
static int ack_rows(writer *w, job **list, long long now, long long *next_log)
{
    queue_ack *acks;
    job **js, *dead = NULL, *dead_tail = NULL;
    int n = 0, k = 0, got, ndead = 0;

    for (job *j = *list; j; j = j->next)
        n += j->row_done;
    if (!n)
        return 0;
    acks = malloc((size_t)n * sizeof(*acks));
    js = malloc((size_t)n * sizeof(*js));
    if (!acks || !js) {
        free(acks);
        free(js);
        return -1;
    }
    for (job *j = *list; j; j = j->next)
        if (j->row_done) {
            js[k] = j;
            acks[k].raw = j->raw;
            acks[k].kind = (queue_ack_kind)j->ack_kind;
            acks[k].payload = j->ack_payload;
            acks[k].due_ms = j->due_ms;
            acks[k].done = 0;
            k++;
        }
    got = queue_record(w->q, acks, n);
    if (got < n && now >= *next_log) {
        log_event(LOG_WARN, "cannot record outcomes in redis; will retry", "\"error\":\"%s\"", queue_errstr(w->q));
        *next_log = now + 10000;
    }
    /* Unlink what Redis recorded (the rest stays for a retry) and give it
     * back to the worker threads to free. */
    k = 0;
    for (job **pp = list; *pp;) {
        job *j = *pp;

        /* NOLINTNEXTLINE(clang-analyzer-core.UndefinedBinaryOperatorResult): js[0..n) is set above. */
        if (k < n && js[k] == j) {
            if (acks[k].done) {
                *pp = j->next;
                j->next = dead;
                if (!dead)
                    dead_tail = j;
                dead = j;
                ndead++;
                k++;
                continue;
            }
            k++;
        }
        pp = &j->next;
    }
    free(acks);
    free(js);
    if (dead) {
        pthread_mutex_lock(&w->mu);
        dead_tail->next = w->dead;
        w->dead = dead;
        pthread_mutex_unlock(&w->mu);
        atomic_fetch_add(&w->ndead, ndead);
        atomic_fetch_sub(&w->pending, ndead);
    }
    return got < n ? -1 : 0;
}

static void extend(writer *w, job *list, int n, long long now)
{
    char **raws = calloc((size_t)n, sizeof(*raws));
    int k = 0;

    if (!raws)
        return;
    for (job *j = list; j && k < n; j = j->next)
        raws[k++] = j->raw;
    queue_extend(w->q, raws, k, now + w->app->cfg.visibility_ms);
    free(raws);
}

/* Moves the hand-over list to the end of the thread's own (under mu). */
static void take_in(writer *w, job **head, job **tail, int *nhead)
{
    if (!w->in_head)
        return;
    if (*tail)
        (*tail)->next = w->in_head;
    else
        *head = w->in_head;
    *tail = w->in_tail;
    *nhead += w->in_n;
    w->in_head = w->in_tail = NULL;
    w->in_n = 0;
}

static void *writer_main(void *arg)
{
    writer *w = arg;
    job *head = NULL, *tail = NULL;
    long long retry_at = 0, next_extend = 0, next_db_log = 0, next_redis_log = 0, first_at = 0;
    long third = w->app->cfg.visibility_ms / 3;
    int nhead = 0;

    for (;;) {
        long long now;
        int n = 0, failed, ready = 0;

        pthread_mutex_lock(&w->mu);
        for (;;) {
            now = now_ms();
            /* The first jobs start a batch's linger time; later ones stay
             * in the hand-over list until the batch goes out, so that
             * handing them over does not wake this thread each time. */
            if (!head && w->in_head)
                first_at = now;
            if (!head || (w->stopping && now >= w->stop_deadline))
                take_in(w, &head, &tail, &nhead);
            if (w->stopping && (!head || now >= w->stop_deadline))
                break;
            ready = head && now >= retry_at &&
                    (nhead + w->in_n >= WRITE_MIN || now >= first_at + LINGER_MS || w->stopping);
            if (ready || (head && now >= next_extend)) {
                take_in(w, &head, &tail, &nhead);
                break;
            }
            {
                long long until = now + 1000;
                struct timespec ts;

                if (head) {
                    long long due = retry_at > first_at + LINGER_MS ? retry_at : first_at + LINGER_MS;

                    if (due < until)
                        until = due;
                }
                if (head && next_extend < until)
                    until = next_extend;
                ts.tv_sec = (time_t)(until / 1000);
                ts.tv_nsec = (long)(until % 1000) * 1000000L;
                w->idle = !head;
                pthread_cond_timedwait(&w->cv, &w->mu, &ts);
                w->idle = 0;
            }
        }
        if (w->stopping && (!head || now >= w->stop_deadline)) {
            pthread_mutex_unlock(&w->mu);
            break;
        }
        pthread_mutex_unlock(&w->mu);

        for (job *j = head; j; j = j->next)
            n++;
        if (!next_extend)
            next_extend = now + third;
        if (now >= next_extend) {
            /* Rows waiting for PostgreSQL or Redis keep their leases. */
            extend(w, head, n, now);
            next_extend = now + third;
        }
        if (!ready)
            continue;
        failed = write_rows(w, head, now, &next_db_log) < 0;
        failed |= ack_rows(w, &head, now, &next_redis_log) < 0;
        nhead = 0;
        tail = head;
        while (tail) {
            nhead++;
            if (!tail->next)
                break;
            tail = tail->next;
        }
        retry_at = failed ? now_ms() + RETRY_MS : 0;
        /* What is left (past WRITE_BATCH, or failed) keeps its first_at,
         * so it goes out at once (or after RETRY_MS). */
        if (!head) {
            next_extend = 0;
            first_at = 0;
        }
    }
    if (head) {
        int n = 0;

        for (job *j = head; j; j = j->next)
            n++;
        log_event(LOG_WARN, "outcomes not recorded at exit; their jobs will be redelivered", "\"count\":%d", n);
        while (head) {
            job *j = head;

            head = j->next;
            aw_job_free(j);
        }
    }
    return NULL;
}

int writer_start(writer *w)
{
    if (pthread_create(&w->th, NULL, writer_main, w) != 0)
        return -1;
    w->started = 1;
    return 0;
}

void writer_stop(writer *w, long grace_ms)
{
    if (!w || !w->started)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = 1;
    w->stop_deadline = now_ms() + grace_ms;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);
    w->started = 0;
}

void writer_free(writer *w)
{
    if (!w)
        return;
    writer_stop(w, 0);
    for (job *j = writer_reap(w), *next; j; j = next) {
        next = j->next;
        aw_job_free(j);
    }
    while (w->in_head) {
        job *j = w->in_head;

        w->in_head = j->next;
        aw_job_free(j);
    }
    queue_free(w->q);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w);
}
