/* rtruns: runs, their event log, receipts, replay and the run projections
 * (SPEC 6). Appends are rtappend's. */
#include "rt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "canonjson.h"
#include "fmt.h"
#include "jsonstr.h"
#include "log.h"
#include "randid.h"

#define RT_ACQUIRE_MS 5000

static const char RUN_SQL[] =
    "SELECT id::text, worker_id, status, metadata::text, runtime.ts(created_at), runtime.ts(updated_at), last_seq "
    "FROM runtime.runs WHERE id = $1";
/* A run's events after $2 up to $3, at most $4 of them (NULL: all). $3 is
 * the last_seq of the run row read before: rows past it were appended
 * after that read, and leaving them out makes the row and its events one
 * moment of the log, as one snapshot would (events are never changed or
 * deleted, and the row's last_seq moves in the transaction that appends). */
static const char EVENTS_SQL[] =
    "SELECT seq, event_type, payload::text, idempotency_key, runtime.ts(recorded_at) "
    "FROM runtime.run_events WHERE run_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4";

/* Rows a page of the receipt's and the replay's reads: a run of any length
 * is held a page at a time (an event is at most a request body, 1 MiB). */
#define RT_PAGE_ROWS 64
#define RT_STR_(x) #x
#define RT_STR(x) RT_STR_(x)

/* A text column as a JSON string, or null. */
static cJSON *text_or_null(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? cJSON_CreateNull() : cJSON_CreateString(PQgetvalue(res, row, col));
}

/* Event i of an EVENTS_SQL result as {seq, event_type, payload,
 * idempotency_key (null or text), recorded_at}; the payload parsed when
 * `parse` (jsonb text is valid JSON), else the text as it is. */
static cJSON *row_event(const PGresult *ev, int i, int parse)
{
    const char *payload = PQgetvalue(ev, i, 2);
    cJSON *x = cJSON_CreateObject();

    cJSON_AddNumberToObject(x, "seq", (double)strtoll(PQgetvalue(ev, i, 0), NULL, 10));
    cJSON_AddStringToObject(x, "event_type", PQgetvalue(ev, i, 1));
    cJSON_AddItemToObject(x, "payload", parse ? cJSON_Parse(payload) : cJSON_CreateRaw(payload));
    cJSON_AddItemToObject(x, "idempotency_key", text_or_null(ev, i, 3));
    cJSON_AddStringToObject(x, "recorded_at", PQgetvalue(ev, i, 4));
    return x;
}

/* Appends all of s or nothing (-1: OOM, or past b's maximum). */
static int put(buf *b, const char *s)
{
    return buf_append_all(b, s, strlen(s));
}

/* A text column as a JSON string (raw: as JSON text), or null. */
static int text_col(buf *b, const PGresult *res, int row, int col, int raw)
{
    if (PQgetisnull(res, row, col))
        return put(b, "null");
    if (raw)
        return put(b, PQgetvalue(res, row, col));
    if (put(b, "\"") < 0 || jsonstr_puts(b, PQgetvalue(res, row, col)) < 0 || b->truncated)
        return -1;
    return put(b, "\"");
}

static int text_field(buf *b, const char *sep_name, const PGresult *res, int row, int col, int raw)
{
    return put(b, sep_name) < 0 ? -1 : text_col(b, res, row, col, raw);
}

/* {"run": RUN} of SPEC 6 as text, in three parts, so that a run of any
 * length can be written a page of events at a time: what comes before the
 * events (from RUN_SQL's row), each event, what comes after. Each returns
 * 0 or -1 (OOM, or past b's maximum). */
static int run_text_head(buf *b, const PGresult *run)
{
    if (text_field(b, "{\"run\":{\"id\":", run, 0, 0, 0) < 0 || text_field(b, ",\"worker_id\":", run, 0, 1, 0) < 0 ||
        text_field(b, ",\"status\":", run, 0, 2, 0) < 0 || text_field(b, ",\"metadata\":", run, 0, 3, 1) < 0)
        return -1;
    return put(b, ",\"events\":[");
}

