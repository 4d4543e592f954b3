/* rtpipe: appends committed from the loop over asynchronous connections
 * (see rtpipe.h). Everything but the connect threads runs on the loop. */
#include "rtpipe.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "backoff.h"
#include "dbpool.h"
#include "fmt.h"
#include "hash.h"
#include "log.h"

#define RTPIPE_QUEUE_MAX 4096

typedef struct item item;
struct item {
    item *next;
    rt_append *x;
    rtpipe_done_fn fn;
    void *ud;
    int alone; /* run with append_run_event, alone: its group was refused, or FAST did not append it */
};

enum { ST_DOWN, ST_CONNECTING, ST_IDLE, ST_BUSY };
enum { Q_FAST, Q_ONE, Q_SET, Q_GROUP };

typedef struct slot slot;
struct slot {
    rtpipe *p;
    int state;
    PGconn *c;
    wsapp_io *io;
    wsapp_timer *retry;
    backoff bo;
    pthread_t th;
    int th_live;
    item *head, *tail;
    int queued;
    item *fl[RTAPPEND_GROUP_MAX]; /* in flight, in group order */
    int nfl, kind;
    PGresult *res;
};

struct rtpipe {
    rt *r;
    wsapp *app;
    rtpipe_message_fn on_message;
    void *message_ud;
    char conninfo[2048];
    int n;
    slot s[RTPIPE_CONNS_MAX];
};

/* What a connect thread hands to the loop. */
typedef struct {
    slot *s;
    PGconn *c; /* NULL: the attempt failed */
    char conninfo[2048];
} conn_result;

static const struct {
    const char *name, *sql;
    int nparams;
} statements[] = {
    {"f", RTAPPEND_FAST_SQL, 4},
    {"o", RTAPPEND_ONE_SQL, 5},
    {"s", RTAPPEND_SET_SQL, 1},
    {"g", RTAPPEND_GROUP_SQL, 1},
};

static void kick(slot *s);

/* ------------------------------------------------------------ connecting */

static void connected_on_loop(wsapp *app, void *ud);

static void *connect_main(void *ud)
{
    conn_result *cr = ud;
    char err[512];
    PGconn *c = dbpool_connect(cr->conninfo, NULL, err, sizeof(err));
    PGresult *res;
    size_t i;

    if (!c) {
        log_warn("runtime: an append connection failed: %s", err);
        goto fail;
    }
    for (i = 0; i < sizeof(statements) / sizeof(statements[0]); i++) {
        res = PQprepare(c, statements[i].name, statements[i].sql, 0, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            log_warn("runtime: preparing an append statement failed: %s", PQerrorMessage(c));
            PQclear(res);
            goto fail;
        }
        PQclear(res);
    }
    if (PQsetnonblocking(c, 1) != 0)
        goto fail;
    cr->c = c;
    goto post;
fail:
    PQfinish(c);
    cr->c = NULL;
post:
    if (wsapp_post(cr->s->p->app, connected_on_loop, cr) < 0) {
        PQfinish(cr->c);
        free(cr);
    }
    return NULL;
}

static void connect_start(slot *s)
{
    conn_result *cr = calloc(1, sizeof(*cr));

    if (s->th_live) {
        pthread_join(s->th, NULL);
        s->th_live = 0;
    }
    if (!cr)
        goto later;
    cr->s = s;
    fmt_copy(cr->conninfo, sizeof(cr->conninfo), s->p->conninfo);
    if (pthread_create(&s->th, NULL, connect_main, cr) != 0) {
        free(cr);
        goto later;
    }
    s->th_live = 1;
    s->state = ST_CONNECTING;
    return;
later:
    s->state = ST_DOWN;
    wsapp_timer_set(s->retry, backoff_next_ms(&s->bo));
}

static void retry_fire(wsapp_timer *t, void *ud)
{
    slot *s = ud;

    (void)t;
    if (s->state == ST_DOWN && !wsapp_stopping(s->p->app))
        connect_start(s);
}

static void on_io(wsapp_io *io, int readable, int writable, void *ud);

