/* Unit tests of the runtime's Khala pieces (runtime/khala.c) and sync
 * token policy (runtime/synctoken.c): topic classes, stale-cursor
 * reasons, the publish rate window, the poll interval guard and its
 * eviction bound, every token refusal reason and the scope matrix.
 *
 * The Makefile links unit tests against libshared only, so the modules'
 * sources are compiled into this binary directly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "../../runtime/khala.c"
#include "../../runtime/synctoken.c"

static void test_topic_class(void **state)
{
    char id[64];

    (void)state;
    assert_int_equal(khala_topic_class("run:abc:events"), KHALA_CLASS_RUN);
    assert_int_equal(khala_topic_class("worker:desk:1:lifecycle"), KHALA_CLASS_WORKER);
    assert_int_equal(khala_topic_class("run::events"), KHALA_CLASS_OTHER);
    assert_int_equal(khala_topic_class("fleet:user:1:workers"), KHALA_CLASS_OTHER);
    assert_string_equal(khala_class_name(KHALA_CLASS_RUN), "run_events");
    assert_int_equal(synctoken_parse_topic("worker:desk:1:lifecycle", id, sizeof(id)), SYNCTOKEN_TOPIC_WORKER);
    assert_string_equal(id, "desk:1");
    assert_int_equal(synctoken_parse_topic("run:r1:events", id, sizeof(id)), SYNCTOKEN_TOPIC_RUN);
    assert_string_equal(id, "r1");
    assert_int_equal(synctoken_parse_topic("run: :events", id, sizeof(id)), 0);
    assert_int_equal(synctoken_parse_topic("runs:r1:events", id, sizeof(id)), 0);
}

static void test_stale_reasons(void **state)
{
    const char *r[2];

    (void)state;
    assert_int_equal(khala_stale_reasons(10, 10, 20, 100, r), 0);
    assert_int_equal(khala_stale_reasons(9, 10, 20, 100, r), 1);
    assert_string_equal(r[0], "retention_floor_breach");
    assert_int_equal(khala_stale_reasons(5, 0, 20, 15, r), 0);
    assert_int_equal(khala_stale_reasons(4, 0, 20, 15, r), 1);
    assert_string_equal(r[0], "replay_budget_exceeded");
    assert_int_equal(khala_stale_reasons(1, 5, 30, 10, r), 2);
    /* A cursor at or beyond the head is never stale by budget. */
    assert_int_equal(khala_stale_reasons(40, 0, 30, 1, r), 0);
}

static void test_rate_window(void **state)
{
    khala_table *t = khala_table_new(16);
    long retry = 0;

    (void)state;
    assert_int_equal(khala_rate_take(t, "a", 2, 1000, &retry), 0);
    assert_int_equal(khala_rate_take(t, "a", 2, 1100, &retry), 0);
    assert_int_equal(khala_rate_take(t, "a", 2, 1300, &retry), -1);
    assert_int_equal(retry, 700);
    assert_int_equal(khala_rate_take(t, "b", 2, 1300, &retry), 0);
    assert_int_equal(khala_rate_take(t, "a", 2, 2000, &retry), 0);
    khala_table_free(t);
}

/* A publish given back frees its place in its own window only: a give
 * from a window that has ended changes nothing in the next. */
static void test_rate_give(void **state)
{
    khala_table *t = khala_table_new(16);
    long retry = 0;

    (void)state;
    assert_int_equal(khala_rate_take(t, "a", 1, 1000, &retry), 0);
    assert_int_equal(khala_rate_take(t, "a", 1, 1100, &retry), -1);
    khala_rate_give(t, "a", 1000);
    assert_int_equal(khala_rate_take(t, "a", 1, 1200, &retry), 0);
    khala_rate_give(t, "a", 1200);
    khala_rate_give(t, "a", 1200); /* more than was taken: no credit */
    assert_int_equal(khala_rate_take(t, "a", 1, 1300, &retry), 0);
    assert_int_equal(khala_rate_take(t, "a", 1, 1400, &retry), -1);
    assert_int_equal(khala_rate_take(t, "a", 1, 2100, &retry), 0);
    khala_rate_give(t, "a", 1300); /* taken in the window before */
    assert_int_equal(khala_rate_take(t, "a", 1, 2200, &retry), -1);
    khala_rate_give(t, "b", 1000); /* never taken */
    assert_int_equal(khala_rate_take(t, "b", 1, 1000, &retry), 0);
    assert_int_equal(khala_rate_take(t, "b", 1, 1001, &retry), -1);
    khala_table_free(t);
}

/* Keys longer than a slot holds are limited too (they were cut when
 * stored and never matched again), and two that share the head are not
 * one key. */
static void test_long_keys(void **state)
{
    khala_table *t = khala_table_new(16);
    char a[400], b[400];
    long retry = 0;

    (void)state;
    memset(a, 'x', sizeof(a) - 1);
    a[sizeof(a) - 1] = '\0';
    memcpy(b, a, sizeof(b));
    b[sizeof(b) - 2] = 'y';
    assert_int_equal(khala_guard_poll(t, a, 250, 1000, &retry), 0);
    assert_int_equal(khala_guard_poll(t, a, 250, 1100, &retry), -1);
    assert_int_equal(khala_guard_poll(t, b, 250, 1100, &retry), 0);
    assert_int_equal(khala_rate_take(t, a, 1, 5000, &retry), 0);
    assert_int_equal(khala_rate_take(t, a, 1, 5100, &retry), -1);
    khala_table_free(t);
}