static int run_text_event(buf *b, const PGresult *ev, int i, int first)
{
    if ((!first && put(b, ",") < 0) || text_field(b, "{\"seq\":", ev, i, 0, 1) < 0 ||
        text_field(b, ",\"event_type\":", ev, i, 1, 0) < 0 || text_field(b, ",\"payload\":", ev, i, 2, 1) < 0 ||
        text_field(b, ",\"idempotency_key\":", ev, i, 3, 0) < 0 || text_field(b, ",\"recorded_at\":", ev, i, 4, 0) < 0)
        return -1;
    return put(b, "}");
}

static int run_text_tail(buf *b, const PGresult *run)
{
    if (text_field(b, "],\"created_at\":", run, 0, 4, 0) < 0 || text_field(b, ",\"updated_at\":", run, 0, 5, 0) < 0)
        return -1;
    return put(b, "}}");
}

/* The run without its events (Prefer: return=minimal's shape), from row
 * `row` of res at the columns of `c`, each `base` further on. */
static int run_text_minimal(buf *b, const char *id, const PGresult *res, int row, int base, const rt_run_cols *c)
{
    if (put(b, "{\"run\":{\"id\":\"") < 0 || jsonstr_puts(b, id) < 0 || b->truncated ||
        text_field(b, "\",\"worker_id\":", res, row, base + c->worker_id, 0) < 0 ||
        text_field(b, ",\"status\":", res, row, base + c->status, 0) < 0 ||
        text_field(b, ",\"metadata\":", res, row, base + c->metadata, 1) < 0 ||
        text_field(b, ",\"last_seq\":", res, row, base + c->last_seq, 1) < 0 ||
        text_field(b, ",\"created_at\":", res, row, base + c->created_at, 0) < 0 ||
        text_field(b, ",\"updated_at\":", res, row, base + c->updated_at, 0) < 0)
        return -1;
    return put(b, "}}");
}

/* A whole answer's text: a run of a page of events (GET streams a longer
 * one), or a run without its events. */
#define RT_RUN_TEXT_MAX ((size_t)256 << 20)
/* A write's own answer with the run's events (the original's wire format
 * for appends and run creation): past this much text it is the run
 * without them. A group of appends builds every answer before any is
 * sent, and a run's log is the clients' to grow: 64 whole answers of a
 * long run held the process's memory several times over. */
#define RT_WRITE_ANSWER_MAX ((size_t)1 << 20)

static void answer_text(rt_resp *a, int status, buf *b)
{
    a->status = status;
    a->raw_len = b->len;
    a->raw = buf_take(b);
    a->ctype = "application/json";
}

void rt_answer_minimal(rt_resp *a, int status, const char *id, const PGresult *res, int row, int base,
                       const rt_run_cols *c)
{
    buf b;

    buf_init(&b, RT_RUN_TEXT_MAX);
    if (run_text_minimal(&b, id, res, row, base, c) == 0)
        answer_text(a, status, &b);
    else
        rt_error(a, 500, "internal", "out of memory");
    buf_free(&b);
}

/* RUN_SQL's columns. */
static const rt_run_cols run_cols = {1, 2, 3, 6, 4, 5};

PGconn *rt_acquire_within(rt *r, int timeout_ms, rt_resp *a)
{
    char err[256];
    PGconn *c = dbpool_acquire(r->db, timeout_ms);

    if (!c)
        rt_db_error(a, "acquiring a connection", NULL, dbpool_errstr(r->db, err, sizeof(err)));
    return c;
}

PGconn *rt_acquire(rt *r, rt_resp *a)
{
    return rt_acquire_within(r, RT_ACQUIRE_MS, a);
}

int rt_run_id_param(const rt_req *q, rt_resp *a, const char **id)
{
    *id = q->param(q, "id");
    if (!rt_is_uuid(*id)) {
        rt_error(a, 400, "invalid_request", "run id must be a UUID");
        return -1;
    }
    return 0;
}

