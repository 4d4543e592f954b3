/* results: action_results rows, one per attempt, written in batches.
 *
 * Rows are keyed by (job_id, retry_count) (migration 0005): a job that is
 * delivered again after its worker died repeats an attempt number, and the
 * upsert keeps one row per attempt with the latest outcome instead of
 * failing the whole batch on a duplicate.
 *
 * A batch is first sent with COPY, PostgreSQL's cheapest way in (no
 * statement to parse or plan, no array parameters to decode). COPY cannot
 * upsert: a batch that repeats an attempt already written fails as a whole
 * with a unique violation (23505), nothing of it is kept, and it is sent
 * again as the upsert below. Repeats only follow a crash or an expired
 * lease, so nearly every batch takes the fast path, and the rows written
 * are the same either way.
 *
 * The upsert is one statement with ten array parameters, one per column,
 * expanded by unnest(). Unlike a multi-row VALUES list with ten parameters
 * per row, the statement text does not grow with the batch, so PostgreSQL
 * parses and plans the same small statement whatever the batch size. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "aw.h"
#include "fmt.h"
#include "log.h"
#include "pgarr.h"

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

static const char copy_sql[] =
    "COPY action_results (job_id, trigger_id, event_id, action_type, status, executed_at, duration_ms, "
    "error_message, response_data, retry_count) FROM STDIN";

static int put_num(buf *b, long long v, int first)
{
    char tmp[1 + FMT_I64_MAX];

    tmp[0] = ',';
    return buf_append(b, tmp + first, (size_t)!first + fmt_i64(tmp + 1, v));
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

/* Appends one COPY text-format field: \N for NULL, else the value with
 * backslash, tab, newline and carriage return escaped. `sep` follows it
 * (a tab, or the newline that ends the row). Values are made valid UTF-8
 * here, as the array elements are (PGARR_UTF8): a peer's response or error
 * text with one stray byte would otherwise fail the whole batch (22021)
 * again and again, and every result after it would wait behind it. */
static int copy_field(buf *b, const char *s, char sep)
{
    const char *p;

    if (!s)
        return buf_append(b, "\\N", 2) < 0 || buf_append(b, &sep, 1) < 0 ? -1 : 0;
    while ((p = strpbrk(s, "\\\t\n\r"))) {
        char esc[2] = {'\\', *p == '\\' ? '\\' : *p == '\t' ? 't' : *p == '\n' ? 'n' : 'r'};

        if (buf_append_utf8(b, s, (size_t)(p - s)) < 0 || buf_append(b, esc, 2) < 0)
            return -1;
        s = p + 1;
    }
    return buf_append_utf8(b, s, strlen(s)) < 0 || buf_append(b, &sep, 1) < 0 ? -1 : 0;
}

/* The attempt's start as a timestamptz literal in UTC, to the millisecond
 * (what to_timestamp(ms / 1000.0) gives). The seconds part is formatted
 * once per second: rows of a batch mostly share it. */
