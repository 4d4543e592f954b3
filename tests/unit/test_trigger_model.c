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

/* Matches `event` against `conds` statelessly (state must not change). */
static int m1(const char *conds, const char *event)
{
    cJSON *c = J(conds), *e = J(event), *st = NULL;
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    int r;

    assert_non_null(m);
    r = trigger_model_match(m, e, NULL, &st, 1000);
    if (!trigger_model_matcher_stateful(m))
        assert_null(st);
    cJSON_Delete(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
    cJSON_Delete(e);
    return r;
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
    const int scores[] = {50, 70, 90, 20, 100};
    /* alpha = 0.5: 50, 60, 75, 47.5, 73.75 */
    const double want[] = {50, 60, 75, 47.5, 73.75};
    const int match[] = {0, 0, 1, 0, 1};
    cJSON *st = NULL;

    (void)state;
    for (int i = 0; i < 5; i++) {
        char ev[64];
        cJSON *e, *out = NULL;
        const cJSON *ent, *ema, *cnt;

        snprintf(ev, sizeof(ev), "{\"score\":%d}", scores[i]);
        e = J(ev);
        assert_int_equal(trigger_model_match(m, e, st, &out, 0), match[i]);
        assert_non_null(out);
        ent = cJSON_GetObjectItem(out, "0");
        ema = cJSON_GetObjectItem(ent, "ema");
        cnt = cJSON_GetObjectItem(ent, "count");
        assert_true(fabs(ema->valuedouble - want[i]) < 1e-9);
        assert_int_equal((int)cnt->valuedouble, i + 1);
        cJSON_Delete(st);
        st = out;
        cJSON_Delete(e);
    }
    /* An event without a score: no match, EMA unchanged. */
    {
        cJSON *e = J("{\"agent_id\":1}"), *out = NULL;

        assert_int_equal(trigger_model_match(m, e, st, &out, 0), 0);
        assert_true(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(out, "0"), "ema")->valuedouble - 73.75) < 1e-9);
        cJSON_Delete(out);
        cJSON_Delete(e);
    }
    /* A stale state (other window size) restarts from the new score. */
    {
        cJSON *old = J("{\"0\":{\"type\":\"ema_threshold\",\"window_size\":9,\"ema\":1000,\"count\":5}}");
        cJSON *e = J("{\"score\":61}"), *out = NULL;

        assert_int_equal(trigger_model_match(m, e, old, &out, 0), 1);
        assert_true(fabs(cJSON_GetObjectItem(cJSON_GetObjectItem(out, "0"), "ema")->valuedouble - 61) < 1e-9);
        cJSON_Delete(out);
        cJSON_Delete(old);
        cJSON_Delete(e);
    }
    cJSON_Delete(st);
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
    cJSON *e = J("{\"agent_id\":8,\"score\":10}"), *out = NULL;

    (void)state;
    assert_int_equal(trigger_model_match(m, e, NULL, &out, 0), 0);
    assert_null(out);
    cJSON_Delete(e);
    e = J("{\"agent_id\":7,\"score\":10}");
    assert_int_equal(trigger_model_match(m, e, NULL, &out, 0), 1);
    assert_non_null(cJSON_GetObjectItem(out, "1"));
    cJSON_Delete(out);
    cJSON_Delete(e);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
}

static int rate_step(trigger_model_matcher *m, cJSON **st, long ts)
{
    char ev[64];
    cJSON *e, *out = NULL;
    int r;

    if (ts >= 0)
        snprintf(ev, sizeof(ev), "{\"timestamp\":%ld}", ts);
    else
        snprintf(ev, sizeof(ev), "{}");
    e = J(ev);
    r = trigger_model_match(m, e, *st, &out, 5000);
    assert_non_null(out);
    cJSON_Delete(*st);
    *st = out;
    cJSON_Delete(e);
    return r;
}

