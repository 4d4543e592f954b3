#include "dbpool.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "backoff.h"
#include "log.h"
#include "redact.h"
#include "svc.h"

#define DBPOOL_ERR_MAX 512
#define DBPOOL_BACKOFF_BASE_MS 100
#define DBPOOL_BACKOFF_MAX_MS 5000
/* Upper bound for one connect attempt, as libpq's connect_timeout=5. */
#define DBPOOL_CONNECT_TIMEOUT_MS 5000

struct dbpool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *conninfo;
    int max_conns;
    int total;   /* open connections, idle or handed out, plus connects in flight */
    int nidle;
    int waiting;
    PGconn **idle; /* a stack of max_conns slots; LIFO keeps hot connections hot */
    /* Shared back-off: after a failed connect, nobody connects before
     * retry_at_ms, and then only one probe at a time. */
    backoff bo;
    int down;
    int probing;
    long long retry_at_ms;
    unsigned long outcome_gen; /* bumped on every recorded connect outcome */
    char down_why[DBPOOL_ERR_MAX]; /* the last connect failure */
    char err[DBPOOL_ERR_MAX];
};

/* Copies a libpq message as one line: its embedded newlines and tabs
 * ("...failed: Connection refused\n\tIs the server running...") become
 * single spaces, and trailing space is dropped. */
static void copy_msg(char *dst, size_t len, const char *src)
{
    size_t o = 0;

    if (!dst || len == 0)
        return;
    for (const char *s = src ? src : ""; *s && o + 1 < len; s++) {
        char ch = (*s == '\n' || *s == '\r' || *s == '\t') ? ' ' : *s;

        if (ch == ' ' && (o == 0 || dst[o - 1] == ' '))
            continue;
        dst[o++] = ch;
    }
    while (o > 0 && dst[o - 1] == ' ')
        o--;
    dst[o] = '\0';
}

/* ---- conninfo from configuration ---- */

/* Appends keyword='value' with ' and \ escaped, as libpq's conninfo syntax
 * requires. Returns -1 when it does not fit. */
static int append_kv(char *out, size_t outlen, size_t *used, const char *key, const char *val)
{
    size_t o = *used;
    int n = snprintf(out + o, outlen - o, "%s%s='", o ? " " : "", key);

    if (n < 0 || (size_t)n >= outlen - o)
        return -1;
    o += (size_t)n;
    for (const char *s = val; *s; s++) {
        if (*s == '\'' || *s == '\\') {
            if (o + 1 >= outlen)
                return -1;
            out[o++] = '\\';
        }
        if (o + 1 >= outlen)
            return -1;
        out[o++] = *s;
    }
    if (o + 2 > outlen)
        return -1;
    out[o++] = '\'';
    out[o] = '\0';
    *used = o;
    return 0;
}

/* Checks every port of a parsed conninfo (a comma list for multi-host). */
static int ports_ok(const char *ports)
{
    const char *s = ports;

    while (*s) {
        char *end;
        long v;

        errno = 0;
        v = strtol(s, &end, 10);
        if (errno || end == s || v < 1 || v > 65535 || (*end && *end != ','))
            return 0;
        s = *end ? end + 1 : end;
    }
    return 1;
}

static int conninfo_from_url(cfg *c, const char *url, char *out, size_t outlen)
{
    char *perr = NULL, shown[512], expected[768];
    PQconninfoOption *opts = PQconninfoParse(url, &perr);
    int bad_port = 0;

    if (opts) {
        for (PQconninfoOption *o = opts; o->keyword; o++)
            if (strcmp(o->keyword, "port") == 0 && o->val && *o->val && !ports_ok(o->val))
                bad_port = 1;
        PQconninfoFree(opts);
    }
    if (!opts || bad_port) {
        char why[400];

        copy_msg(why, sizeof(why), perr ? perr : "a port from 1 to 65535");
        redact_url(shown, sizeof(shown), url);
        snprintf(expected, sizeof(expected),
                 "a PostgreSQL URL postgresql://user:password@host:port/dbname or a key=value conninfo (%s)",
                 why);
        cfg_error(c, "DATABASE_URL", shown, expected);
        PQfreemem(perr);
        return -1;
    }
    if (strlen(url) >= outlen) {
        cfg_error(c, "DATABASE_URL", "(too long, not shown)", "a shorter URL");
        return -1;
    }
    snprintf(out, outlen, "%s", url);
    return 0;
}

