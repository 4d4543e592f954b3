#include "evrow.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "jsonstr.h"

/* Integers beyond this are not exact as doubles (event_model.h). */
#define EXACT_LIMIT 9007199254740992LL

/* The columns trigger_model_match may read. */
static const char *const match_cols[] = {"id",    "chain_id", "registry",  "event_type", "agent_id",
                                         "score", "tag1",     "tag2",      "timestamp",  "created_at"};
#define NMATCH ((int)(sizeof(match_cols) / sizeof(match_cols[0])))

void evrow_cols_init(evrow_cols *c, const PGresult *res)
{
    for (int i = 0; i < EVENT_MODEL_NCOLS; i++)
        c->f[i] = PQfnumber(res, event_model_columns[i].name);
}

static int col_index(const char *name)
{
    for (int i = 0; i < EVENT_MODEL_NCOLS; i++)
        if (!strcmp(event_model_columns[i].name, name))
            return i;
    return -1;
}

static int is_int(const event_column *col)
{
    return col->type == EVENT_COL_INT || col->type == EVENT_COL_BIGINT;
}

cJSON *evrow_match_obj(const evrow_cols *c, const PGresult *res, int row)
{
    /* Column positions of match_cols in event_model_columns: constant, so
     * computed once (the processing thread is the only caller, and the
     * result is the same whichever thread computes it first). */
    static int idx[NMATCH];
    static int ready;
    cJSON *o = cJSON_CreateObject();

    if (!o)
        return NULL;
    if (!ready) {
        for (int i = 0; i < NMATCH; i++)
            idx[i] = col_index(match_cols[i]);
        ready = 1;
    }
    for (int i = 0; i < NMATCH; i++) {
        const event_column *col;
        const char *text;
        cJSON *v;
        int64_t x;
        int f;

        if (idx[i] < 0 || (f = c->f[idx[i]]) < 0)
            continue;
        col = &event_model_columns[idx[i]];
        text = PQgetvalue(res, row, f);
        if (PQgetisnull(res, row, f))
            v = cJSON_CreateNull();
        else if (!is_int(col) || event_model_parse_i64(text, &x) < 0)
            v = cJSON_CreateString(text);
        else if (x >= -EXACT_LIMIT && x <= EXACT_LIMIT)
            v = cJSON_CreateNumber((double)x);
        else
            v = cJSON_CreateRaw(text);
        /* The key is a static string of event_model_columns: no copy. */
        if (!v || !cJSON_AddItemToObjectCS(o, col->name, v)) {
            cJSON_Delete(v);
            cJSON_Delete(o);
            return NULL;
        }
    }
    return o;
}

/* An event's JSON is never cut short: more than this is an error. */
#define EVROW_JSON_MAX ((size_t)1 << 30)

static int put(buf *b, const char *s, size_t n)
{
    return buf_append(b, s, n) < 0 || b->truncated ? -1 : 0;
}

static int put_str(buf *b, const char *s)
{
    return put(b, "\"", 1) < 0 || jsonstr_puts(b, s) < 0 || b->truncated || put(b, "\"", 1) < 0 ? -1 : 0;
}

char *evrow_json(const evrow_cols *c, const PGresult *res, int row, size_t *len)
{
    buf b;
    int first = 1;

    buf_init(&b, EVROW_JSON_MAX);
    if (put(&b, "{", 1) < 0)
        goto oom;
    for (int i = 0; i < EVENT_MODEL_NCOLS; i++) {
        const event_column *col = &event_model_columns[i];
        const char *text;
        int f = c->f[i];
        int64_t x;

        if (f < 0)
            continue;
        if ((!first && put(&b, ",", 1) < 0) || put(&b, "\"", 1) < 0 || put(&b, col->name, strlen(col->name)) < 0 ||
            put(&b, "\":", 2) < 0)
            goto oom;
        first = 0;
        text = PQgetvalue(res, row, f);
        if (PQgetisnull(res, row, f)) {
            if (put(&b, "null", 4) < 0)
                goto oom;
        } else if (is_int(col) && event_model_parse_i64(text, &x) == 0) {
            /* PostgreSQL's text of an integer is a valid JSON number with
             * every digit: exact even beyond 2^53. */
            if (put(&b, text, strlen(text)) < 0)
                goto oom;
        } else if (put_str(&b, text) < 0) {
            goto oom;
        }
    }
    if (put(&b, "}", 1) < 0)
        goto oom;
    *len = b.len;
    return buf_take(&b);
oom:
    buf_free(&b);
    return NULL;
}
