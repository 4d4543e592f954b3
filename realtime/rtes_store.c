#include "rtes_store.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dbpool.h"
#include "fmt.h"

static const char sql_event[] =
    "SELECT o_seq, o_frame FROM rtes_put_event($1, $2, $3, $4, $5::bytea, $6::jsonb)";
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

/* Sends message m's statement into the pipeline. hex holds the digest's
 * bytea text (2 + 2 * RTES_DIGEST_LEN + 1 bytes). */
static int send_one(PGconn *c, const rtes_msg *m, char *hex)
{
    static const char digits[] = "0123456789abcdef";
    const char *p[6];

    if (m->kind == RTES_INITIATED) {
        p[0] = m->execution_id;
        p[1] = m->workflow_id;
        p[2] = m->node_id;
        p[3] = m->body;
        return PQsendQueryParams(c, sql_initiated, 4, NULL, p, NULL, NULL, 0) ? 0 : -1;
    }
    hex[0] = '\\';
    hex[1] = 'x';
    for (int i = 0; i < RTES_DIGEST_LEN; i++) {
        hex[2 + 2 * i] = digits[m->digest[i] >> 4];
        hex[3 + 2 * i] = digits[m->digest[i] & 15];
    }
    hex[2 + 2 * RTES_DIGEST_LEN] = '\0';
    p[0] = m->execution_id;
    p[1] = m->workflow_id;
    p[2] = m->kind == RTES_NODE_STATUS ? m->node_id : NULL;
    p[3] = m->kind == RTES_NODE_STATUS ? m->lineage_key : NULL;
    p[4] = hex;
    p[5] = m->body;
    return PQsendQueryParams(c, sql_event, 6, NULL, p, NULL, NULL, 0) ? 0 : -1;
}

/* Reads results until the pipeline's sync. */
static int drain(PGconn *c, rtes_msg *const *msgs, int n, rtes_stored *out, char *err, size_t errlen)
{
    int rc = RTES_STORE_OK, i = 0;
    PGresult *r;

    for (;;) {
        r = PQgetResult(c);
        if (!r) {
            /* End of one statement's results; a NULL with the connection
             * gone means no sync will come. */
            if (PQstatus(c) != CONNECTION_OK) {
                if (rc == RTES_STORE_OK) {
                    describe(c, NULL, err, errlen);
                    rc = RTES_STORE_RETRY;
                }
                return rc;
            }
            continue;
        }
        switch (PQresultStatus(r)) {
        case PGRES_PIPELINE_SYNC:
            PQclear(r);
            return rc;
        case PGRES_TUPLES_OK:
            if (i < n && msgs[i]->kind != RTES_INITIATED && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0)) {
                const char *s = PQgetvalue(r, 0, 0);

                out[i].seq = strtoll(s, NULL, 10);
                if (!PQgetisnull(r, 0, 1))
                    out[i].frame = strdup(PQgetvalue(r, 0, 1));
                if (!out[i].frame && rc == RTES_STORE_OK) {
                    snprintf(err, errlen, "out of memory");
                    rc = RTES_STORE_RETRY;
                }
            }
            i++;
            break;
        case PGRES_PIPELINE_ABORTED:
            i++;
            break;
        default:
            if (rc == RTES_STORE_OK) {
                describe(c, r, err, errlen);
                rc = classify(r);
            }
            i++;
            break;
        }
        PQclear(r);
    }
}

int rtes_store_batch(PGconn *c, rtes_msg *const *msgs, int n, rtes_stored *out, char *err, size_t errlen)
{
    char hex[2 + 2 * RTES_DIGEST_LEN + 1];
    rtes_msg **list = NULL;
    rtes_stored *res = NULL;
    int *map = NULL, rc = RTES_STORE_RETRY, k = 0, sent = 0;

    if (n <= 0)
        return RTES_STORE_OK;
    memset(out, 0, sizeof(*out) * (size_t)n);
    list = calloc((size_t)n, sizeof(*list));
    res = calloc((size_t)n, sizeof(*res));
    map = calloc((size_t)n, sizeof(*map));
    if (!list || !res || !map) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    /* Tokens live in Redis and take no statement: results are matched to
     * the compacted list. */
    for (int i = 0; i < n; i++)
        if (msgs[i]->kind != RTES_TOKEN) {
            map[k] = i;
            list[k++] = msgs[i];
        }
    if (k == 0) {
        rc = RTES_STORE_OK;
        goto out;
    }
    if (!PQenterPipelineMode(c)) {
        describe(c, NULL, err, errlen);
        goto out;
    }
    for (; sent < k; sent++)
        if (send_one(c, list[sent], hex) < 0)
            break;
    if (sent < k || !PQpipelineSync(c)) {
        describe(c, NULL, err, errlen);
        PQexitPipelineMode(c);
        goto out;
    }
    rc = drain(c, list, k, res, err, errlen);
    if (!PQexitPipelineMode(c) && rc == RTES_STORE_OK) {
        describe(c, NULL, err, errlen);
        rc = RTES_STORE_RETRY;
    }
    for (int i = 0; i < k; i++) {
        if (rc == RTES_STORE_OK)
            out[map[i]] = res[i];
        else
            free(res[i].frame);
    }
out:
    free(list);
    free(res);
    free(map);
    return rc;
}

int rtes_store_events(PGconn *c, const char *eid, long long after, long long upto, int limit,
                      rtes_event_fn fn, void *ud, int *count, char *err, size_t errlen)
{
    char a[FMT_I64_MAX], u[FMT_I64_MAX], l[FMT_I64_MAX];
    const char *p[4] = {eid, a, u, l};
    PGresult *r;
    int n, done = 0;

    fmt_i64(a, after);
    fmt_i64(u, upto > 0 ? upto : 0x7fffffffffffffffLL);
    fmt_i64(l, limit > 0 ? limit : 1000);
    r = dbpool_exec(c,
                    "SELECT seq, rtes_frame(msg, lineage_key) FROM rtes_events "
                    "WHERE execution_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
                    4, p, err, errlen);
    if (count)
        *count = 0;
    if (!r)
        return -1;
    n = PQntuples(r);
    for (int i = 0; i < n; i++) {
        done++;
        if (fn(strtoll(PQgetvalue(r, i, 0), NULL, 10), PQgetvalue(r, i, 1), (size_t)PQgetlength(r, i, 1), ud))
            break;
    }
    if (count)
        *count = done;
    PQclear(r);
    return 0;
}

int rtes_store_head(PGconn *c, const char *eid, long long *last, char *wid, char *err, size_t errlen)
{
    const char *p[1] = {eid};
    PGresult *r = dbpool_exec(c, "SELECT last_seq, workflow_id FROM rtes_executions WHERE execution_id = $1", 1,
                              p, err, errlen);
    int found;

    *last = 0;
    wid[0] = '\0';
    if (!r)
        return -1;
    found = PQntuples(r) == 1;
    if (found) {
        *last = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        fmt_copy(wid, RTES_ID_MAX, PQgetvalue(r, 0, 1));
    }
    PQclear(r);
    return found;
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