int dbpool_conninfo_from_cfg(cfg *c, char *out, size_t outlen)
{
    const char *url, *host, *name, *user, *pass, *rawport;
    char portbuf[16];
    size_t used = 0;
    long port;
    int rc = 0;

    if (!c || !out || outlen == 0)
        return -1;
    out[0] = '\0';
    url = cfg_str(c, "DATABASE_URL", NULL);
    if (url) {
        if (conninfo_from_url(c, url, out, outlen) < 0) {
            out[0] = '\0';
            return -1;
        }
        return 0;
    }
    host = cfg_str(c, "DB_HOST", "localhost");
    name = cfg_str(c, "DB_NAME", "erc8004_backend");
    user = cfg_str(c, "DB_USER", NULL);
    pass = cfg_str(c, "DB_PASSWORD", NULL);
    rawport = cfg_str(c, "DB_PORT", NULL);
    /* -1 is outside the accepted range, so it tells "bad" from "unset". */
    port = cfg_int(c, "DB_PORT", -1, 1, 65535);
    if (port == -1) {
        if (rawport)
            rc = -1;
        port = 5432;
    }
    snprintf(portbuf, sizeof(portbuf), "%ld", port);
    if (append_kv(out, outlen, &used, "host", host) < 0 ||
        append_kv(out, outlen, &used, "port", portbuf) < 0 ||
        append_kv(out, outlen, &used, "dbname", name) < 0 ||
        (user && append_kv(out, outlen, &used, "user", user) < 0) ||
        (pass && append_kv(out, outlen, &used, "password", pass) < 0)) {
        cfg_error(c, "DB_HOST", host, "DB_* values short enough for the connection string");
        rc = -1;
    }
    if (rc < 0)
        out[0] = '\0';
    return rc;
}

/* ---- the pool ---- */

/* One line when a service creates its pool (at start) saying which database
 * it uses, secrets masked. */
static void dbpool_log_target(const char *conninfo)
{
    char shown[1024], esc[2048];

    log_event(LOG_INFO, "database", "\"url\":\"%s\"",
              log_escape(esc, sizeof(esc), redact_url(shown, sizeof(shown), conninfo)));
}

dbpool *dbpool_new(const char *conninfo, int max_conns)
{
    dbpool *p;
    pthread_condattr_t ca;

    if (!conninfo || max_conns < 1)
        return NULL;
    p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->conninfo = strdup(conninfo);
    p->idle = calloc((size_t)max_conns, sizeof(*p->idle));
    if (!p->conninfo || !p->idle)
        goto fail;
    if (pthread_mutex_init(&p->mu, NULL) != 0)
        goto fail;
    /* Waits use the monotonic clock so that a wall-clock jump neither cuts
     * them short nor stretches them. */
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    if (pthread_cond_init(&p->cv, &ca) != 0) {
        pthread_condattr_destroy(&ca);
        pthread_mutex_destroy(&p->mu);
        goto fail;
    }
    pthread_condattr_destroy(&ca);
    p->max_conns = max_conns;
    backoff_init(&p->bo, DBPOOL_BACKOFF_BASE_MS, DBPOOL_BACKOFF_MAX_MS);
    dbpool_log_target(conninfo);
    return p;
fail:
    free(p->idle);
    free(p->conninfo);
    free(p);
    return NULL;
}

void dbpool_free(dbpool *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->nidle; i++)
        PQfinish(p->idle[i]);
    if (p->total != p->nidle)
        log_event(LOG_WARN, "dbpool freed with connections still acquired", "\"acquired\":%d",
                  p->total - p->nidle);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->idle);
    free(p->conninfo);
    free(p);
}

