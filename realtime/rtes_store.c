#include "rtes_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "buf.h"
#include "dbpool.h"
#include "fmt.h"
#include "pgarr.h"

static const char sql_events[] =
    "SELECT ord, seq FROM rtes_put_events($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::json[])";
static const char sql_initiated[] =
    "SELECT rtes_put_initiated($1, $2, $3, m->'workflow_definition', m->'accumulated_context') "
    "FROM (SELECT $4::jsonb AS m) AS x";

/* Classifies a failed result: a refused value (class 22: data exception;
 * 23: integrity, which a redelivery racing its first copy can raise, is
 * retried instead) or anything else. */
static int classify(const PGresult *r)
{
    const char *st = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

    if (st && strncmp(st, "22", 2) == 0)
        return RTES_STORE_DATA;
    return RTES_STORE_RETRY;
}

static void describe(PGconn *c, const PGresult *r, char *err, size_t errlen)
{
    const char *st = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *msg = r ? PQresultErrorMessage(r) : PQerrorMessage(c);
    size_t n;

    snprintf(err, errlen, "%s: %s", st ? st : "08006", msg && *msg ? msg : "connection lost");
    n = strlen(err);
    while (n > 0 && (err[n - 1] == '\n' || err[n - 1] == ' '))
        err[--n] = '\0';
}

/* The six array literals of a burst's events. */
typedef struct {
    buf a[6];
} arrays;

static int add_event(arrays *x, const rtes_msg *m)
{
    char hex[2 + 2 * RTES_DIGEST_LEN + 1];
    int node = m->kind == RTES_NODE_STATUS;

    /* bytea's hex input form. */
    hex[0] = '\\';
    hex[1] = 'x';
    fmt_hex(hex + 2, m->digest, RTES_DIGEST_LEN);
    return pgarr_add(&x->a[0], m->execution_id, 0) < 0 || pgarr_add(&x->a[1], m->workflow_id, 0) < 0 ||
                   pgarr_add(&x->a[2], node ? m->node_id : NULL, 0) < 0 ||
                   pgarr_add(&x->a[3], node ? m->lineage_key : NULL, 0) < 0 || pgarr_add(&x->a[4], hex, 0) < 0 ||
                   pgarr_add(&x->a[5], m->body, 0) < 0
               ? -1
               : 0;
}

/* Reads one statement's results (up to its NULL). Returns the status of
 * the failure, or PGRES_TUPLES_OK / COMMAND_OK; *res gets a TUPLES_OK
 * result for the caller to clear (else NULL). */
static int one_result(PGconn *c, PGresult **res, int *rc, char *err, size_t errlen)
{
    PGresult *r;
    int st = PGRES_FATAL_ERROR;

    *res = NULL;
    while ((r = PQgetResult(c)) != NULL) {
        st = PQresultStatus(r);
        if (st == PGRES_TUPLES_OK && !*res) {
            *res = r;
            continue;
        }
        if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_PIPELINE_ABORTED &&
            st != PGRES_PIPELINE_SYNC && *rc == RTES_STORE_OK) {
            describe(c, r, err, errlen);
            *rc = classify(r);
        }
        PQclear(r);
        if (st == PGRES_PIPELINE_SYNC)
            return st;
    }
    if (PQstatus(c) != CONNECTION_OK && *rc == RTES_STORE_OK) {
        describe(c, NULL, err, errlen);
        *rc = RTES_STORE_RETRY;
    }
    return st;
}

int rtes_store_batch(PGconn *c, rtes_msg *const *msgs, int n, rtes_stored *out, char *err, size_t errlen)
{
    arrays x;
    int *map = NULL, rc = RTES_STORE_RETRY, nev = 0, nstmt = 0, sent_events = 0;
    PGresult *r = NULL;

    if (n <= 0)
        return RTES_STORE_OK;
    memset(out, 0, sizeof(*out) * (size_t)n);
    for (int i = 0; i < 6; i++) {
        buf_init(&x.a[i], 8u * RTES_BODY_MAX * 64);
        buf_puts(&x.a[i], "{");
    }
    map = calloc((size_t)n, sizeof(*map));
    if (!map)
        goto oom;
    for (int i = 0; i < n; i++)
        if (msgs[i]->kind == RTES_NODE_STATUS || msgs[i]->kind == RTES_COMPLETION) {
            if (add_event(&x, msgs[i]) < 0)
                goto oom;
            map[nev++] = i;
        }
    for (int i = 0; i < 6; i++)
        if (buf_puts(&x.a[i], "}") < 0 || x.a[i].truncated)
            goto oom;
    if (!PQenterPipelineMode(c)) {
        describe(c, NULL, err, errlen);
        goto out;
    }
    if (nev) {
        const char *p[6];

        for (int i = 0; i < 6; i++)
            p[i] = buf_str(&x.a[i]);
        if (!PQsendQueryParams(c, sql_events, 6, NULL, p, NULL, NULL, 0))
            goto send_failed;
        sent_events = 1;
        nstmt++;
    }
    for (int i = 0; i < n; i++) {
        const rtes_msg *m = msgs[i];
        const char *p[4];

        /* A completion's fields go on its execution row with its event
         * (rtes_put_events, 0021); an initiation is a statement of its own. */
        if (m->kind == RTES_INITIATED) {
            p[0] = m->execution_id;
            p[1] = m->workflow_id;
            p[2] = m->node_id;
            p[3] = m->body;
            if (!PQsendQueryParams(c, sql_initiated, 4, NULL, p, NULL, NULL, 0))
                goto send_failed;
            nstmt++;
        }
    }
    if (!PQpipelineSync(c))
        goto send_failed;
    rc = RTES_STORE_OK;
    for (int k = 0; k < nstmt; k++) {
        PGresult *res;

        one_result(c, &res, &rc, err, errlen);
        if (k == 0 && sent_events)
            r = res;
        else
            PQclear(res);
    }
    /* The sync's own result. */
    {
        PGresult *res = NULL;
        int st;

        int guard = 0;

        do {
            st = one_result(c, &res, &rc, err, errlen);
            PQclear(res);
        } while (st != PGRES_PIPELINE_SYNC && PQstatus(c) == CONNECTION_OK && ++guard < 1000);
    }
    if (!PQexitPipelineMode(c)) {
        /* Results are still pending: the connection cannot be trusted
         * again. Shutting its socket makes the pool drop it. */
        if (rc == RTES_STORE_OK) {
            describe(c, NULL, err, errlen);
            rc = RTES_STORE_RETRY;
        }
        shutdown(PQsocket(c), SHUT_RDWR);
    }
    if (rc == RTES_STORE_OK && r) {
        for (int i = 0; i < PQntuples(r); i++) {
            long long ord = strtoll(PQgetvalue(r, i, 0), NULL, 10);

            if (ord >= 1 && ord <= nev)
                out[map[ord - 1]].seq = strtoll(PQgetvalue(r, i, 1), NULL, 10);
        }
    }
    if (rc != RTES_STORE_OK)
        memset(out, 0, sizeof(*out) * (size_t)n);
    goto out;
send_failed:
    describe(c, NULL, err, errlen);
    PQexitPipelineMode(c);
    rc = RTES_STORE_RETRY;
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
    rc = RTES_STORE_RETRY;
out:
    PQclear(r);
    for (int i = 0; i < 6; i++)
        buf_free(&x.a[i]);
    free(map);
    return rc;
}

