/* results: action_results rows, one per attempt, written in batches.
 *
 * Rows are keyed by (job_id, retry_count) (migration 0005): a job that is
 * delivered again after its worker died repeats an attempt number, and the
 * upsert keeps one row per attempt with the latest outcome instead of
 * failing the whole batch on a duplicate. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aw.h"

#define COLS 10

int results_write(aw *app, job **jobs, int n, char *err, size_t errlen)
{
    buf sql;
    const char **params = NULL;
    char (*nums)[3][32] = NULL;
    char **resp = NULL;
    PGconn *c = NULL;
    PGresult *r;
    int rc = -1;

    if (n <= 0)
        return 0;
    buf_init(&sql, 0);
    params = calloc((size_t)n * COLS, sizeof(*params));
    nums = calloc((size_t)n, sizeof(*nums));
    resp = calloc((size_t)n, sizeof(*resp));
    if (!params || !nums || !resp) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    buf_puts(&sql, "INSERT INTO action_results (job_id, trigger_id, event_id, action_type, status, executed_at, "
                   "duration_ms, error_message, response_data, retry_count) VALUES ");
    for (int i = 0; i < n; i++) {
        job *j = jobs[i];
        const char **p = params + i * COLS;
        char row[256];
        int b = i * COLS;

        snprintf(nums[i][0], sizeof(nums[i][0]), "%lld", j->executed_at);
        snprintf(nums[i][1], sizeof(nums[i][1]), "%ld", j->duration_ms);
        snprintf(nums[i][2], sizeof(nums[i][2]), "%d", j->attempt);
        resp[i] = j->response ? cJSON_PrintUnformatted(j->response) : NULL;
        p[0] = j->id;
        p[1] = j->trigger_id;
        p[2] = j->event_id;
        p[3] = j->action_type;
        p[4] = j->status_text;
        p[5] = nums[i][0];
        p[6] = nums[i][1];
        p[7] = j->err[0] ? j->err : NULL;
        p[8] = resp[i];
        p[9] = nums[i][2];
        snprintf(row, sizeof(row),
                 "%s($%d,$%d,$%d,$%d,$%d,to_timestamp($%d::double precision/1000),$%d::int,$%d,$%d::jsonb,$%d::int)",
                 i ? "," : "", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9, b + 10);
        buf_puts(&sql, row);
    }
    buf_puts(&sql, " ON CONFLICT (job_id, retry_count) DO UPDATE SET status = EXCLUDED.status, "
                   "executed_at = EXCLUDED.executed_at, duration_ms = EXCLUDED.duration_ms, "
                   "error_message = EXCLUDED.error_message, response_data = EXCLUDED.response_data");
    if (sql.truncated) {
        snprintf(err, errlen, "statement too long");
        goto out;
    }
    c = dbpool_acquire(app->db, 2000);
    if (!c) {
        dbpool_errstr(app->db, err, errlen);
        goto out;
    }
    r = dbpool_exec(c, buf_str(&sql), n * COLS, params, err, errlen);
    if (r) {
        PQclear(r);
        rc = 0;
    }
out:
    dbpool_release(app->db, c);
    if (resp)
        for (int i = 0; i < n; i++)
            free(resp[i]);
    free(resp);
    free(nums);
    free(params);
    buf_free(&sql);
    return rc;
}