static void test_rate_limit_window(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"rate_limit\",\"operator\":\">=\",\"value\":\"3\","
                 "\"config\":{\"time_window\":\"60s\"}}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    cJSON *st = NULL;

    (void)state;
    assert_int_equal(rate_step(m, &st, 1000), 0); /* 1 */
    assert_int_equal(rate_step(m, &st, 1010), 0); /* 2 */
    assert_int_equal(rate_step(m, &st, 1020), 1); /* 3 */
    assert_int_equal(rate_step(m, &st, 1030), 1); /* 4 */
    assert_int_equal(rate_step(m, &st, 1075), 1); /* 1020,1030,1075 = 3 (1000,1010 left the window) */
    assert_int_equal(rate_step(m, &st, 1200), 0); /* alone */
    /* Bounded: never more than ceil(3)+2 times kept. */
    for (int i = 0; i < 50; i++)
        rate_step(m, &st, 1201 + i);
    assert_true(cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(st, "0"), "times")) <= 5);
    /* No timestamp: the clock given (5000) is used. */
    assert_int_equal(rate_step(m, &st, -1), 0);
    cJSON_Delete(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
}

static void test_rate_limit_reset_and_ops(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"rate_limit\",\"operator\":\">\",\"value\":\"1\","
                 "\"config\":{\"time_window\":\"1h\",\"reset_on_trigger\":true}}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    cJSON *st = NULL;

    (void)state;
    assert_int_equal(rate_step(m, &st, 100), 0); /* 1 */
    assert_int_equal(rate_step(m, &st, 101), 1); /* 2 > 1: match, reset */
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(cJSON_GetObjectItem(st, "0"), "times")), 0);
    assert_int_equal(rate_step(m, &st, 102), 0); /* 1 again */
    assert_int_equal(rate_step(m, &st, 103), 1);
    cJSON_Delete(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
    /* "<" : fewer than 2 in the window. */
    c = J("[{\"condition_type\":\"rate_limit\",\"operator\":\"<\",\"value\":\"2\",\"config\":{\"time_window\":\"1m\"}}]");
    m = trigger_model_matcher_new(c, "t");
    st = NULL;
    assert_int_equal(rate_step(m, &st, 100), 1);
    assert_int_equal(rate_step(m, &st, 110), 0);
    assert_int_equal(rate_step(m, &st, 300), 1);
    cJSON_Delete(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
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

/* Events of one window arriving out of time order are all counted, and
 * the kept times stay sorted (cJSON 1.7.15's middle insert lost them). */
static void test_rate_limit_out_of_order(void **state)
{
    cJSON *c = J("[{\"condition_type\":\"rate_limit\",\"operator\":\">=\",\"value\":\"5\","
                 "\"config\":{\"time_window\":\"1h\"}}]");
    trigger_model_matcher *m = trigger_model_matcher_new(c, "t");
    const int ts[] = {100, 250, 200, 150, 300};
    cJSON *st = NULL;
    int r = 0;

    (void)state;
    for (int i = 0; i < 5; i++) {
        char buf[128];
        cJSON *e, *next = NULL;

        snprintf(buf, sizeof(buf), "{\"chain_id\":1,\"registry\":\"reputation\",\"timestamp\":%d}", 1700000000 + ts[i]);
        e = J(buf);
        r = trigger_model_match(m, e, st, &next, 1700000000);
        cJSON_Delete(e);
        assert_non_null(next);
        cJSON_Delete(st);
        st = next;
    }
    assert_int_equal(r, 1); /* the fifth event makes 5 in the hour */
    {
        const cJSON *times = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(st, "0"), "times");
        char *txt = cJSON_PrintUnformatted(times);

        assert_string_equal(txt, "[1700000100,1700000150,1700000200,1700000250,1700000300]");
        cJSON_free(txt);
    }
    cJSON_Delete(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(c);
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
        cmocka_unit_test(test_hints),
    };

    log_init("test", "error", "text");
    return cmocka_run_group_tests(tests, NULL, NULL);
}