static void set_err_locked(dbpool *p, const char *fmt, const char *detail)
{
    /* Truncation is fine here; testing the result says so to the compiler. */
    if (snprintf(p->err, sizeof(p->err), fmt, detail) < 0)
        p->err[0] = '\0';
}

static void notice_cb(void *arg, const char *message);

/* Opens one connection without blocking longer than `deadline_ms`
 * (monotonic) or DBPOOL_CONNECT_TIMEOUT_MS. The defaults come before
 * dbname so that the expanded conninfo overrides them. */
static PGconn *connect_one(const char *conninfo, const char *name, long long deadline_ms, char *err,
                           size_t errlen)
{
    /* A server that vanishes without a reset is noticed within a minute
     * when idle (keepalives) and 30 s after a write it never acknowledged
     * (tcp_user_timeout), not after the kernel's 2 hours or 15 minutes. */
    const char *const keys[] = {"connect_timeout", "keepalives", "keepalives_idle",
                                "keepalives_interval", "keepalives_count", "tcp_user_timeout",
                                "application_name", "dbname", NULL};
    const char *const vals[] = {"5", "1", "30", "10", "3", "30000", name ? name : program_invocation_short_name,
                                conninfo, NULL};
    long long cap = svc_now_ms() + DBPOOL_CONNECT_TIMEOUT_MS;
    PGconn *conn;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;

    if (deadline_ms > cap)
        deadline_ms = cap;
    conn = PQconnectStartParams(keys, vals, 1);
    if (!conn) {
        copy_msg(err, errlen, "out of memory");
        return NULL;
    }
    if (PQstatus(conn) == CONNECTION_BAD)
        goto fail;
    /* Polling by hand (rather than PQconnectdb) bounds the attempt by the
     * caller's own timeout too. */
    while (st != PGRES_POLLING_OK) {
        struct pollfd pfd;
        long long left;
        int rc;

        if (st == PGRES_POLLING_FAILED)
            goto fail;
        left = deadline_ms - svc_now_ms();
        if (left <= 0) {
            copy_msg(err, errlen, "timeout expired while connecting");
            PQfinish(conn);
            return NULL;
        }
        pfd.fd = PQsocket(conn);
        pfd.events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT;
        pfd.revents = 0;
        rc = poll(&pfd, 1, (int)(left > INT32_MAX ? INT32_MAX : left));
        if (rc < 0 && errno != EINTR) {
            copy_msg(err, errlen, strerror(errno));
            PQfinish(conn);
            return NULL;
        }
        if (rc > 0)
            st = PQconnectPoll(conn);
    }
    PQsetNoticeProcessor(conn, notice_cb, NULL);
    return conn;
fail:
    copy_msg(err, errlen, PQerrorMessage(conn));
    PQfinish(conn);
    return NULL;
}

PGconn *dbpool_connect(const char *conninfo, const char *name, char *err, size_t errlen)
{
    return connect_one(conninfo, name, svc_now_ms() + DBPOOL_CONNECT_TIMEOUT_MS, err, errlen);
}

/* A cheap check of an idle connection without a round trip. An idle
 * connection gets no data except notifications and notices; a server that
 * went away (restart, crash, admin kill) sends a FATAL notice and closes the
 * socket. So: read whatever arrived (libpq keeps its socket non-blocking,
 * this never waits), and then look for EOF without consuming anything.
 * Returns 1 when the connection can be handed out. */