/* The events after `after`; with the execution's workflow id in column 0
 * when the caller asks for it, so that a first read is one round trip: one
 * row with NULL event columns for an execution without events, none for an
 * unknown one. */
static const char sql_events_read[] =
    "SELECT NULL, seq, node_id IS NOT NULL, lineage_key, msg FROM rtes_events "
    "WHERE execution_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4";
static const char sql_events_read_wid[] =
    "SELECT x.workflow_id, e.seq, e.node_id IS NOT NULL, e.lineage_key, e.msg FROM rtes_executions x "
    "LEFT JOIN LATERAL (SELECT seq, node_id, lineage_key, msg FROM rtes_events "
    "WHERE execution_id = x.execution_id AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4) e ON true "
    "WHERE x.execution_id = $1";

int rtes_store_events(PGconn *c, const char *eid, long long after, long long upto, int limit, char *wid,
                      rtes_event_fn fn, void *ud, int *count, char *err, size_t errlen)
{
    char a[FMT_I64_MAX], u[FMT_I64_MAX], l[FMT_I64_MAX];
    const char *p[4] = {eid, a, u, l};
    PGresult *r;
    int n, done = 0, rc = 0;
    buf f;

    fmt_i64(a, after);
    fmt_i64(u, upto > 0 ? upto : 0x7fffffffffffffffLL);
    fmt_i64(l, limit > 0 ? limit : 1000);
    if (count)
        *count = 0;
    if (wid)
        wid[0] = '\0';
    r = dbpool_exec(c, wid ? sql_events_read_wid : sql_events_read, 4, p, err, errlen);
    if (!r)
        return -1;
    n = PQntuples(r);
    if (wid && n > 0)
        fmt_copy(wid, RTES_ID_MAX, PQgetvalue(r, 0, 0));
    buf_init(&f, 4 * RTES_BODY_MAX);
    for (int i = 0; i < n; i++) {
        if (PQgetisnull(r, i, 1))
            continue; /* the execution's row, without events */
        buf_reset(&f);
        if (rtes_msg_frame(PQgetvalue(r, i, 2)[0] == 't', PQgetvalue(r, i, 4), (size_t)PQgetlength(r, i, 4),
                           PQgetvalue(r, i, 3), &f) < 0 || f.truncated) {
            snprintf(err, errlen, "event %s of %s: cannot build its frame", PQgetvalue(r, i, 1), eid);
            rc = -1;
            break;
        }
        done++;
        if (fn(strtoll(PQgetvalue(r, i, 1), NULL, 10), buf_str(&f), f.len, ud))
            break;
    }
    buf_free(&f);
    if (count)
        *count = done;
    PQclear(r);
    return rc;
}

int rtes_store_document(PGconn *c, const char *eid, char **doc, char *wid, char *err, size_t errlen)
{
    const char *p[1] = {eid};
    PGresult *r = dbpool_exec(c,
                              "SELECT rtes_execution_doc(execution_id), workflow_id FROM rtes_executions "
                              "WHERE execution_id = $1",
                              1, p, err, errlen);
    int found;

    *doc = NULL;
    wid[0] = '\0';
    if (!r)
        return -1;
    found = PQntuples(r) == 1;
    if (found) {
        *doc = strdup(PQgetvalue(r, 0, 0));
        fmt_copy(wid, RTES_ID_MAX, PQgetvalue(r, 0, 1));
        if (!*doc) {
            snprintf(err, errlen, "out of memory");
            found = -1;
        }
    }
    PQclear(r);
    return found;
}