static void connected_on_loop(wsapp *app, void *ud)
{
    conn_result *cr = ud;
    slot *s = cr->s;

    if (wsapp_stopping(app)) {
        /* The pipe may be gone already: touch nothing of it. */
        PQfinish(cr->c);
        free(cr);
        return;
    }
    if (s->th_live) {
        pthread_join(s->th, NULL);
        s->th_live = 0;
    }
    if (cr->c && !(s->io = wsapp_io_new(app, PQsocket(cr->c), on_io, s))) {
        PQfinish(cr->c);
        cr->c = NULL;
    }
    if (!cr->c) {
        s->state = ST_DOWN;
        wsapp_timer_set(s->retry, backoff_next_ms(&s->bo));
    } else {
        s->c = cr->c;
        s->state = ST_IDLE;
        backoff_reset(&s->bo);
        kick(s);
    }
    free(cr);
}

/* ------------------------------------------------------------ answers */

/* The Khala message of row `row`'s append, in column col (NULL unless it
 * appended to a topic that some instance listens to): this instance's
 * subscribers get it now, the commit being done. */
static void message_out(rtpipe *p, const PGresult *res, int row, int col)
{
    if (p->on_message && PQnfields(res) > col && !PQgetisnull(res, row, col))
        p->on_message(p->message_ud, PQgetvalue(res, row, col));
}

static void complete(item *it)
{
    it->fn(it->ud, 1);
    rtappend_free(it->x);
    free(it);
}

/* Answers it 503; the caller logged why, once for every item it fails. */
static void fail_item(item *it)
{
    rtappend_fail(it->x);
    complete(it);
}

/* Puts items back at the head of the queue, in their order, to run alone. */
static void requeue_alone(slot *s, item **v, int n)
{
    int i;

    for (i = n - 1; i >= 0; i--) {
        v[i]->alone = 1;
        v[i]->next = s->head;
        s->head = v[i];
        if (!s->tail)
            s->tail = v[i];
        s->queued++;
    }
}

/* The connection broke: what was in flight may or may not have committed,
 * and what is queued waits for nothing that will come soon: all 503. */
static void broken(slot *s, const char *why)
{
    item *it;
    int i;

    log_warn("runtime: an append connection broke (%s); reconnecting", why);
    PQclear(s->res);
    s->res = NULL;
    for (i = 0; i < s->nfl; i++)
        fail_item(s->fl[i]);
    s->nfl = 0;
    while ((it = s->head) != NULL) {
        s->head = it->next;
        fail_item(it);
    }
    s->tail = NULL;
    s->queued = 0;
    wsapp_io_free(s->io);
    s->io = NULL;
    PQfinish(s->c);
    s->c = NULL;
    s->state = ST_DOWN;
    wsapp_timer_set(s->retry, backoff_next_ms(&s->bo));
}

/* Row i's ordinal (1..n) as an index, or -1. */
static int row_index(const PGresult *res, int i, int n, int *seen)
{
    long k = strtol(PQgetvalue(res, i, 0), NULL, 10) - 1;

    if (k < 0 || k >= n || seen[k])
        return -1;
    seen[k] = 1;
    return (int)k;
}

static void finish_group(slot *s, PGresult *res)
{
    rt *r = s->p->r;
    int n = s->nfl, i, nretry = 0, seen[RTAPPEND_GROUP_MAX] = {0}, idx[RTAPPEND_GROUP_MAX];
    item *retry[RTAPPEND_GROUP_MAX];

    if (PQntuples(res) != n)
        goto bad;
    for (i = 0; i < n; i++)
        if ((idx[i] = row_index(res, i, n, seen)) < 0)
            goto bad;
    metrics_counter_inc(r->append_commits);
    for (i = 0; i < n; i++) {
        item *it = s->fl[idx[i]];

        if (strcmp(PQgetvalue(res, i, 1), "retry") == 0) {
            retry[nretry++] = it;
            s->fl[idx[i]] = NULL;
            continue;
        }
        message_out(s->p, res, i, RTAPPEND_SET_NOTE);
        rtappend_answer(r, it->x, NULL, res, i, 1);
        s->fl[idx[i]] = NULL;
        complete(it);
    }
    s->nfl = 0;
    /* The rows come in group order, so a run's retried appends keep theirs. */
    requeue_alone(s, retry, nretry);
    return;
bad:
    /* Not one row per append: the group may have committed, so running it
     * again could append twice. */
    log_warn("runtime: a group of %d appends gave %d rows", n, PQntuples(res));
    for (i = 0; i < n; i++)
        fail_item(s->fl[i]);
    s->nfl = 0;
}