static void copy_time(char *out, size_t n, long long ms)
{
    static _Thread_local long long last_sec = -1;
    static _Thread_local char last[80];
    static _Thread_local size_t last_len;
    time_t t = (time_t)(ms >= 0 ? ms / 1000 : (ms - 999) / 1000);
    int frac = (int)(ms - (long long)t * 1000);

    if ((long long)t != last_sec) {
        struct tm tm;

        gmtime_r(&t, &tm);
        snprintf(last, sizeof(last), "%04d-%02d-%02d %02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                 tm.tm_hour, tm.tm_min, tm.tm_sec);
        last_sec = (long long)t;
        last_len = strlen(last);
    }
    /* Once per row: the milliseconds by hand, not with snprintf. */
    if (last_len + 9 > n) {
        out[0] = '\0';
        return;
    }
    memcpy(out, last, last_len);
    out += last_len;
    *out++ = '.';
    *out++ = (char)('0' + frac / 100);
    *out++ = (char)('0' + frac / 10 % 10);
    *out++ = (char)('0' + frac % 10);
    memcpy(out, "+00", 4);
}

/* One row of the batch in COPY text format. */
static int copy_row(buf *b, const job *j)
{
    char ts[96], d[24], c[24];

    copy_time(ts, sizeof(ts), j->executed_at);
    fmt_i64(d, j->duration_ms);
    fmt_i64(c, j->attempt);
    return copy_field(b, j->id, '\t') < 0 || copy_field(b, j->trigger_id, '\t') < 0 ||
                   copy_field(b, j->event_id, '\t') < 0 || copy_field(b, j->action_type, '\t') < 0 ||
                   copy_field(b, j->status_text, '\t') < 0 || copy_field(b, ts, '\t') < 0 ||
                   copy_field(b, d, '\t') < 0 || copy_field(b, j->err[0] ? j->err : NULL, '\t') < 0 ||
                   copy_field(b, j->response_text, '\t') < 0 || copy_field(b, c, '\n') < 0
               ? -1
               : 0;
}

/* Writes "SQLSTATE: message" of a failed result (or of the connection). */
static void result_err(PGconn *c, PGresult *r, char *err, size_t errlen)
{
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;

    if (state && primary)
        snprintf(err, errlen, "%s: %s", state, primary);
    else
        snprintf(err, errlen, "08006: %s", PQerrorMessage(c));
}

/* Sends the rows in `data` with COPY. Returns 0 once committed, -1 with
 * "SQLSTATE: reason" in err. Every result is read, so the connection is
 * idle again either way (or broken, which dbpool_release sees). */
static int run_copy(PGconn *c, const buf *data, char *err, size_t errlen)
{
    PGresult *r = PQexec(c, copy_sql);
    int rc = -1;

    if (!r || PQresultStatus(r) != PGRES_COPY_IN) {
        result_err(c, r, err, errlen);
        PQclear(r);
        /* A failed COPY command has no more results; drain in case. */
        while ((r = PQgetResult(c)))
            PQclear(r);
        return -1;
    }
    PQclear(r);
    if (PQputCopyData(c, data->p, (int)data->len) != 1) {
        snprintf(err, errlen, "08006: %s", PQerrorMessage(c));
        PQputCopyEnd(c, "client could not send the rows");
    } else if (PQputCopyEnd(c, NULL) != 1) {
        snprintf(err, errlen, "08006: %s", PQerrorMessage(c));
    } else {
        rc = 0;
    }
    while ((r = PQgetResult(c))) {
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            if (rc == 0)
                result_err(c, r, err, errlen);
            rc = -1;
        }
        PQclear(r);
    }
    return rc;
}

/* The upsert of rows[0..n) (sorted, no attempt twice). */
static int run_upsert(PGconn *c, job **rows, int n, char *err, size_t errlen)
{
    buf cols[COLS];
    const char *params[COLS];
    PGresult *r;
    int rc = -1;

    for (int k = 0; k < COLS; k++) {
        buf_init(&cols[k], (size_t)1 << 30);
        buf_append(&cols[k], "{", 1);
    }
    for (int i = 0; i < n; i++) {
        job *j = rows[i];
        int first = i == 0;

        if (pgarr_add(&cols[0], j->id, PGARR_UTF8) < 0 || pgarr_add(&cols[1], j->trigger_id, PGARR_UTF8) < 0 ||
            pgarr_add(&cols[2], j->event_id, PGARR_UTF8) < 0 ||
            pgarr_add(&cols[3], j->action_type, PGARR_UTF8) < 0 ||
            pgarr_add(&cols[4], j->status_text, PGARR_UTF8) < 0 || put_num(&cols[5], j->executed_at, first) < 0 ||
            put_num(&cols[6], j->duration_ms, first) < 0 ||
            pgarr_add(&cols[7], j->err[0] ? j->err : NULL, PGARR_UTF8) < 0 ||
            pgarr_add(&cols[8], j->response_text, PGARR_UTF8) < 0 || put_num(&cols[9], j->attempt, first) < 0) {
            snprintf(err, errlen, "out of memory");
            goto out;
        }
    }
    for (int k = 0; k < COLS; k++) {
        if (buf_append(&cols[k], "}", 1) < 0 || cols[k].truncated) {
            snprintf(err, errlen, "batch too large");
            goto out;
        }
        params[k] = buf_str(&cols[k]);
    }
    r = dbpool_exec(c, insert_sql, COLS, params, err, errlen);
    if (r) {
        PQclear(r);
        rc = 0;
    }
out:
    for (int k = 0; k < COLS; k++)
        buf_free(&cols[k]);
    return rc;
}

