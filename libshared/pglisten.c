#include "pglisten.h"

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "backoff.h"
#include "log.h"

#define PGLISTEN_MAX_CHANNELS 8
#define PGLISTEN_TICK_MS 250

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
    const char *keys[] = {"dbname", "application_name", "connect_timeout", NULL};
    const char *vals[] = {l->conninfo, l->name, "5", NULL};

    l->conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(l->conn) != CONNECTION_OK) {
        pglisten_drop(l, "LISTEN connection failed");
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
    l->fn(l->ud, NULL, NULL);
    atomic_store(&l->up, 1);
    log_event(LOG_INFO, "listening", "\"listener\":\"%s\"", l->name);
    return 0;
}

/* Waits for and hands over notifications. Returns -1 when the connection
 * broke. */
static int pglisten_pump(pglisten *l)
{
    struct pollfd pfd = {PQsocket(l->conn), POLLIN, 0};
    PGnotify *n;

    if (pfd.fd < 0 || poll(&pfd, 1, PGLISTEN_TICK_MS) < 0)
        return -1;
    if (!PQconsumeInput(l->conn) || PQstatus(l->conn) != CONNECTION_OK)
        return -1;
    while ((n = PQnotifies(l->conn)) != NULL) {
        l->fn(l->ud, n->relname, n->extra);
        PQfreemem(n);
    }
    return 0;
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
            pglisten_drop(l, "LISTEN connection lost");
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
