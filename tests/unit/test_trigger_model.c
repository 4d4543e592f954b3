/* Unit tests for trigger_model: validation messages of every field, and
 * evaluation of every condition type and operator (matching and not),
 * EMA against hand-computed values, rate_limit windows and reset, missing
 * fields and unknown condition types. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "log.h"
#include "trigger_model.h"

static cJSON *J(const char *s)
{
    cJSON *j = cJSON_Parse(s);

    assert_non_null(j);
    return j;
}

/* Matches `event` against `conds` once, from a fresh state. */
static int m1(const char *conds, const char *event)
{
    cJSON *c = J(conds), *e = J(event);
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    trigger_model_state *st;
    int r, changed = -1;

    assert_non_null(m);
    st = trigger_model_state_new(m, NULL);
    assert_non_null(st);
    r = trigger_model_match(m, e, st, &changed, 1000);
    if (!trigger_model_matcher_stateful(m))
        assert_int_equal(changed, 0);
    trigger_model_state_free(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
    cJSON_Delete(e);
    return r;
}

/* The state as stored (parsed back), for checks; the caller deletes it. */
static cJSON *state_json(const trigger_model_state *st)
{
    size_t len = 0;
    char *txt = trigger_model_state_text(st, &len);
    cJSON *j;

    assert_non_null(txt);
    assert_int_equal(strlen(txt), len);
    j = J(txt);
    free(txt);
    return j;
}

static const char *msg(const cJSON *d, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(d, key);

    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const char good[] =
    "{\"name\":\"n\",\"chain_id\":1,\"registry\":\"reputation\",\"conditions\":["
    "{\"condition_type\":\"score_threshold\",\"operator\":\">\",\"value\":50},"
    "{\"condition_type\":\"agent_id_equals\",\"value\":\"42\"},"
    "{\"condition_type\":\"event_type_equals\",\"value\":\"NewFeedback\"},"
    "{\"condition_type\":\"tag_equals\",\"field\":\"tag2\",\"value\":\"x\"},"
    "{\"condition_type\":\"ema_threshold\",\"operator\":\"<=\",\"value\":\"7.5\",\"config\":{\"window_size\":5}},"
    "{\"condition_type\":\"rate_limit\",\"operator\":\">=\",\"value\":3,"
    "\"config\":{\"time_window\":\"10m\",\"reset_on_trigger\":true}}],"
    "\"actions\":[{\"action_type\":\"telegram\",\"config\":{\"chat_id\":123,\"parse_mode\":\"HTML\"}},"
    "{\"action_type\":\"rest\",\"priority\":5,\"config\":{\"method\":\"POST\",\"url\":\"https://h/x\","
    "\"headers\":{\"X-A\":\"b\"},\"timeout_ms\":1000}},"
    "{\"action_type\":\"mcp\",\"config\":{\"server_url\":\"http://m\",\"tool\":\"t\","
    "\"arguments_template\":{\"a\":1}}}]}";

static void test_valid_body(void **state)
{
    cJSON *b = J(good), *d = cJSON_CreateObject();
    trigger_model_def *def = trigger_model_parse(b, d);

    (void)state;
    assert_non_null(def);
    assert_int_equal(cJSON_GetArraySize(d), 0);
    assert_int_equal(def->ncond, 6);
    assert_int_equal(def->naction, 3);
    assert_string_equal(def->conds[0].value, "50");
    assert_int_equal(def->conds[0].op, TRIGGER_OP_GT);
    assert_string_equal(def->conds[1].value, "42");
    assert_string_equal(def->conds[3].field, "tag2");
    assert_int_equal(def->actions[1].priority, 5);
    assert_int_equal(def->actions[0].priority, 1);
    assert_int_equal(def->enabled, 1);
    assert_true(trigger_model_def_is_stateful(def));
    assert_true(trigger_model_is_stateful(cJSON_GetObjectItem(b, "conditions")));
    trigger_model_def_free(def);
    cJSON_Delete(d);
    cJSON *det = NULL;
    assert_int_equal(trigger_model_validate(b, &det), 0);
    assert_null(det);
    cJSON_Delete(b);
}

static void test_every_bad_field(void **state)
{
    cJSON *b = J("{\"name\":\"\",\"chain_id\":\"x\",\"registry\":\"foo\",\"enabled\":1,\"conditions\":["
                 "{\"condition_type\":\"score_threshold\",\"operator\":\"~\",\"value\":\"abc\"},"
                 "{\"condition_type\":\"nope\"},"
                 "{\"condition_type\":\"tag_equals\",\"field\":\"tag3\",\"value\":1},"
                 "{\"condition_type\":\"ema_threshold\",\"operator\":\">\",\"value\":1,\"config\":{\"window_size\":0}},"
                 "{\"condition_type\":\"rate_limit\",\"operator\":\">\",\"value\":1,\"config\":{\"time_window\":\"5x\","
                 "\"reset_on_trigger\":\"yes\"}},"
                 "{\"condition_type\":\"event_type_equals\",\"value\":\"Foo\"},"
                 "{\"condition_type\":\"agent_id_equals\",\"value\":\"a1\"},"
                 "{\"condition_type\":\"score_threshold\",\"value\":3}],"
                 "\"actions\":[{\"action_type\":\"telegram\",\"config\":{\"parse_mode\":\"md\"}},"
                 "{\"action_type\":\"rest\",\"priority\":0,\"config\":{\"method\":\"GO\",\"url\":\"ftp://x\","
                 "\"headers\":{\"A\":1},\"timeout_ms\":0}},"
                 "{\"action_type\":\"mcp\",\"config\":{\"server_url\":\"x\",\"arguments_template\":3}},"
                 "{\"action_type\":\"sms\",\"config\":{}}]}");
    cJSON *d = NULL;

    (void)state;
    assert_int_equal(trigger_model_validate(b, &d), -1);
    assert_non_null(d);
    assert_non_null(msg(d, "name"));
    assert_non_null(msg(d, "chain_id"));
    assert_non_null(msg(d, "registry"));
    assert_non_null(msg(d, "enabled"));
    assert_non_null(msg(d, "conditions[0].operator"));
    assert_non_null(msg(d, "conditions[0].value"));
    assert_non_null(strstr(msg(d, "conditions[1].condition_type"), "agent_id_equals"));
    assert_non_null(msg(d, "conditions[2].field"));
    assert_non_null(msg(d, "conditions[2].value"));
    assert_non_null(msg(d, "conditions[3].config.window_size"));
    assert_non_null(msg(d, "conditions[4].config.time_window"));
    assert_non_null(msg(d, "conditions[4].config.reset_on_trigger"));
    assert_non_null(msg(d, "conditions[5].value"));
    assert_non_null(msg(d, "conditions[6].value"));
    assert_non_null(msg(d, "conditions[7].operator"));
    assert_non_null(msg(d, "actions[0].config.chat_id"));
    assert_non_null(msg(d, "actions[0].config.parse_mode"));
    assert_non_null(msg(d, "actions[1].priority"));
    assert_non_null(msg(d, "actions[1].config.method"));
    assert_non_null(msg(d, "actions[1].config.url"));
    assert_non_null(msg(d, "actions[1].config.headers.A"));
    assert_non_null(msg(d, "actions[1].config.timeout_ms"));
    assert_non_null(msg(d, "actions[2].config.server_url"));
    assert_non_null(msg(d, "actions[2].config.tool"));
    assert_non_null(msg(d, "actions[2].config.arguments_template"));
    assert_non_null(msg(d, "actions[3].action_type"));
    cJSON_Delete(d);
    cJSON_Delete(b);
}

static void test_missing_required(void **state)
{
    cJSON *b = J("{}"), *d = NULL, *arr = J("[1]");

    (void)state;
    assert_int_equal(trigger_model_validate(b, &d), -1);
    assert_string_equal(msg(d, "name"), "required");
    assert_string_equal(msg(d, "chain_id"), "required");
    assert_string_equal(msg(d, "registry"), "required");
    assert_non_null(msg(d, "conditions"));
    assert_non_null(msg(d, "actions"));
    cJSON_Delete(d);
    assert_int_equal(trigger_model_validate(arr, &d), -1);
    assert_non_null(msg(d, "body"));
    cJSON_Delete(d);
    cJSON_Delete(arr);
    cJSON_Delete(b);
}

static void test_parse_window(void **state)
{
    int64_t s;

    (void)state;
    assert_int_equal(trigger_model_parse_window("30s", &s), 0);
    assert_int_equal(s, 30);
    assert_int_equal(trigger_model_parse_window("5m", &s), 0);
    assert_int_equal(s, 300);
    assert_int_equal(trigger_model_parse_window("2h", &s), 0);
    assert_int_equal(s, 7200);
    assert_int_equal(trigger_model_parse_window("1d", &s), 0);
    assert_int_equal(s, 86400);
    assert_int_equal(trigger_model_parse_window("0s", &s), -1);
    assert_int_equal(trigger_model_parse_window("5", &s), -1);
    assert_int_equal(trigger_model_parse_window("m", &s), -1);
    assert_int_equal(trigger_model_parse_window("-1m", &s), -1);
    assert_int_equal(trigger_model_parse_window("366d", &s), -1);
    assert_int_equal(trigger_model_parse_window("5ms", &s), -1);
}

static void test_stateless_types(void **state)
{
    (void)state;
    /* agent_id_equals: numbers, raw numbers and strings in the event. */
    assert_int_equal(m1("[{\"condition_type\":\"agent_id_equals\",\"value\":\"42\"}]", "{\"agent_id\":42}"), 1);
    assert_int_equal(m1("[{\"condition_type\":\"agent_id_equals\",\"value\":42}]", "{\"agent_id\":\"42\"}"), 1);
    assert_int_equal(m1("[{\"condition_type\":\"agent_id_equals\",\"value\":\"42\"}]", "{\"agent_id\":43}"), 0);
    assert_int_equal(m1("[{\"condition_type\":\"agent_id_equals\",\"value\":\"42\"}]", "{\"agent_id\":null}"), 0);
    /* event_type_equals */
    assert_int_equal(m1("[{\"condition_type\":\"event_type_equals\",\"value\":\"NewFeedback\"}]",
                        "{\"event_type\":\"NewFeedback\"}"), 1);
    assert_int_equal(m1("[{\"condition_type\":\"event_type_equals\",\"value\":\"NewFeedback\"}]",
                        "{\"event_type\":\"MetadataSet\"}"), 0);
    /* tag_equals on tag1 and tag2 */
    assert_int_equal(m1("[{\"condition_type\":\"tag_equals\",\"field\":\"tag1\",\"value\":\"a\"}]",
                        "{\"tag1\":\"a\",\"tag2\":\"b\"}"), 1);
    assert_int_equal(m1("[{\"condition_type\":\"tag_equals\",\"field\":\"tag1\",\"value\":\"b\"}]",
                        "{\"tag1\":\"a\",\"tag2\":\"b\"}"), 0);
    assert_int_equal(m1("[{\"condition_type\":\"tag_equals\",\"field\":\"tag2\",\"value\":\"b\"}]",
                        "{\"tag1\":\"a\",\"tag2\":\"b\"}"), 1);
    assert_int_equal(m1("[{\"condition_type\":\"tag_equals\",\"field\":\"tag2\",\"value\":\"b\"}]", "{\"tag1\":\"b\"}"),
                     0);
    /* No conditions: every event. */
    assert_int_equal(m1("[]", "{}"), 1);
    /* AND */
    assert_int_equal(m1("[{\"condition_type\":\"agent_id_equals\",\"value\":\"1\"},"
                        "{\"condition_type\":\"event_type_equals\",\"value\":\"NewFeedback\"}]",
                        "{\"agent_id\":1,\"event_type\":\"MetadataSet\"}"), 0);
}

static void test_score_operators(void **state)
{
    static const struct {
        const char *op;
        int at_lt, at_eq, at_gt; /* score 49, 50, 51 against 50 */
    } ops[] = {{"<", 1, 0, 0},  {">", 0, 0, 1},  {"=", 0, 1, 0},  {"==", 0, 1, 0},
               {"<=", 1, 1, 0}, {">=", 0, 1, 1}, {"!=", 1, 0, 1}, {"<>", 1, 0, 1}};
    char cond[160];

    (void)state;
    for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
        snprintf(cond, sizeof(cond), "[{\"condition_type\":\"score_threshold\",\"operator\":\"%s\",\"value\":\"50\"}]",
                 ops[i].op);
        assert_int_equal(m1(cond, "{\"score\":49}"), ops[i].at_lt);
        assert_int_equal(m1(cond, "{\"score\":50}"), ops[i].at_eq);
        assert_int_equal(m1(cond, "{\"score\":51}"), ops[i].at_gt);
        assert_int_equal(m1(cond, "{\"agent_id\":1}"), 0); /* missing field */
        assert_int_equal(m1(cond, "{\"score\":null}"), 0);
    }
}

static void test_unknown_and_bad_rows_never_match(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"moon_phase\",\"value\":\"full\"}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t1");

    (void)state;
    assert_true(trigger_model_matcher_never(m));
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
    assert_int_equal(m1("[{\"condition_type\":\"moon_phase\",\"value\":\"full\"}]", "{\"score\":1}"), 0);
    assert_int_equal(m1("[{\"condition_type\":\"score_threshold\",\"operator\":\"~\",\"value\":\"1\"}]",
                        "{\"score\":1}"), 0);
    assert_int_equal(m1("[{\"condition_type\":\"ema_threshold\",\"operator\":\">\",\"value\":\"1\"}]",
                        "{\"score\":5}"), 0);
}