void rt_h_run_create(rt *r, const rt_req *q, rt_resp *a)
{
    cJSON *body = NULL, *worker, *meta;
    char id[RANDID_UUID_LEN + 1], err[512];
    char *meta_text = NULL;
    const char *p[3];
    PGconn *c = NULL;
    PGresult *res;

    if (rt_writes_frozen(r, a) < 0 || rt_body_object(q, &body, 1, a) < 0)
        return;
    worker = cJSON_GetObjectItemCaseSensitive(body, "worker_id");
    meta = cJSON_GetObjectItemCaseSensitive(body, "metadata");
    if (worker && !cJSON_IsNull(worker) && !cJSON_IsString(worker)) {
        rt_error(a, 400, "invalid_request", "worker_id must be a string");
        goto out;
    }
    if (meta && !cJSON_IsNull(meta) && !(meta_text = cJSON_PrintUnformatted(meta))) {
        rt_error(a, 500, "internal", "out of memory");
        goto out;
    }
    if (!(c = rt_acquire(r, a)))
        goto out;
    randid_uuid(id, sizeof(id), "");
    p[0] = id;
    p[1] = cJSON_IsString(worker) ? worker->valuestring : NULL;
    p[2] = meta_text;
    res = dbpool_exec(c, "SELECT runtime.create_run($1, $2, $3::jsonb)", 3, p, err, sizeof(err));
    if (!res) {
        rt_db_error(a, "creating a run", NULL, err);
        goto out;
    }
    PQclear(res);
    rt_count_append(r, "run.started");
    metrics_counter_inc(r->published);
    rt_answer_run(a, c, id, 201);
out:
    dbpool_release(r->db, c);
    free(meta_text);
    cJSON_Delete(body);
}

/* A long answer's bytes go out once RT_STREAM_FLUSH of them wait (or
 * now, when `last`): fewer, larger writes to the stream. Returns
 * REPLAY_OK or REPLAY_GONE (the client is). */
#define RT_STREAM_FLUSH (32 * 1024)
/* The most a streamed answer gathers past that: one replay line or one
 * event of a run (an event's payload is at most a request body). */
#define RT_REPLAY_LINE_MAX ((size_t)16 << 20)
enum { REPLAY_OK = 0, REPLAY_BAD = 1, REPLAY_GONE = 2 };

static int stream_flush(const rt_req *q, buf *out, int last)
{
    int rc = REPLAY_OK;

    if ((last || out->len >= RT_STREAM_FLUSH) && out->len) {
        rc = q->stream_write(q, out->p, out->len) < 0 ? REPLAY_GONE : REPLAY_OK;
        buf_reset(out);
    }
    return rc;
}

/* Begins a stream of `ctype`. Returns 0, or -1 when there is nothing to
 * send: the client is gone, or the answer is a 503 (too many streams). */
static int stream_open(const rt_req *q, rt_resp *a, const char *ctype)
{
    int rc = q->stream_begin(q, 200, ctype);

    if (rc == RT_STREAM_BUSY) {
        rt_error(a, 503, "unavailable", "too many long answers being sent; retry");
        snprintf(a->retry_after, sizeof(a->retry_after), "1");
    }
    return rc < 0 ? -1 : 0;
}

/* A run's row, then its events a page at a time, each page read on a
 * connection taken for it alone (or on the write's own connection, for
 * its answer): a receipt or a replay of a long run holds one page, and a
 * replay to a slow client holds no connection while it waits for the
 * client. */
typedef struct {
    rt *r;
    PGconn *c;          /* where every read goes; NULL: a pooled connection for each */
    const char *id;
    PGresult *run;      /* RUN_SQL's row */
    PGresult *page;     /* EVENTS_SQL's current page */
    int row;            /* the next row of the page */
    int done;           /* the last page was read */
    long long count;    /* events handed out */
    long long first_seq, last_seq; /* of the events handed out; the next page starts after last_seq */
    char last_ts[64];   /* the last one's recorded_at */
} run_walk;

static void walk_close(run_walk *w)
{
    PQclear(w->run);
    PQclear(w->page);
}

/* Reads the next page. Returns 0 or -1 (err set). */
static int walk_page(run_walk *w, char *err, size_t errlen)
{
    char after[24];
    const char *p[4] = {w->id, after, PQgetvalue(w->run, 0, 6), RT_STR(RT_PAGE_ROWS)};
    PGconn *c = w->c ? w->c : dbpool_acquire(w->r->db, RT_ACQUIRE_MS);

    snprintf(after, sizeof(after), "%lld", w->last_seq);
    PQclear(w->page);
    w->page = NULL;
    w->row = 0;
    if (!c) {
        dbpool_errstr(w->r->db, err, errlen);
        return -1;
    }
    w->page = dbpool_exec_prepared(c, "rt_events", EVENTS_SQL, 4, p, err, errlen);
    if (!w->c)
        dbpool_release(w->r->db, c);
    if (!w->page)
        return -1;
    w->done = PQntuples(w->page) < RT_PAGE_ROWS;
    return 0;
}