/* The round's result is in, and PQgetResult gave NULL after it: that
 * comes after ReadyForQuery, which the server sends once the statement's
 * transaction committed (the rows come before the commit), so what is
 * answered from here is durable. */
static void finish_round(slot *s)
{
    PGresult *res = s->res;
    int ok = res && PQresultStatus(res) == PGRES_TUPLES_OK;
    item *it;

    s->res = NULL;
    if (PQstatus(s->c) != CONNECTION_OK) {
        PQclear(res);
        broken(s, "connection lost");
        return;
    }
    s->state = ST_IDLE;
    if (!ok) {
        /* The server refused the statement and rolled it back: each
         * append runs again alone, unless it just did. */
        if (s->kind == Q_ONE) {
            log_warn("runtime: append to run %s failed: %s", rtappend_run(s->fl[0]->x),
                     res ? PQresultErrorMessage(res) : "no result");
            fail_item(s->fl[0]);
        } else {
            if (s->nfl > 1)
                log_warn("runtime: a group of %d appends was refused (each runs alone): %s", s->nfl,
                         res ? PQresultErrorMessage(res) : "no result");
            requeue_alone(s, s->fl, s->nfl);
        }
        s->nfl = 0;
        PQclear(res);
        kick(s);
        return;
    }
    if (s->kind == Q_SET || s->kind == Q_GROUP) {
        finish_group(s, res);
    } else if (s->kind == Q_FAST && PQntuples(res) == 0) {
        /* Not appended: append_run_event says why (or appends it). */
        requeue_alone(s, s->fl, 1);
        s->nfl = 0;
    } else if (PQntuples(res) != 1) {
        log_warn("runtime: append to run %s gave %d rows", rtappend_run(s->fl[0]->x), PQntuples(res));
        fail_item(s->fl[0]);
        s->nfl = 0;
    } else {
        it = s->fl[0];
        s->nfl = 0;
        metrics_counter_inc(s->p->r->append_commits);
        if (s->kind == Q_FAST)
            message_out(s->p, res, 0, RTAPPEND_FAST_NOTE);
        rtappend_answer(s->p->r, it->x, NULL, res, 0, 0);
        complete(it);
    }
    PQclear(res);
    kick(s);
}

static void drain(slot *s)
{
    PGresult *res;

    while (s->state == ST_BUSY && !PQisBusy(s->c)) {
        if (!(res = PQgetResult(s->c))) {
            finish_round(s);
            return;
        }
        if (!s->res)
            s->res = res;
        else
            PQclear(res);
    }
}

static void on_io(wsapp_io *io, int readable, int writable, void *ud)
{
    slot *s = ud;
    int f;

    if (writable) {
        if ((f = PQflush(s->c)) < 0) {
            broken(s, PQerrorMessage(s->c));
            return;
        }
        if (f == 0)
            wsapp_io_want_write(io, 0);
    }
    if (readable && !PQconsumeInput(s->c)) {
        broken(s, PQerrorMessage(s->c));
        return;
    }
    if (s->state == ST_BUSY)
        drain(s);
    else if (PQstatus(s->c) != CONNECTION_OK)
        broken(s, "connection lost while idle");
}

/* ------------------------------------------------------------ sending */