static int idle_conn_ok(PGconn *conn)
{
    struct pollfd pfd;
    PGnotify *n;
    char b;

    if (PQstatus(conn) != CONNECTION_OK || PQtransactionStatus(conn) != PQTRANS_IDLE)
        return 0;
    pfd.fd = PQsocket(conn);
    pfd.events = POLLIN;
    pfd.revents = 0;
    if (pfd.fd < 0)
        return 0;
    for (int i = 0; i < 4 && poll(&pfd, 1, 0) > 0; i++) {
        ssize_t got;

        if (pfd.revents & (POLLERR | POLLHUP | POLLNVAL))
            return 0;
        if (!PQconsumeInput(conn) || PQstatus(conn) != CONNECTION_OK)
            return 0;
        /* Parses what was read: notifications are dropped, notices go to
         * the notice processor. */
        while ((n = PQnotifies(conn)) != NULL)
            PQfreemem(n);
        got = recv(pfd.fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (got == 0)
            return 0; /* the server closed the connection */
        if (got < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    }
    return PQstatus(conn) == CONNECTION_OK;
}

/* Routes the server's notices (e.g. "terminating connection due to
 * administrator command") into the log instead of libpq's default of
 * printing them raw on stderr. */
static void notice_cb(void *arg, const char *message)
{
    char msg[1024], esc[2100];
    int warn = strncmp(message, "WARNING", 7) == 0 || strncmp(message, "FATAL", 5) == 0 ||
               strncmp(message, "ERROR", 5) == 0 || strncmp(message, "PANIC", 5) == 0;

    (void)arg;
    if (!log_enabled(warn ? LOG_WARN : LOG_DEBUG))
        return;
    copy_msg(msg, sizeof(msg), message);
    log_event(warn ? LOG_WARN : LOG_DEBUG, "database notice", "\"notice\":\"%s\"",
              log_escape(esc, sizeof(esc), msg));
}

/* Records the outcome of a connect started at generation `gen`. Only the
 * first outcome of a generation moves the back-off, so that several
 * connects failing together count (and log) as one step. */
static void connect_failed_locked(dbpool *p, unsigned long gen, const char *why)
{
    char esc[600];
    long delay;

    copy_msg(p->down_why, sizeof(p->down_why), why);
    set_err_locked(p, "database unavailable: %s", why);
    if (gen != p->outcome_gen && p->down)
        return;
    p->outcome_gen++;
    delay = backoff_next_ms(&p->bo);
    p->down = 1;
    p->retry_at_ms = svc_now_ms() + delay;
    log_event(LOG_WARN, "database unavailable", "\"attempt\":%d,\"retry_in_ms\":%ld,\"error\":\"%s\"",
              p->bo.attempt, delay, log_escape(esc, sizeof(esc), why));
}

static void connect_ok_locked(dbpool *p)
{
    p->outcome_gen++;
    if (p->down)
        log_event(LOG_INFO, "database connection restored", "\"failed_attempts\":%d", p->bo.attempt);
    p->down = 0;
    backoff_reset(&p->bo);
    p->err[0] = '\0';
}

static void abs_deadline(struct timespec *ts, long long deadline_ms)
{
    ts->tv_sec = (time_t)(deadline_ms / 1000);
    ts->tv_nsec = (long)(deadline_ms % 1000) * 1000000L;
}

PGconn *dbpool_acquire(dbpool *p, int timeout_ms)
{
    long long deadline, conn_deadline;
    PGconn *conn = NULL;

    if (!p)
        return NULL;
    deadline = svc_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->nidle > 0) {
            conn = p->idle[--p->nidle];
            if (idle_conn_ok(conn))
                goto out;
            /* Broken while idle: drop it and look further. */
            p->total--;
            PQfinish(conn);
            conn = NULL;
        }
        if (p->total < p->max_conns) {
            unsigned long gen;
            int probe = 0;
            char why[DBPOOL_ERR_MAX];
            long long now = svc_now_ms();

            if (p->down && (now < p->retry_at_ms || p->probing)) {
                /* Fail fast: someone else is probing or the window is open. */
                set_err_locked(p, "database unavailable (backing off): %s", p->down_why);
                goto out;
            }
            if (p->down) {
                p->probing = 1;
                probe = 1;
            }
            gen = p->outcome_gen;
            p->total++;
            pthread_mutex_unlock(&p->mu);
            /* The connect is bounded by the caller's deadline (and by
             * connect_one's 5 s cap); a caller that asked not to wait
             * (timeout <= 0) still lets one connect run its 5 s. */
            conn_deadline = timeout_ms > 0 ? deadline : now + DBPOOL_CONNECT_TIMEOUT_MS;
            conn = connect_one(p->conninfo, NULL, conn_deadline, why, sizeof(why));
            pthread_mutex_lock(&p->mu);
            if (probe)
                p->probing = 0;
            if (conn) {
                connect_ok_locked(p);
                goto out;
            }
            p->total--;
            connect_failed_locked(p, gen, why);
            /* Somebody waiting for a release may now open a slot itself. */
            pthread_cond_broadcast(&p->cv);
            goto out;
        }
        if (svc_now_ms() >= deadline) {
            char n[32];

            snprintf(n, sizeof(n), "%d", p->max_conns);
            set_err_locked(p, "timed out waiting for a free database connection (all %s in use)", n);
            goto out;
        }
        {
            struct timespec ts;

            abs_deadline(&ts, deadline);
            p->waiting++;
            pthread_cond_timedwait(&p->cv, &p->mu, &ts);
            p->waiting--;
        }
    }
out:
    pthread_mutex_unlock(&p->mu);
    return conn;
}