/* Runs a sequence of scores through one EMA condition, carrying state. */
static void test_ema_sequence(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"ema_threshold\",\"operator\":\">\",\"value\":\"60\","
                 "\"config\":{\"window_size\":3}}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    trigger_model_state *st = trigger_model_state_new(m, NULL);
    const int scores[] = {50, 70, 90, 20, 100};
    /* alpha = 0.5: 50, 60, 75, 47.5, 73.75 */
    const double want[] = {50, 60, 75, 47.5, 73.75};
    const int match[] = {0, 0, 1, 0, 1};

    (void)state;
    assert_non_null(st);
    for (int i = 0; i < 5; i++) {
        char ev[64];
        cJSON *e, *j;
        const cJSON *ent;
        int changed = 0;

        snprintf(ev, sizeof(ev), "{\"score\":%d}", scores[i]);
        e = J(ev);
        assert_int_equal(trigger_model_match(m, e, st, &changed, 0), match[i]);
        assert_int_equal(changed, 1);
        j = state_json(st);
        ent = cJSON_GetObjectItem(j, "0");
        assert_string_equal(cJSON_GetObjectItem(ent, "type")->valuestring, "ema_threshold");
        assert_true(fabs(cJSON_GetObjectItem(ent, "ema")->valuedouble - want[i]) < 1e-9);
        assert_int_equal((int)cJSON_GetObjectItem(ent, "count")->valuedouble, i + 1);
        cJSON_Delete(j);
        cJSON_Delete(e);
    }
    /* An event without a score: no match, EMA unchanged. */
    {
        cJSON *e = J("{\"agent_id\":1}"), *j;

        assert_int_equal(trigger_model_match(m, e, st, NULL, 0), 0);
        j = state_json(st);
        assert_true(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "0"), "ema")->valuedouble - 73.75) < 1e-9);
        /* The stored state carries on where it was. */
        {
            trigger_model_state *back = trigger_model_state_new(m, j);
            cJSON *e2 = J("{\"score\":100}"), *j2;

            assert_int_equal(trigger_model_match(m, e2, back, NULL, 0), 1);
            j2 = state_json(back);
            assert_true(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(j2, "0"), "ema")->valuedouble - 86.875) < 1e-9);
            cJSON_Delete(j2);
            cJSON_Delete(e2);
            trigger_model_state_free(back);
        }
        cJSON_Delete(j);
        cJSON_Delete(e);
    }
    /* A stale state (other window size) restarts from the new score. */
    {
        cJSON *old = J("{\"0\":{\"type\":\"ema_threshold\",\"window_size\":9,\"ema\":1000,\"count\":5}}");
        cJSON *e = J("{\"score\":61}"), *j;
        trigger_model_state *st2 = trigger_model_state_new(m, old);

        assert_int_equal(trigger_model_match(m, e, st2, NULL, 0), 1);
        j = state_json(st2);
        assert_true(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "0"), "ema")->valuedouble - 61) < 1e-9);
        cJSON_Delete(j);
        trigger_model_state_free(st2);
        cJSON_Delete(old);
        cJSON_Delete(e);
    }
    /* A stateful matcher needs a state made for it. */
    {
        cJSON *e = J("{\"score\":61}");

        assert_int_equal(trigger_model_match(m, e, NULL, NULL, 0), -1);
        cJSON_Delete(e);
    }
    trigger_model_state_free(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
}