/* Loads w->id's row on c and the first page, or answers (404, a
 * database error) and returns -1 with w closed. */
static int walk_load(run_walk *w, PGconn *c, rt_resp *a)
{
    char err[512];
    const char *p[1] = {w->id};

    w->run = dbpool_exec_prepared(c, "rt_run", RUN_SQL, 1, p, err, sizeof(err));
    if (w->c != c)
        dbpool_release(w->r->db, c);
    if (w->run && PQntuples(w->run) == 0) {
        rt_error(a, 404, "not_found", "run not found");
    } else if (w->run && walk_page(w, err, sizeof(err)) == 0) {
        return 0;
    } else {
        rt_db_error(a, "reading a run", w->id, err);
    }
    walk_close(w);
    return -1;
}

/* Loads the run of the route's {id} and the first page, or answers (400,
 * 404, a database error) and returns -1. */
static int walk_open(rt *r, const rt_req *q, rt_resp *a, run_walk *w)
{
    PGconn *c;

    memset(w, 0, sizeof(*w));
    w->r = r;
    if (rt_run_id_param(q, a, &w->id) < 0 || !(c = rt_acquire(r, a)))
        return -1;
    return walk_load(w, c, a);
}

/* The next event, as row *row of *res. Returns 1, 0 at the end, or -1 on
 * a database failure. */
static int walk_next(run_walk *w, const PGresult **res, int *row)
{
    char err[512];

    if (w->row >= PQntuples(w->page)) {
        if (w->done)
            return 0;
        if (walk_page(w, err, sizeof(err)) < 0) {
            log_warn("runtime: reading the events of run %s failed: %s", w->id, err);
            return -1;
        }
        if (PQntuples(w->page) == 0)
            return 0;
    }
    *res = w->page;
    *row = w->row++;
    fmt_copy(w->last_ts, sizeof(w->last_ts), PQgetvalue(w->page, *row, 4));
    w->last_seq = strtoll(PQgetvalue(w->page, *row, 0), NULL, 10);
    if (w->count++ == 0)
        w->first_seq = w->last_seq;
    return 1;
}

/* Writes {"run": RUN} with every event of the walk into out, and sends
 * it on q's stream as it grows when q is not NULL. Returns 0, or -1: out
 * passed its maximum or the client is gone (*more 0 or 1), or reading the
 * events failed (*more -1, logged). */
static int run_text_walk(run_walk *w, buf *out, const rt_req *q, int *more)
{
    const PGresult *ev;
    int rc = run_text_head(out, w->run), i, first = 1;

    *more = 0;
    while (rc == 0 && (*more = walk_next(w, &ev, &i)) > 0) {
        rc = run_text_event(out, ev, i, first);
        first = 0;
        if (rc == 0 && q && stream_flush(q, out, 0) != REPLAY_OK)
            rc = -1;
    }
    if (rc == 0 && *more == 0)
        rc = run_text_tail(out, w->run);
    if (rc == 0 && *more == 0 && q)
        rc = stream_flush(q, out, 1) == REPLAY_OK ? 0 : -1;
    return rc == 0 && *more == 0 ? 0 : -1;
}

/* The events are read a page at a time on the write's connection, and no
 * further once the text passes RT_WRITE_ANSWER_MAX: libpq holds one page,
 * the answer at most that much. */
void rt_answer_run(rt_resp *a, PGconn *c, const char *id, int status)
{
    run_walk w;
    buf b;
    int more;

    memset(&w, 0, sizeof(w));
    w.c = c;
    w.id = id;
    if (walk_load(&w, c, a) < 0)
        return;
    buf_init(&b, RT_WRITE_ANSWER_MAX);
    if (run_text_walk(&w, &b, NULL, &more) == 0) {
        answer_text(a, status, &b);
    } else {
        /* The write it answers has committed: an error would tell the
         * client otherwise. It gets the run without its events, as
         * Prefer: return=minimal has it, and GET streams the events. */
        log_warn("runtime: run %s is too long to answer with its events (more than %zu bytes%s): answered without "
                 "them", id, RT_WRITE_ANSWER_MAX, more < 0 ? ", or reading them failed" : "");
        rt_answer_minimal(a, status, PQgetvalue(w.run, 0, 0), w.run, 0, 0, &run_cols);
    }
    buf_free(&b);
    walk_close(&w);
}