/* Brings a returned connection back to a clean idle state. Returns 0 when
 * it can be reused, -1 when it must be closed. */
static int reset_conn(PGconn *conn)
{
    PGnotify *n;
    PGresult *r;
    int ok;

    if (PQstatus(conn) != CONNECTION_OK)
        return -1;
    if (PQisnonblocking(conn))
        PQsetnonblocking(conn, 0);
    switch (PQtransactionStatus(conn)) {
    case PQTRANS_IDLE:
        break;
    case PQTRANS_INTRANS:
    case PQTRANS_INERROR:
        r = PQexec(conn, "ROLLBACK");
        ok = r && PQresultStatus(r) == PGRES_COMMAND_OK;
        PQclear(r);
        if (!ok || PQtransactionStatus(conn) != PQTRANS_IDLE)
            return -1;
        break;
    default:
        /* A command still running (results not drained) or an unknown
         * state: cancelling and draining is not worth the risk. */
        return -1;
    }
    while ((n = PQnotifies(conn)) != NULL)
        PQfreemem(n);
    return 0;
}

void dbpool_release(dbpool *p, PGconn *conn)
{
    int reuse;

    if (!p || !conn)
        return;
    reuse = reset_conn(conn) == 0;
    pthread_mutex_lock(&p->mu);
    if (reuse && p->nidle < p->max_conns) {
        p->idle[p->nidle++] = conn;
        conn = NULL;
    } else {
        p->total--;
    }
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    if (conn)
        PQfinish(conn);
}

int dbpool_ping(dbpool *p, int timeout_ms)
{
    char err[DBPOOL_ERR_MAX];

    if (!p)
        return -1;
    /* A second try only when the first connection turned out to be broken,
     * so that one stale connection does not report a healthy server down. */
    for (int attempt = 0; attempt < 2; attempt++) {
        PGconn *conn = dbpool_acquire(p, timeout_ms);
        PGresult *r;
        int broken;

        if (!conn)
            return -1;
        r = dbpool_exec(conn, "SELECT 1", 0, NULL, err, sizeof(err));
        broken = PQstatus(conn) != CONNECTION_OK;
        dbpool_release(p, conn);
        if (r) {
            PQclear(r);
            return 0;
        }
        pthread_mutex_lock(&p->mu);
        set_err_locked(p, "database ping failed: %s", err);
        pthread_mutex_unlock(&p->mu);
        if (!broken)
            break;
    }
    return -1;
}

const char *dbpool_errstr(dbpool *p, char *buf, size_t len)
{
    if (!buf || len == 0)
        return buf;
    if (!p) {
        buf[0] = '\0';
        return buf;
    }
    pthread_mutex_lock(&p->mu);
    snprintf(buf, len, "%s", p->err);
    pthread_mutex_unlock(&p->mu);
    return buf;
}

void dbpool_stats(dbpool *p, int *total, int *idle, int *waiting)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    if (total)
        *total = p->total;
    if (idle)
        *idle = p->nidle;
    if (waiting)
        *waiting = p->waiting;
    pthread_mutex_unlock(&p->mu);
}