/* EMA of one agent only: events failing a stateless condition do not feed it. */
static void test_ema_sees_only_passing_events(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"agent_id_equals\",\"value\":\"7\"},"
                 "{\"condition_type\":\"ema_threshold\",\"operator\":\">=\",\"value\":\"0\","
                 "\"config\":{\"window_size\":1}}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    trigger_model_state *st = trigger_model_state_new(m, NULL);
    cJSON *e = J("{\"agent_id\":8,\"score\":10}"), *j;
    int changed = -1;

    (void)state;
    assert_int_equal(trigger_model_match(m, e, st, &changed, 0), 0);
    assert_int_equal(changed, 0);
    j = state_json(st);
    assert_int_equal(cJSON_GetArraySize(j), 0);
    cJSON_Delete(j);
    cJSON_Delete(e);
    e = J("{\"agent_id\":7,\"score\":10}");
    assert_int_equal(trigger_model_match(m, e, st, &changed, 0), 1);
    assert_int_equal(changed, 1);
    j = state_json(st);
    assert_non_null(cJSON_GetObjectItem(j, "1"));
    cJSON_Delete(j);
    cJSON_Delete(e);
    trigger_model_state_free(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
}

/* One rate_limit condition `op value` over `window`, with its state. */
typedef struct {
    cJSON *c;
    trigger_model_matcher *m;
    trigger_model_state *st;
} rl;

static rl rl_new(const char *op, const char *value, const char *window, int reset)
{
    char conds[256];
    rl r;

    snprintf(conds, sizeof(conds),
             "[{\"condition_type\":\"rate_limit\",\"operator\":\"%s\",\"value\":\"%s\","
             "\"config\":{\"time_window\":\"%s\",\"reset_on_trigger\":%s}}]",
             op, value, window, reset ? "true" : "false");
    r.c = J(conds);
    r.m = trigger_model_matcher_new(r.c, "t");
    assert_non_null(r.m);
    assert_false(trigger_model_matcher_never(r.m));
    r.st = trigger_model_state_new(r.m, NULL);
    assert_non_null(r.st);
    return r;
}

static void rl_free(rl *r)
{
    trigger_model_state_free(r->st);
    trigger_model_matcher_free(r->m);
    cJSON_Delete(r->c);
}

/* One event at `ts` (none: the clock, 5000). */
static int rate_step(rl *r, long ts)
{
    char ev[64];
    cJSON *e;
    int res, changed = 0;

    if (ts >= 0)
        snprintf(ev, sizeof(ev), "{\"timestamp\":%ld}", ts);
    else
        snprintf(ev, sizeof(ev), "{}");
    e = J(ev);
    res = trigger_model_match(r->m, e, r->st, &changed, 5000);
    assert_int_equal(changed, 1);
    cJSON_Delete(e);
    return res;
}

/* The counts stored for condition "0" (a string), and their sum. */
static long kept_fields(const rl *r, char *out, size_t outlen)
{
    cJSON *j = state_json(r->st);
    const cJSON *c = cJSON_GetObjectItem(cJSON_GetObjectItem(j, "0"), "counts");
    long n = 0;

    assert_true(cJSON_IsString(c));
    if (out)
        snprintf(out, outlen, "%s", c->valuestring);
    for (const char *p = c->valuestring; *p;) {
        char *end;

        n += strtol(p, &end, 10);
        p = *end == ',' ? end + 1 : end;
        if (end == p && !*p)
            break;
    }
    cJSON_Delete(j);
    return n;
}

static long kept(const rl *r)
{
    return kept_fields(r, NULL, 0);
}

/* The number of fields of a counts string. */
static int nfields(const char *s)
{
    int n = 1;

    for (; *s; s++)
        n += *s == ',';
    return n;
}

static void test_rate_limit_window(void **state)
{
    rl r = rl_new(">=", "3", "60s", 0);
    cJSON *j;

    (void)state;
    assert_int_equal(rate_step(&r, 1000), 0); /* 1 */
    assert_int_equal(rate_step(&r, 1010), 0); /* 2 */
    assert_int_equal(rate_step(&r, 1020), 1); /* 3 */
    assert_int_equal(rate_step(&r, 1030), 1); /* 4 */
    assert_int_equal(rate_step(&r, 1075), 1); /* 1020,1030,1075 = 3 (1000,1010 left the window) */
    assert_int_equal(rate_step(&r, 1200), 0); /* alone */
    /* Bounded: one counter per second of a 60 s window, whatever the count;
     * stored are the buckets of the window that hold events: 1200 and the
     * 50 seconds after it. */
    for (int i = 0; i < 500; i++)
        rate_step(&r, 1201 + i / 10);
    {
        char f[512];

        assert_int_equal(kept_fields(&r, f, sizeof(f)), 501);
        assert_int_equal(nfields(f), 51);
        assert_int_equal(strncmp(f, "1,10,10,", 8), 0);
    }
    j = state_json(r.st);
    assert_int_equal((int)cJSON_GetObjectItem(cJSON_GetObjectItem(j, "0"), "bucket_s")->valuedouble, 1);
    cJSON_Delete(j);
    /* No timestamp: the clock given (5000) is used. */
    assert_int_equal(rate_step(&r, -1), 0);
    assert_int_equal(kept(&r), 1);
    rl_free(&r);
}

/* Windows up to 128 s count to the second: an event exactly one window
 * later no longer sees the first, one second less does. */
static void test_rate_limit_window_edges(void **state)
{
    rl r = rl_new(">=", "2", "60s", 0);

    (void)state;
    assert_int_equal(rate_step(&r, 1000), 0);
    assert_int_equal(rate_step(&r, 1060), 0); /* (1000, 1060]: 1000 is out */
    assert_int_equal(rate_step(&r, 1119), 1); /* (1059, 1119]: 1060 is in */
    rl_free(&r);
    r = rl_new(">=", "2", "128s", 0);
    assert_int_equal(rate_step(&r, 1000), 0);
    assert_int_equal(rate_step(&r, 1127), 1); /* 127 s later: in */
    assert_int_equal(rate_step(&r, 1254), 1); /* with 1127 */
    assert_int_equal(rate_step(&r, 1382), 0); /* 1254 is 128 s back: out */
    rl_free(&r);
}

/* Longer windows count in 128 buckets: 1 h has buckets of 29 s, 125 of
 * them (3625 s), and the far edge moves a bucket at a time. */
static void test_rate_limit_long_window_buckets(void **state)
{
    rl r = rl_new(">=", "2", "1h", 0);
    cJSON *j;

    (void)state;
    assert_int_equal(rate_step(&r, 29 * 1000), 0);        /* bucket 1000 */
    assert_int_equal(rate_step(&r, 29 * 1000 + 3624), 1); /* bucket 1124: 1000 still kept */
    j = state_json(r.st);
    assert_int_equal((int)cJSON_GetObjectItem(cJSON_GetObjectItem(j, "0"), "bucket_s")->valuedouble, 29);
    {
        char f[512];

        kept_fields(&r, f, sizeof(f));
        assert_int_equal(nfields(f), 125); /* buckets 1000 and 1124: the oldest and the newest */
        assert_int_equal(strncmp(f, "1,,", 3), 0);
        assert_int_equal(f[strlen(f) - 1], '1');
    }
    assert_int_equal((int)cJSON_GetObjectItem(cJSON_GetObjectItem(j, "0"), "head")->valuedouble, 1124);
    cJSON_Delete(j);
    rl_free(&r);
    r = rl_new(">=", "2", "1h", 0);
    assert_int_equal(rate_step(&r, 29 * 1000 + 28), 0);   /* bucket 1000, its last second */
    assert_int_equal(rate_step(&r, 29 * 1000 + 3625), 0); /* bucket 1125: 1000 has left */
    assert_int_equal(kept(&r), 1);
    rl_free(&r);
    /* 365 days, the longest window: still 128 counters at most. */
    r = rl_new(">", "99999", "365d", 0);
    for (long i = 0; i < 99999; i++)
        assert_int_equal(rate_step(&r, 1700000000 + i * 300), 0); /* one every 5 min */
    assert_int_equal(rate_step(&r, 1700000000 + 99999L * 300), 1); /* number 100000 */
    {
        char f[4096];

        assert_int_equal(kept_fields(&r, f, sizeof(f)), 100000);
        assert_true(nfields(f) <= 128);
    }
    rl_free(&r);
}

static void test_rate_limit_reset_and_ops(void **state)
{
    rl r = rl_new(">", "1", "1h", 1);

    (void)state;
    assert_int_equal(rate_step(&r, 100), 0); /* 1 */
    assert_int_equal(rate_step(&r, 101), 1); /* 2 > 1: match, reset */
    assert_int_equal(kept(&r), 0);
    assert_int_equal(rate_step(&r, 102), 0); /* 1 again */
    assert_int_equal(rate_step(&r, 103), 1);
    assert_int_equal(kept(&r), 0);
    /* A reset state survives being stored. */
    {
        cJSON *j = state_json(r.st);
        trigger_model_state *back = trigger_model_state_new(r.m, j);

        trigger_model_state_free(r.st);
        r.st = back;
        cJSON_Delete(j);
        assert_int_equal(rate_step(&r, 104), 0);
        assert_int_equal(rate_step(&r, 105), 1);
    }
    rl_free(&r);
    /* Without reset_on_trigger the count goes on. */
    r = rl_new(">", "1", "1h", 0);
    assert_int_equal(rate_step(&r, 100), 0);
    assert_int_equal(rate_step(&r, 101), 1);
    assert_int_equal(rate_step(&r, 102), 1);
    assert_int_equal(kept(&r), 3);
    rl_free(&r);
    /* "<" : fewer than 2 in the window. */
    r = rl_new("<", "2", "1m", 0);
    assert_int_equal(rate_step(&r, 100), 1);
    assert_int_equal(rate_step(&r, 110), 0);
    assert_int_equal(rate_step(&r, 300), 1);
    rl_free(&r);
}

/* Events that arrive after newer ones: each counts the kept events up to
 * its own time; one older than everything kept counts alone and is not
 * kept. */
static void test_rate_limit_out_of_order(void **state)
{
    rl r = rl_new(">=", "5", "1h", 0);
    const int ts[] = {100, 250, 200, 150, 300};

    (void)state;
    for (int i = 0; i < 5; i++)
        assert_int_equal(rate_step(&r, 1700000000 + ts[i]), i == 4); /* the fifth makes 5 in the hour */
    assert_int_equal(kept(&r), 5);
    rl_free(&r);

    r = rl_new(">=", "3", "60s", 0);
    assert_int_equal(rate_step(&r, 1000), 0); /* 1 */
    assert_int_equal(rate_step(&r, 1050), 0); /* 2 */
    assert_int_equal(rate_step(&r, 1020), 0); /* late: 1000, 1020 (1050 is after it) */
    assert_int_equal(rate_step(&r, 1051), 1); /* 1000, 1020, 1050, 1051 */
    assert_int_equal(rate_step(&r, 900), 0);  /* before everything kept: alone */
    assert_int_equal(kept(&r), 4);            /* and not kept */
    assert_int_equal(rate_step(&r, 1052), 1);
    assert_int_equal(kept(&r), 5);
    rl_free(&r);
}

/* The worst trigger the limits allow keeps a state of bounded size, and
 * the stored form restores the same counts. */
static void test_rate_limit_state_bounded_and_roundtrip(void **state)
{
    char conds[4096];
    size_t off = 0;
    cJSON *c, *j;
    trigger_model_matcher *m;
    trigger_model_state *st, *back;
    char *a, *b;
    size_t len = 0;

    (void)state;
    off += (size_t)snprintf(conds + off, sizeof(conds) - off, "[");
    for (int i = 0; i < TRIGGER_MODEL_MAX_STATEFUL; i++)
        off += (size_t)snprintf(conds + off, sizeof(conds) - off,
                                "%s{\"condition_type\":\"rate_limit\",\"operator\":\">=\",\"value\":\"100000\","
                                "\"config\":{\"time_window\":\"%dd\"}}",
                                i ? "," : "", 365 - i);
    snprintf(conds + off, sizeof(conds) - off, "]");
    c = J(conds);
    m = trigger_model_matcher_new(c, "t");
    assert_false(trigger_model_matcher_never(m));
    st = trigger_model_state_new(m, NULL);
    for (long i = 0; i < 200000; i++) {
        char ev[64];
        cJSON *e;

        snprintf(ev, sizeof(ev), "{\"timestamp\":%ld}", 1700000000 + i * 60);
        e = J(ev);
        assert_int_equal(trigger_model_match(m, e, st, NULL, 0), i >= 99999);
        cJSON_Delete(e);
    }
    a = trigger_model_state_text(st, &len);
    assert_non_null(a);
    assert_true(len < (size_t)TRIGGER_MODEL_MAX_STATEFUL * 2600);
    j = J(a);
    back = trigger_model_state_new(m, j);
    b = trigger_model_state_text(back, NULL);
    assert_string_equal(a, b);
    free(a);
    free(b);
    cJSON_Delete(j);
    trigger_model_state_free(back);
    trigger_model_state_free(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
}

/* trigger_state rows written before the buckets ("times") keep their counts. */
static void test_rate_limit_legacy_state(void **state)
{
    rl r = rl_new(">=", "4", "60s", 0);
    cJSON *old = J("{\"0\":{\"type\":\"rate_limit\",\"window_s\":60,\"times\":[1000,1010,1020]}}");
    cJSON *stale = J("{\"0\":{\"type\":\"rate_limit\",\"window_s\":3600,\"times\":[1000,1010,1020]}}");

    (void)state;
    trigger_model_state_free(r.st);
    r.st = trigger_model_state_new(r.m, old);
    assert_int_equal(kept(&r), 3);
    assert_int_equal(rate_step(&r, 1030), 1); /* 4 */
    trigger_model_state_free(r.st);
    r.st = trigger_model_state_new(r.m, stale); /* another window: restarts */
    assert_int_equal(rate_step(&r, 1030), 0);
    assert_int_equal(kept(&r), 1);
    cJSON_Delete(old);
    cJSON_Delete(stale);
    rl_free(&r);
}

/* The limits that keep one trigger or user from stalling everyone's
 * matching, the same for the gateway (validation) and the processor
 * (stored rows). */
static void test_limits(void **state)
{
    char body[8192], conds[6000];
    cJSON *b, *d = NULL, *c;
    trigger_model_matcher *m;
    size_t off;

    (void)state;
    for (int n = TRIGGER_MODEL_MAX_STATEFUL; n <= TRIGGER_MODEL_MAX_STATEFUL + 1; n++) {
        off = (size_t)snprintf(conds, sizeof(conds), "[");
        for (int i = 0; i < n; i++)
            off += (size_t)snprintf(conds + off, sizeof(conds) - off,
                                    "%s{\"condition_type\":\"%s\",\"operator\":\">\",\"value\":\"1\","
                                    "\"config\":{\"time_window\":\"1h\",\"window_size\":3}}",
                                    i ? "," : "", i % 2 ? "ema_threshold" : "rate_limit");
        snprintf(conds + off, sizeof(conds) - off, "]");
        snprintf(body, sizeof(body),
                 "{\"name\":\"n\",\"chain_id\":1,\"registry\":\"reputation\",\"conditions\":%s,"
                 "\"actions\":[{\"action_type\":\"telegram\",\"config\":{\"chat_id\":1}}]}",
                 conds);
        b = J(body);
        c = J(conds);
        m = trigger_model_matcher_new(c, "t");
        if (n == TRIGGER_MODEL_MAX_STATEFUL) {
            assert_int_equal(trigger_model_validate(b, &d), 0);
            assert_false(trigger_model_matcher_never(m));
        } else {
            assert_int_equal(trigger_model_validate(b, &d), -1);
            assert_non_null(strstr(msg(d, "conditions"), "at most 8 stateful conditions"));
            assert_true(trigger_model_matcher_never(m));
            assert_int_equal(m1(conds, "{\"score\":5,\"timestamp\":100}"), 0);
        }
        cJSON_Delete(d);
        d = NULL;
        trigger_model_matcher_free(m);
        cJSON_Delete(c);
        cJSON_Delete(b);
    }
    /* The largest rate_limit value is 100000. */
    b = J("{\"name\":\"n\",\"chain_id\":1,\"registry\":\"reputation\",\"conditions\":["
          "{\"condition_type\":\"rate_limit\",\"operator\":\">\",\"value\":100001,\"config\":{\"time_window\":\"1d\"}}],"
          "\"actions\":[{\"action_type\":\"telegram\",\"config\":{\"chat_id\":1}}]}");
    assert_int_equal(trigger_model_validate(b, &d), -1);
    assert_string_equal(msg(d, "conditions[0].value"), "must be between 0 and 100000");
    cJSON_Delete(d);
    cJSON_Delete(b);
    /* Triggers per user, and stateful conditions per user in all. */
    b = J("{\"name\":\"n\",\"chain_id\":1,\"registry\":\"reputation\",\"conditions\":["
          "{\"condition_type\":\"rate_limit\",\"operator\":\">\",\"value\":5,\"config\":{\"time_window\":\"1d\"}},"
          "{\"condition_type\":\"ema_threshold\",\"operator\":\">\",\"value\":5,\"config\":{\"window_size\":3}}],"
          "\"actions\":[{\"action_type\":\"telegram\",\"config\":{\"chat_id\":1}}]}");
    {
        cJSON *det = cJSON_CreateObject();
        trigger_model_def *def = trigger_model_parse(b, det);

        assert_non_null(def);
        assert_int_equal(trigger_model_check_user_limits(TRIGGER_MODEL_MAX_TRIGGERS_PER_USER - 1,
                                                         TRIGGER_MODEL_MAX_STATEFUL_PER_USER - 2, def, 1, det), 0);
        assert_int_equal(cJSON_GetArraySize(det), 0);
        assert_int_equal(trigger_model_check_user_limits(TRIGGER_MODEL_MAX_TRIGGERS_PER_USER, 0, def, 1, det), -1);
        assert_non_null(strstr(msg(det, "triggers"), "at most 100 triggers"));
        assert_null(msg(det, "conditions"));
        cJSON_Delete(det);
        det = cJSON_CreateObject();
        /* A replacement does not add a trigger, but its conditions count. */
        assert_int_equal(trigger_model_check_user_limits(TRIGGER_MODEL_MAX_TRIGGERS_PER_USER, 0, def, 0, det), 0);
        assert_int_equal(trigger_model_check_user_limits(5, TRIGGER_MODEL_MAX_STATEFUL_PER_USER - 1, def, 0, det), -1);
        assert_non_null(strstr(msg(det, "conditions"), "at most 32 stateful conditions"));
        assert_null(msg(det, "triggers"));
        cJSON_Delete(det);
        trigger_model_def_free(def);
    }
    cJSON_Delete(b);
}

static void test_hints(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"agent_id_equals\",\"value\":\"9\"},"
                 "{\"condition_type\":\"event_type_equals\",\"value\":\"NewFeedback\"}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    int64_t a = 0;

    (void)state;
    assert_int_equal(trigger_model_matcher_agent_id(m, &a), 1);
    assert_int_equal(a, 9);
    assert_string_equal(trigger_model_matcher_event_type(m), "NewFeedback");
    assert_false(trigger_model_matcher_stateful(m));
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
    trigger_model_matcher_free(NULL);
    trigger_model_def_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_body),
        cmocka_unit_test(test_every_bad_field),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_parse_window),
        cmocka_unit_test(test_stateless_types),
        cmocka_unit_test(test_score_operators),
        cmocka_unit_test(test_unknown_and_bad_rows_never_match),
        cmocka_unit_test(test_ema_sequence),
        cmocka_unit_test(test_ema_sees_only_passing_events),
        cmocka_unit_test(test_rate_limit_window),
        cmocka_unit_test(test_rate_limit_reset_and_ops),
        cmocka_unit_test(test_rate_limit_out_of_order),
        cmocka_unit_test(test_rate_limit_window_edges),
        cmocka_unit_test(test_rate_limit_long_window_buckets),
        cmocka_unit_test(test_rate_limit_state_bounded_and_roundtrip),
        cmocka_unit_test(test_rate_limit_legacy_state),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_hints),
    };

    log_init("test", "error", "text");
    return cmocka_run_group_tests(tests, NULL, NULL);
}