static void kick(slot *s)
{
    const char *p[5];
    char *text = NULL;
    rt_append *v[RTAPPEND_GROUP_MAX];
    item *it;
    int n = 0, sent, f;

    if (s->state != ST_IDLE || !s->head)
        return;
    if (s->head->alone) {
        s->fl[n++] = s->head;
        s->head = s->head->next;
    } else {
        while (s->head && !s->head->alone && n < RTAPPEND_GROUP_MAX) {
            it = s->head;
            s->head = it->next;
            s->fl[n++] = it;
        }
    }
    if (!s->head)
        s->tail = NULL;
    s->queued -= n;
    s->nfl = n;
    for (f = 0; f < n; f++)
        v[f] = s->fl[f]->x;
    if (n == 1) {
        s->kind = s->fl[0]->alone || !rtappend_common(s->fl[0]->x) ? Q_ONE : Q_FAST;
        rtappend_params(s->fl[0]->x, p);
        sent = PQsendQueryPrepared(s->c, s->kind == Q_FAST ? "f" : "o", s->kind == Q_FAST ? 4 : 5, p, NULL, NULL, 0);
    } else {
        s->kind = rtappend_set_fits(v, n) ? Q_SET : Q_GROUP;
        text = rtappend_group_json(v, n, s->kind == Q_SET);
        if (!text) {
            log_warn("runtime: no memory for a group of %d appends", n);
            for (f = 0; f < n; f++)
                fail_item(s->fl[f]);
            s->nfl = 0;
            return;
        }
        p[0] = text;
        sent = PQsendQueryPrepared(s->c, s->kind == Q_SET ? "s" : "g", 1, p, NULL, NULL, 0);
        free(text);
    }
    s->state = ST_BUSY;
    if (!sent) {
        broken(s, PQerrorMessage(s->c));
        return;
    }
    if ((f = PQflush(s->c)) < 0)
        broken(s, PQerrorMessage(s->c));
    else if (f == 1)
        wsapp_io_want_write(s->io, 1);
}

/* ------------------------------------------------------------ the pipe */

rtpipe *rtpipe_new(rt *r, wsapp *app, const char *conninfo, int conns, rtpipe_message_fn on_message, void *ud)
{
    rtpipe *p = calloc(1, sizeof(*p));
    int i;

    if (!p)
        return NULL;
    p->r = r;
    p->app = app;
    p->on_message = on_message;
    p->message_ud = ud;
    p->n = conns < 1 ? 1 : conns > RTPIPE_CONNS_MAX ? RTPIPE_CONNS_MAX : conns;
    fmt_copy(p->conninfo, sizeof(p->conninfo), conninfo);
    for (i = 0; i < p->n; i++) {
        p->s[i].p = p;
        backoff_init(&p->s[i].bo, 100, 5000);
        if (!(p->s[i].retry = wsapp_timer_new(app, retry_fire, &p->s[i]))) {
            rtpipe_free(p);
            return NULL;
        }
    }
    return p;
}

int rtpipe_start(rtpipe *p)
{
    int i;

    for (i = 0; i < p->n; i++)
        connect_start(&p->s[i]);
    return 0;
}

int rtpipe_up(const rtpipe *p)
{
    int i;

    for (i = 0; p && i < p->n; i++)
        if (p->s[i].state == ST_IDLE || p->s[i].state == ST_BUSY)
            return 1;
    return 0;
}

int rtpipe_submit(rtpipe *p, rt_append *x, rtpipe_done_fn fn, void *ud)
{
    int i, k;
    slot *s = NULL;
    item *it;

    if (!p)
        return -1;
    k = (int)(hash_fnv1a_str_ci(rtappend_run(x)) % (unsigned)p->n);
    for (i = 0; i < p->n && !s; i++) {
        slot *t = &p->s[(k + i) % p->n];

        if (t->state == ST_IDLE || t->state == ST_BUSY)
            s = t;
    }
    if (!s || s->queued >= RTPIPE_QUEUE_MAX || !(it = calloc(1, sizeof(*it))))
        return -1;
    it->x = x;
    it->fn = fn;
    it->ud = ud;
    if (s->tail)
        s->tail->next = it;
    else
        s->head = it;
    s->tail = it;
    s->queued++;
    kick(s);
    return 0;
}

static void drop(item *it)
{
    it->fn(it->ud, 0);
    rtappend_free(it->x);
    free(it);
}

void rtpipe_free(rtpipe *p)
{
    int i, j;
    item *it;

    if (!p)
        return;
    for (i = 0; i < p->n; i++) {
        slot *s = &p->s[i];

        if (s->th_live)
            pthread_join(s->th, NULL);
        for (j = 0; j < s->nfl; j++)
            drop(s->fl[j]);
        while ((it = s->head) != NULL) {
            s->head = it->next;
            drop(it);
        }
        PQclear(s->res);
        wsapp_io_free(s->io);
        PQfinish(s->c);
        wsapp_timer_free(s->retry);
    }
    free(p);
}