int dbpool_degraded(dbpool *p)
{
    int down;

    if (!p)
        return 1;
    pthread_mutex_lock(&p->mu);
    down = p->down;
    pthread_mutex_unlock(&p->mu);
    return down;
}

/* Keeps r when it succeeded; else writes the reason into err, clears r and
 * returns NULL. */
static PGresult *exec_result(PGconn *conn, PGresult *r, char *err, size_t errlen)
{
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    char msg[DBPOOL_ERR_MAX];

    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
        return r;
    if (err && errlen) {
        const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
        const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;

        if (state && primary) {
            snprintf(err, errlen, "%s: %s", state, primary);
        } else if (PQstatus(conn) != CONNECTION_OK || !r) {
            copy_msg(msg, sizeof(msg), PQerrorMessage(conn));
            snprintf(err, errlen, "08006: %s", msg[0] ? msg : "connection lost");
        } else {
            copy_msg(msg, sizeof(msg), PQresultErrorMessage(r));
            snprintf(err, errlen, "XX000: %s (%s)", msg[0] ? msg : "unexpected result",
                     PQresStatus(st));
        }
    }
    PQclear(r);
    return NULL;
}

PGresult *dbpool_exec(PGconn *conn, const char *sql, int nparams, const char *const *params,
                      char *err, size_t errlen)
{
    if (!conn || !sql) {
        if (err && errlen)
            snprintf(err, errlen, "08003: no connection");
        return NULL;
    }
    return exec_result(conn, PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0), err, errlen);
}

PGresult *dbpool_exec_within(PGconn *conn, const char *sql, int nparams, const char *const *params, int timeout_ms,
                             char *err, size_t errlen)
{
    long long deadline = svc_now_ms() + timeout_ms;
    PGresult *r, *last = NULL;

    if (!conn || !sql) {
        if (err && errlen)
            snprintf(err, errlen, "08003: no connection");
        return NULL;
    }
    if (!PQsendQueryParams(conn, sql, nparams, NULL, params, NULL, NULL, 0))
        return exec_result(conn, NULL, err, errlen);
    for (;;) {
        while (PQisBusy(conn)) {
            struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
            long long left = deadline - svc_now_ms();
            int n;

            if (left <= 0) {
                PQclear(last);
                if (err && errlen)
                    snprintf(err, errlen, "57014: no answer within %d ms", timeout_ms);
                return NULL;
            }
            n = poll(&pfd, 1, (int)left);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 || (n > 0 && !PQconsumeInput(conn))) {
                PQclear(last);
                return exec_result(conn, NULL, err, errlen);
            }
        }
        r = PQgetResult(conn);
        if (!r)
            break;
        PQclear(last);
        last = r;
    }
    return exec_result(conn, last, err, errlen);
}

/* 26000: the statement is not prepared on this connection (a new one, or
 * one the server lost); 0A000: its plan went stale (a migration replaced
 * a function it calls). Both are mended by preparing it again. */
static int needs_prepare(const PGresult *r)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

    return state && (strcmp(state, "26000") == 0 || strcmp(state, "0A000") == 0);
}

PGresult *dbpool_exec_prepared(PGconn *conn, const char *name, const char *sql, int nparams,
                               const char *const *params, char *err, size_t errlen)
{
    PGresult *r;
    char dealloc[128];

    if (!conn || !sql || !name || strlen(name) > 63) {
        if (err && errlen)
            snprintf(err, errlen, "08003: no connection or bad statement name");
        return NULL;
    }
    r = PQexecPrepared(conn, name, nparams, params, NULL, NULL, 0);
    if (!needs_prepare(r))
        return exec_result(conn, r, err, errlen);
    PQclear(r);
    snprintf(dealloc, sizeof(dealloc), "DEALLOCATE \"%s\"", name);
    PQclear(PQexec(conn, dealloc));
    r = exec_result(conn, PQprepare(conn, name, sql, nparams, NULL), err, errlen);
    if (!r)
        return NULL;
    PQclear(r);
    return exec_result(conn, PQexecPrepared(conn, name, nparams, params, NULL, NULL, 0), err, errlen);
}