/* {"run": RUN} with its events. A run whose events fit in a page is
 * answered whole; a longer one is streamed a page at a time (its events
 * are unbounded, and a whole answer held the run several times over), so
 * a failure after the first bytes cuts the body short. */
void rt_h_run_get(rt *r, const rt_req *q, rt_resp *a)
{
    run_walk w;
    buf out;
    int streamed = 0, more = 0;

    if (walk_open(r, q, a, &w) < 0)
        return;
    if (!w.done && q->stream_begin) {
        if (stream_open(q, a, "application/json") < 0)
            goto out_walk;
        streamed = 1;
    }
    buf_init(&out, streamed ? RT_REPLAY_LINE_MAX : RT_RUN_TEXT_MAX);
    if (run_text_walk(&w, &out, streamed ? q : NULL, &more) == 0) {
        if (!streamed)
            answer_text(a, 200, &out);
    } else if (streamed) {
        a->stream_failed = 1;
    } else if (more < 0) {
        rt_db_unavailable(a); /* walk_next logged why */
    } else {
        rt_error(a, 500, "internal", "the run could not be rendered");
    }
    buf_free(&out);
out_walk:
    walk_close(&w);
}

/* The receipt's hash: the canonical JSON of the list of every event,
 * hashed one event at a time (the whole text of a long run would not fit
 * in memory, and need not). Returns 0, or -1 with the answer made. */
static int events_hash(run_walk *w, rt_resp *a, char out[CANONJSON_HASH_LEN])
{
    canonjson_hash *h = canonjson_hash_new();
    const PGresult *ev;
    int rc = h ? 0 : -1, more = 0, i;

    if (h)
        canonjson_hash_raw(h, "[", 1);
    while (rc == 0 && (more = walk_next(w, &ev, &i)) > 0) {
        cJSON *x = row_event(ev, i, 1);

        if (w->count > 1)
            canonjson_hash_raw(h, ",", 1);
        rc = canonjson_hash_value(h, x);
        cJSON_Delete(x);
    }
    if (rc == 0 && more == 0) {
        canonjson_hash_raw(h, "]", 1);
        rc = canonjson_hash_final(h, out);
    }
    canonjson_hash_free(h);
    if (more < 0)
        rt_db_unavailable(a); /* walk_next logged why */
    else if (rc < 0)
        rt_error(a, 500, "internal", "the run's events could not be hashed");
    return more < 0 || rc < 0 ? -1 : 0;
}

static const char *policy_bundle(const PGresult *run, cJSON **parsed)
{
    const cJSON *pb;

    *parsed = PQgetisnull(run, 0, 3) ? NULL : cJSON_Parse(PQgetvalue(run, 0, 3));
    pb = cJSON_GetObjectItemCaseSensitive(*parsed, "policy_bundle_id");
    return cJSON_IsString(pb) && pb->valuestring[0] ? pb->valuestring : "runtime.default";
}

void rt_h_run_receipt(rt *r, const rt_req *q, rt_resp *a)
{
    cJSON *meta = NULL, *rc;
    char hash[CANONJSON_HASH_LEN];
    run_walk w;

    if (walk_open(r, q, a, &w) < 0)
        return;
    if (events_hash(&w, a, hash) < 0)
        goto out;
    a->status = 200;
    rc = a->json = cJSON_CreateObject();
    cJSON_AddStringToObject(rc, "schema", "openagents.receipt.v1");
    cJSON_AddStringToObject(rc, "session_id", w.id);
    cJSON_AddStringToObject(rc, "trajectory_hash", hash);
    cJSON_AddStringToObject(rc, "policy_bundle_id", policy_bundle(w.run, &meta));
    cJSON_AddStringToObject(rc, "created_at", PQgetvalue(w.run, 0, 4));
    cJSON_AddNumberToObject(rc, "event_count", (double)w.count);
    cJSON_AddNumberToObject(rc, "first_seq", (double)w.first_seq);
    cJSON_AddNumberToObject(rc, "last_seq", (double)w.last_seq);
    cJSON_AddArrayToObject(rc, "tool_calls");
    cJSON_AddArrayToObject(rc, "verification");
out:
    cJSON_Delete(meta);
    walk_close(&w);
}

