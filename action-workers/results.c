/* results: action_results rows, one per attempt, written in batches.
 *
 * Rows are keyed by (job_id, retry_count) (migration 0005): a job that is
 * delivered again after its worker died repeats an attempt number, and the
 * upsert keeps one row per attempt with the latest outcome instead of
 * failing the whole batch on a duplicate.
 *
 * A batch is one statement with ten array parameters, one per column,
 * expanded by unnest(). Unlike a multi-row VALUES list with ten parameters
 * per row, the statement text does not grow with the batch, so PostgreSQL
 * parses and plans the same small statement whatever the batch size. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aw.h"

#define COLS 10

static const char insert_sql[] =
    "INSERT INTO action_results (job_id, trigger_id, event_id, action_type, status, executed_at, "
    "duration_ms, error_message, response_data, retry_count) "
    "SELECT u.j, u.t, u.e, u.a, u.s, to_timestamp(u.x::double precision / 1000), u.d, u.m, u.r::jsonb, u.c "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::int[], "
    "$8::text[], $9::text[], $10::int[]) AS u(j, t, e, a, s, x, d, m, r, c) "
    "ON CONFLICT (job_id, retry_count) DO UPDATE SET status = EXCLUDED.status, "
    "executed_at = EXCLUDED.executed_at, duration_ms = EXCLUDED.duration_ms, "
    "error_message = EXCLUDED.error_message, response_data = EXCLUDED.response_data";

/* Appends one element of a text-format array literal: NULL, or the value
 * in double quotes with quotes and backslashes escaped. */
static int put_elem(buf *b, const char *s, int first)
{
    const char *p;

    if (!first && buf_append(b, ",", 1) < 0)
        return -1;
    if (!s)
        return buf_append(b, "NULL", 4);
    if (buf_append(b, "\"", 1) < 0)
        return -1;
    while ((p = strpbrk(s, "\"\\"))) {
        if (buf_append(b, s, (size_t)(p - s)) < 0 || buf_append(b, "\\", 1) < 0 || buf_append(b, p, 1) < 0)
            return -1;
        s = p + 1;
    }
    return buf_puts(b, s) < 0 || buf_append(b, "\"", 1) < 0 ? -1 : 0;
}

static int put_num(buf *b, long long v, int first)
{
    char tmp[32];
    int k = snprintf(tmp, sizeof(tmp), "%s%lld", first ? "" : ",", v);

    return buf_append(b, tmp, (size_t)k);
}

static int by_attempt(const void *a, const void *b)
{
    const job *x = *(job *const *)a, *y = *(job *const *)b;
    int c = strcmp(x->id, y->id);

    if (c)
        return c;
    if (x->attempt != y->attempt)
        return x->attempt < y->attempt ? -1 : 1;
    return x < y ? -1 : x > y;
}

int results_write(aw *app, job **jobs, int n, char *err, size_t errlen)
{
    buf cols[COLS];
    const char *params[COLS];
    job **sorted = NULL;
    PGconn *c = NULL;
    PGresult *r;
    int rc = -1, first = 1;

    if (n <= 0)
        return 0;
    for (int k = 0; k < COLS; k++) {
        buf_init(&cols[k], (size_t)1 << 30);
        buf_append(&cols[k], "{", 1);
    }
    /* Sorted by key: one attempt may appear twice in a batch (a lease that
     * ran out while the first delivery was still being recorded), and one
     * statement cannot upsert a row twice, so only the last copy is sent.
     * The order also makes concurrent writers lock index entries in the
     * same order. */
    sorted = malloc((size_t)n * sizeof(*sorted));
    if (!sorted) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    memcpy(sorted, jobs, (size_t)n * sizeof(*sorted));
    qsort(sorted, (size_t)n, sizeof(*sorted), by_attempt);
    for (int i = 0; i < n; i++) {
        job *j = sorted[i];
        char *resp;
        int bad;

        if (i + 1 < n && !strcmp(j->id, sorted[i + 1]->id) && j->attempt == sorted[i + 1]->attempt)
            continue;
        resp = j->response ? cJSON_PrintUnformatted(j->response) : NULL;
        bad = put_elem(&cols[0], j->id, first) < 0 || put_elem(&cols[1], j->trigger_id, first) < 0 ||
              put_elem(&cols[2], j->event_id, first) < 0 || put_elem(&cols[3], j->action_type, first) < 0 ||
              put_elem(&cols[4], j->status_text, first) < 0 || put_num(&cols[5], j->executed_at, first) < 0 ||
              put_num(&cols[6], j->duration_ms, first) < 0 ||
              put_elem(&cols[7], j->err[0] ? j->err : NULL, first) < 0 || put_elem(&cols[8], resp, first) < 0 ||
              put_num(&cols[9], j->attempt, first) < 0;
        free(resp);
        if (bad) {
            snprintf(err, errlen, "out of memory");
            goto out;
        }
        first = 0;
    }
    for (int k = 0; k < COLS; k++) {
        if (buf_append(&cols[k], "}", 1) < 0 || cols[k].truncated) {
            snprintf(err, errlen, "batch too large");
            goto out;
        }
        params[k] = buf_str(&cols[k]);
    }
    c = dbpool_acquire(app->db, 2000);
    if (!c) {
        dbpool_errstr(app->db, err, errlen);
        goto out;
    }
    r = dbpool_exec(c, insert_sql, COLS, params, err, errlen);
    if (r) {
        PQclear(r);
        rc = 0;
    }
out:
    dbpool_release(app->db, c);
    for (int k = 0; k < COLS; k++)
        buf_free(&cols[k]);
    free(sorted);
    return rc;
}