static void test_guard_and_bound(void **state)
{
    khala_table *t = khala_table_new(8);
    long retry = 0;
    char key[32];
    int i;

    (void)state;
    assert_int_equal(khala_guard_poll(t, "p|t", 250, 1000, &retry), 0);
    assert_int_equal(khala_guard_poll(t, "p|t", 250, 1100, &retry), -1);
    assert_int_equal(retry, 150);
    /* A refused poll counts as the last one. */
    assert_int_equal(khala_guard_poll(t, "p|t", 250, 1300, &retry), -1);
    assert_int_equal(khala_guard_poll(t, "p|t", 250, 1550, &retry), 0);
    /* Thousands of keys in a table of 16 slots: bounded, still working. */
    for (i = 0; i < 5000; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        assert_int_equal(khala_guard_poll(t, key, 250, 2000, &retry), 0);
    }
    assert_int_equal(khala_guard_poll(t, "k4999", 250, 2001, &retry), -1);
    khala_table_free(t);
}

static synctoken *tok(void)
{
    synctoken_opts o = {"k", "iss", "aud", 300, 1, "r1, r2"};

    return synctoken_new(&o);
}

static char *sign(cJSON *claims, const char *key)
{
    jwtauth *j = jwtauth_new(key, NULL, NULL, 0);
    char *out = NULL;

    assert_int_equal(jwtauth_sign(j, claims, 600, &out), JWTAUTH_OK);
    jwtauth_free(j);
    cJSON_Delete(claims);
    return out;
}

static cJSON *base_claims(void)
{
    cJSON *c = cJSON_CreateObject();
    const char *scopes[] = {"runtime.run_events"};

    cJSON_AddStringToObject(c, "iss", "iss");
    cJSON_AddStringToObject(c, "aud", "aud");
    cJSON_AddStringToObject(c, "sub", "user:1");
    cJSON_AddNumberToObject(c, "oa_user_id", 1);
    cJSON_AddItemToObject(c, "oa_sync_scopes", cJSON_CreateStringArray(scopes, 1));
    return c;
}

static const char *reason(const synctoken *s, const char *header)
{
    synctoken_principal p;
    static synctoken_refusal why;

    if (synctoken_authenticate(s, header, &p, &why) == 0)
        return "ok";
    assert_int_equal(why.status, 401);
    assert_string_equal(why.error, "unauthorized");
    return why.reason_code;
}

static const char *with(cJSON *c, const char *key, char *hdr, size_t n)
{
    char *t = sign(c, key);

    snprintf(hdr, n, "Bearer %s", t);
    free(t);
    return hdr;
}

static void test_token_reasons(void **state)
{
    synctoken *s = tok();
    char hdr[4096];
    cJSON *c;
    double now = (double)time(NULL);

    (void)state;
    assert_string_equal(reason(s, NULL), "missing_authorization");
    assert_string_equal(reason(s, "Basic abc"), "invalid_authorization_scheme");
    assert_string_equal(reason(s, with(base_claims(), "k", hdr, sizeof(hdr))), "ok");
    assert_string_equal(reason(s, with(base_claims(), "other", hdr, sizeof(hdr))), "invalid_token");
    c = base_claims();
    cJSON_ReplaceItemInObject(c, "iss", cJSON_CreateString("x"));
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "invalid_token");
    c = base_claims();
    cJSON_DeleteItemFromObject(c, "sub");
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "invalid_token");
    c = base_claims();
    cJSON_AddNumberToObject(c, "exp", now - 5);
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "token_expired");
    c = base_claims();
    cJSON_AddNumberToObject(c, "iat", now - 400);
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "token_too_old");
    c = base_claims();
    cJSON_AddStringToObject(c, "jti", "r2");
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "token_revoked");
    c = base_claims();
    cJSON_AddStringToObject(c, "jti", "r");
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "ok");
    c = base_claims();
    cJSON_AddStringToObject(c, "jti", " ");
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "missing_jti");
    c = base_claims();
    cJSON_AddStringToObject(c, "iat", "yesterday");
    assert_string_equal(reason(s, with(c, "k", hdr, sizeof(hdr))), "missing_iat");
    synctoken_free(s);
}

static void test_scopes(void **state)
{
    synctoken_principal p;
    synctoken_refusal why;
    char id[64];

    (void)state;
    memset(&p, 0, sizeof(p));
    p.nscopes = 1;
    snprintf(p.scopes[0], sizeof(p.scopes[0]), "%s", "runtime.run_events");
    assert_int_equal(synctoken_authorize_topic(&p, "run:x:events", id, sizeof(id), &why), SYNCTOKEN_TOPIC_RUN);
    assert_int_equal(synctoken_authorize_topic(&p, "worker:w:lifecycle", id, sizeof(id), &why), -1);
    assert_string_equal(why.reason_code, "missing_scope");
    assert_int_equal(why.status, 403);
    assert_string_equal(why.error, "forbidden_topic");
    assert_int_equal(synctoken_authorize_topic(&p, "anything", id, sizeof(id), &why), -1);
    assert_string_equal(why.reason_code, "forbidden_topic");
    snprintf(p.scopes[0], sizeof(p.scopes[0]), "%s", "runtime.codex_worker_events");
    assert_int_equal(synctoken_authorize_topic(&p, "worker:w:lifecycle", id, sizeof(id), &why), SYNCTOKEN_TOPIC_WORKER);
    assert_int_equal(synctoken_authorize_topic(&p, "run:x:events", id, sizeof(id), &why), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topic_class), cmocka_unit_test(test_stale_reasons),
        cmocka_unit_test(test_rate_window),
        cmocka_unit_test(test_rate_give),
        cmocka_unit_test(test_guard_and_bound), cmocka_unit_test(test_long_keys),
        cmocka_unit_test(test_token_reasons), cmocka_unit_test(test_scopes),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