/* Appends `line` (freed) as one NDJSON line, and sends what is gathered
 * (stream_flush). Returns REPLAY_OK,
 * REPLAY_BAD (the line could not be rendered) or REPLAY_GONE (the client
 * is). */
static int replay_line(const rt_req *q, buf *out, cJSON *line, int last)
{
    char *s = cJSON_PrintUnformatted(line);
    int rc = s && buf_append_all(out, s, strlen(s)) == 0 && buf_append_all(out, "\n", 1) == 0 ? REPLAY_OK
                                                                                             : REPLAY_BAD;

    free(s);
    cJSON_Delete(line);
    return rc == REPLAY_OK ? stream_flush(q, out, last) : rc;
}

/* The RuntimeEvent line of event i. */
static cJSON *replay_event(const PGresult *ev, int i, const char *id, int *bad)
{
    cJSON *line = cJSON_CreateObject(), *parsed = cJSON_Parse(PQgetvalue(ev, i, 2));
    char hash[CANONJSON_HASH_LEN];

    if (canonjson_sha256(parsed, hash) < 0)
        *bad = 1;
    cJSON_AddStringToObject(line, "type", "RuntimeEvent");
    cJSON_AddStringToObject(line, "ts", PQgetvalue(ev, i, 4));
    cJSON_AddStringToObject(line, "session_id", id);
    cJSON_AddNumberToObject(line, "seq", (double)strtoll(PQgetvalue(ev, i, 0), NULL, 10));
    cJSON_AddStringToObject(line, "runtime_event_type", PQgetvalue(ev, i, 1));
    cJSON_AddStringToObject(line, "payload_hash", hash);
    cJSON_AddItemToObject(line, "payload", parsed);
    cJSON_AddItemToObject(line, "idempotency_key", text_or_null(ev, i, 3));
    return line;
}

static cJSON *replay_head(const char *type, const char *ts_name, const char *ts)
{
    cJSON *line = cJSON_CreateObject();

    cJSON_AddStringToObject(line, "type", type);
    cJSON_AddStringToObject(line, ts_name, ts);
    return line;
}

/* The replay is streamed: a run of any length goes out a page of events
 * at a time, and a failure after the first bytes cuts the body short (the
 * client sees an unfinished chunked body, never a replay that looks
 * whole). */
void rt_h_run_replay(rt *r, const rt_req *q, rt_resp *a)
{
    const char *status, *end_status, *created;
    const PGresult *ev;
    cJSON *meta = NULL, *line;
    buf out;
    run_walk w;
    int bad = 0, more = 0, i;

    if (!q->stream_begin) {
        rt_error(a, 500, "internal", "this transport cannot stream a replay");
        return;
    }
    if (walk_open(r, q, a, &w) < 0)
        return;
    if (stream_open(q, a, "application/x-ndjson") < 0)
        goto out_walk;
    buf_init(&out, RT_REPLAY_LINE_MAX);
    created = PQgetvalue(w.run, 0, 4);
    line = replay_head("ReplayHeader", "created_at", created);
    cJSON_AddNumberToObject(line, "replay_version", 1);
    cJSON_AddStringToObject(line, "producer", "openagents-runtime");
    bad |= replay_line(q, &out, line, 0);
    line = replay_head("SessionStart", "ts", created);
    cJSON_AddStringToObject(line, "session_id", w.id);
    cJSON_AddStringToObject(line, "policy_bundle_id", policy_bundle(w.run, &meta));
    bad |= replay_line(q, &out, line, 0);
    while (!bad && (more = walk_next(&w, &ev, &i)) > 0) {
        int unhashable = 0;

        line = replay_event(ev, i, w.id, &unhashable);
        bad |= replay_line(q, &out, line, 0) | (unhashable ? REPLAY_BAD : 0);
    }
    status = PQgetvalue(w.run, 0, 2);
    end_status = strcmp(status, "failed") == 0 ? "failure" : strcmp(status, "canceled") == 0 ? "cancelled" : "success";
    line = replay_head("SessionEnd", "ts", w.count ? w.last_ts : PQgetvalue(w.run, 0, 5));
    cJSON_AddStringToObject(line, "session_id", w.id);
    cJSON_AddStringToObject(line, "status", end_status);
    cJSON_AddNumberToObject(line, "confidence", strcmp(status, "succeeded") == 0 ? 1.0 : 0.0);
    cJSON_AddNumberToObject(line, "total_tool_calls", 0);
    if (bad || more < 0) {
        cJSON_Delete(line);
        if (bad & REPLAY_BAD || more < 0)
            log_warn("runtime: the replay of run %s was cut short: %s", w.id,
                     more < 0 ? "the database failed" : "an event could not be rendered");
        a->stream_failed = 1;
    } else if (replay_line(q, &out, line, 1) != REPLAY_OK) {
        a->stream_failed = 1;
    }
    buf_free(&out);
out_walk:
    cJSON_Delete(meta);
    walk_close(&w);
}