/* The batch was refused for what it holds, not for the connection: a
 * value the server will not take (class 22), a constraint other than the
 * repeated attempt the upsert handles (23), a limit (54). Retrying it as a
 * whole would fail the same way forever, with every later result queued
 * behind it. */
static int refused_data(const char *err)
{
    return !strncmp(err, "22", 2) || (!strncmp(err, "23", 2) && strncmp(err, "23505", 5)) || !strncmp(err, "54", 2);
}

/* Writes rows[0..n) one by one, so one bad row cannot hold the others. A
 * row refused alone is written once more without its response and with
 * the reason as its error; one refused even so is logged and dropped: the
 * attempt happened, and its job must still be acknowledged. Returns -1
 * only when the connection failed (the batch is then retried; rows
 * already written are upserted again, unchanged). */
static int run_apart(PGconn *c, job **rows, int n, char *err, size_t errlen)
{
    for (int i = 0; i < n; i++) {
        job *j = rows[i];

        if (run_upsert(c, &rows[i], 1, err, errlen) == 0)
            continue;
        if (!refused_data(err))
            return -1;
        snprintf(j->err, sizeof(j->err), "result not stored as reported: %.400s", err);
        free(j->response_text);
        j->response_text = NULL;
        cJSON_Delete(j->response);
        j->response = NULL;
        if (run_upsert(c, &rows[i], 1, err, errlen) == 0)
            continue;
        if (!refused_data(err))
            return -1;
        {
            char e1[600], e2[600];

            log_event(LOG_ERROR, "action_results row refused; dropped", "\"job_id\":\"%s\",\"error\":\"%s\"",
                      log_escape(e1, sizeof(e1), j->id), log_escape(e2, sizeof(e2), err));
        }
    }
    return 0;
}

int results_write(aw *app, job **jobs, int n, char *err, size_t errlen)
{
    job **rows = NULL;
    buf data;
    PGconn *c = NULL;
    int rc = -1, m = 0;

    if (n <= 0)
        return 0;
    buf_init(&data, (size_t)1 << 30);
    rows = malloc((size_t)n * sizeof(*rows));
    if (!rows) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    /* Sorted by key: one attempt may appear twice in a batch (a lease that
     * ran out while the first delivery was still being recorded), and
     * neither COPY nor one upsert can write a row twice, so only the last
     * copy is sent. The order also makes concurrent writers lock index
     * entries in the same order. */
    memcpy(rows, jobs, (size_t)n * sizeof(*rows));
    qsort(rows, (size_t)n, sizeof(*rows), by_attempt);
    for (int i = 0; i < n; i++) {
        job *j = rows[i];

        if (i + 1 < n && !strcmp(j->id, rows[i + 1]->id) && j->attempt == rows[i + 1]->attempt)
            continue;
        rows[m++] = j;
        /* response_data as text: written by the delivery, else printed here
         * once (a batch written again does not print it again). */
        if ((!j->response_text && j->response && !(j->response_text = cJSON_PrintUnformatted(j->response))) ||
            copy_row(&data, j) < 0) {
            snprintf(err, errlen, "out of memory");
            goto out;
        }
    }
    if (data.truncated) {
        snprintf(err, errlen, "batch too large");
        goto out;
    }
    c = dbpool_acquire(app->db, 2000);
    if (!c) {
        dbpool_errstr(app->db, err, errlen);
        goto out;
    }
    rc = run_copy(c, &data, err, errlen);
    if (rc < 0 && !strncmp(err, "23505", 5))
        rc = run_upsert(c, rows, m, err, errlen);
    if (rc < 0 && refused_data(err))
        rc = run_apart(c, rows, m, err, errlen);
out:
    dbpool_release(app->db, c);
    buf_free(&data);
    free(rows);
    return rc;
}
