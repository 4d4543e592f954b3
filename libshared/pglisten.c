#include "pglisten.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "backoff.h"
#include "dbpool.h"
#include "log.h"
#include "svc.h"

#define PGLISTEN_MAX_CHANNELS 8
#define PGLISTEN_TICK_MS 250
#define PGLISTEN_PING_MS 30000

struct pglisten {
    char *conninfo;
    char name[64];
    char *channels[PGLISTEN_MAX_CHANNELS + 1];
    pglisten_fn fn;
    void *ud;
    PGconn *conn;
    backoff bo;
    pthread_t th;
    atomic_int up, stop;
    atomic_long ping_ms;
    long long quiet_since; /* when the connection last sent anything (monotonic ms) */
    long long ping_sent;   /* when the SELECT 1 still unanswered went out; 0: none */
};

/* Sleeps up to ms in ticks; returns nonzero once a stop is requested. */
static int pglisten_nap(pglisten *l, long ms)
{
    while (ms > 0 && !atomic_load(&l->stop)) {
        long step = ms < PGLISTEN_TICK_MS ? ms : PGLISTEN_TICK_MS;

        poll(NULL, 0, (int)step);
        ms -= step;
    }
    return atomic_load(&l->stop);
}

static void pglisten_drop(pglisten *l, const char *what)
{
    char msg[256], esc[512];

    snprintf(msg, sizeof(msg), "%s", l->conn ? PQerrorMessage(l->conn) : "");
    msg[strcspn(msg, "\n")] = '\0';
    if (atomic_exchange(&l->up, 0) || l->bo.attempt == 0)
        log_event(LOG_WARN, what, "\"listener\":\"%s\",\"error\":\"%s\"", l->name, log_escape(esc, sizeof(esc), msg));
    PQfinish(l->conn);
    l->conn = NULL;
}

/* Connects and issues LISTEN for every channel. Returns 0 or -1. */
static int pglisten_open(pglisten *l)
{
    char err[256];

    if (!(l->conn = dbpool_connect(l->conninfo, l->name, err, sizeof(err)))) {
        char esc[512];

        err[strcspn(err, "\n")] = '\0';
        if (l->bo.attempt == 0)
            log_event(LOG_WARN, "LISTEN connection failed", "\"listener\":\"%s\",\"error\":\"%s\"", l->name,
                      log_escape(esc, sizeof(esc), err));
        return -1;
    }
    for (int i = 0; l->channels[i]; i++) {
        char *id = PQescapeIdentifier(l->conn, l->channels[i], strlen(l->channels[i]));
        char sql[160];
        PGresult *res;
        int ok;

        if (!id) {
            pglisten_drop(l, "LISTEN failed");
            return -1;
        }
        snprintf(sql, sizeof(sql), "LISTEN %s", id);
        PQfreemem(id);
        res = PQexec(l->conn, sql);
        ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
        if (!ok) {
            pglisten_drop(l, "LISTEN failed");
            return -1;
        }
    }
    backoff_reset(&l->bo);
    l->quiet_since = svc_now_ms();
    l->ping_sent = 0;
    l->fn(l->ud, NULL, NULL);
    atomic_store(&l->up, 1);
    log_event(LOG_INFO, "listening", "\"listener\":\"%s\"", l->name);
    return 0;
}

/* A connection that went quiet for ping_ms gets a SELECT 1, which must
 * be answered within ping_ms too: TCP keepalives see a vanished host, not
 * a server whose backend stopped (stuck, stopped, a half-dead proxy) while
 * its kernel still acknowledges. Returns -1 when the connection is to be
 * dropped. */
static int pglisten_ping(pglisten *l, long long now)
{
    long every = atomic_load(&l->ping_ms);

    if (l->ping_sent)
        return now - l->ping_sent > every ? -1 : 0;
    if (now - l->quiet_since < every)
        return 0;
    if (!PQsendQuery(l->conn, "SELECT 1"))
        return -1;
    l->ping_sent = now;
    return 0;
}

/* Reads the ping's answer once whole. Returns -1 on a failed ping. */
static int pglisten_ping_answer(pglisten *l)
{
    PGresult *res;
    int ok = 1;

    while (!PQisBusy(l->conn)) {
        if (!(res = PQgetResult(l->conn))) {
            l->ping_sent = 0;
            return ok ? 0 : -1;
        }
        ok &= PQresultStatus(res) == PGRES_TUPLES_OK;
        PQclear(res);
    }
    return 0;
}

/* Waits for and hands over notifications. Returns -1 when the connection
 * broke or stopped answering. */
static int pglisten_pump(pglisten *l)
{
    struct pollfd pfd = {PQsocket(l->conn), POLLIN, 0};
    PGnotify *n;
    int rc;

    if (pfd.fd < 0 || (rc = poll(&pfd, 1, PGLISTEN_TICK_MS)) < 0)
        return -1;
    if (rc > 0) {
        l->quiet_since = svc_now_ms();
        if (!PQconsumeInput(l->conn) || PQstatus(l->conn) != CONNECTION_OK)
            return -1;
        if (l->ping_sent && pglisten_ping_answer(l) < 0)
            return -1;
    }
    while ((n = PQnotifies(l->conn)) != NULL) {
        l->fn(l->ud, n->relname, n->extra);
        PQfreemem(n);
    }
    return pglisten_ping(l, svc_now_ms());
}

static void *pglisten_main(void *arg)
{
    pglisten *l = arg;

    while (!atomic_load(&l->stop)) {
        if (!l->conn && pglisten_open(l) < 0) {
            if (pglisten_nap(l, backoff_next_ms(&l->bo)))
                break;
            continue;
        }
        if (pglisten_pump(l) < 0)
            pglisten_drop(l, l->ping_sent ? "LISTEN connection not answering" : "LISTEN connection lost");
    }
    atomic_store(&l->up, 0);
    PQfinish(l->conn);
    l->conn = NULL;
    return NULL;
}

pglisten *pglisten_new(const char *conninfo, const char *name, const char *const *channels, pglisten_fn fn,
                       void *ud)
{
    pglisten *l;
    int n = 0;

    if (!conninfo || !channels || !fn)
        return NULL;
    l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->conninfo = strdup(conninfo);
    if (!l->conninfo)
        goto fail;
    snprintf(l->name, sizeof(l->name), "%s", name ? name : "pglisten");
    for (; n < PGLISTEN_MAX_CHANNELS && channels[n]; n++)
        if (!(l->channels[n] = strdup(channels[n])))
            goto fail;
    l->fn = fn;
    l->ud = ud;
    atomic_init(&l->ping_ms, PGLISTEN_PING_MS);
    backoff_init(&l->bo, 100, 5000);
    if (pthread_create(&l->th, NULL, pglisten_main, l) != 0)
        goto fail;
    return l;
fail:
    for (int i = 0; i < n; i++)
        free(l->channels[i]);
    free(l->conninfo);
    free(l);
    return NULL;
}

void pglisten_set_ping(pglisten *l, long ms)
{
    if (l && ms > 0)
        atomic_store(&l->ping_ms, ms);
}

int pglisten_up(const pglisten *l)
{
    return l && atomic_load(&((pglisten *)l)->up);
}

void pglisten_free(pglisten *l)
{
    if (!l)
        return;
    atomic_store(&l->stop, 1);
    pthread_join(l->th, NULL);
    for (int i = 0; l->channels[i]; i++)
        free(l->channels[i]);
    free(l->conninfo);
    free(l);
}