/* One-row projection queries answered as {name: {...}} or 404. */
static void answer_row(rt *r, rt_resp *a, const char *sql, const char *arg, const char *name, const char *missing)
{
    char err[512];
    const char *p[1] = {arg};
    PGconn *c = rt_acquire(r, a);
    PGresult *res;

    if (!c)
        return;
    res = dbpool_exec(c, sql, 1, p, err, sizeof(err));
    dbpool_release(r->db, c);
    if (!res) {
        rt_db_error(a, "reading a projection", arg, err);
        return;
    }
    if (PQntuples(res) == 0) {
        rt_error(a, 404, "not_found", missing);
    } else {
        a->status = 200;
        a->json = cJSON_CreateObject();
        cJSON_AddItemToObject(a->json, name, cJSON_Parse(PQgetvalue(res, 0, 0)));
    }
    PQclear(res);
}

void rt_h_run_summary(rt *r, const rt_req *q, rt_resp *a)
{
    const char *id;

    if (rt_run_id_param(q, a, &id) < 0)
        return;
    answer_row(r, a,
               "SELECT json_build_object('run_id', id, 'status', status, 'last_seq', projected_seq, 'event_count', "
               "event_count, 'projection_hash', runtime.summary_hash(id, status, projected_seq, event_count), 'updated_at', runtime.ts(projected_at)) "
               "FROM runtime.runs WHERE id = $1",
               id, "summary", "run summary not found");
}

void rt_h_run_checkpoint(rt *r, const rt_req *q, rt_resp *a)
{
    const char *id;

    if (rt_run_id_param(q, a, &id) < 0)
        return;
    answer_row(r, a,
               "SELECT json_build_object('topic', 'run:' || id || ':events', 'last_seq', projected_seq, "
               "'last_event_type', projected_event_type, 'updated_at', runtime.ts(projected_at)) "
               "FROM runtime.runs WHERE id = $1 AND projected_seq > 0",
               id, "checkpoint", "checkpoint not found");
}

void rt_h_worker_checkpoint(rt *r, const rt_req *q, rt_resp *a)
{
    const char *id = q->param(q, "id");

    if (!id || strlen(id) > 512) {
        rt_error(a, 400, "invalid_request", "worker id is required (at most 512 bytes)");
        return;
    }
    answer_row(r, a,
               "SELECT json_build_object('topic', 'worker:' || worker_id || ':lifecycle', 'last_seq', latest_seq, "
               "'last_event_type', last_event_type, 'updated_at', runtime.ts(last_event_at)) "
               "FROM runtime.workers WHERE worker_id = $1 AND latest_seq > 0",
               id, "checkpoint", "checkpoint not found");
}

void rt_h_drift(rt *r, const rt_req *q, rt_resp *a)
{
    const char *topic = q->query(q, "topic");

    if (!topic || !*topic || strlen(topic) > 600) {
        rt_error(a, 400, "invalid_request", "topic is required");
        return;
    }
    answer_row(r, a,
               "SELECT json_build_object('topic', topic, 'expected_next_seq', expected_next_seq, 'last_seen_seq', "
               "last_seen_seq, 'incoming_seq', incoming_seq, 'reason', reason, 'detected_at', runtime.ts(detected_at)) "
               "FROM runtime.projection_drift WHERE topic = $1",
               topic, "drift", "no drift for this topic");
}
