/* Unit tests of libshared/canonjson: sorted keys at every depth, no
 * whitespace, minimal string escapes, integral and shortest numbers, and
 * the sha256 of known texts. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "canonjson.h"

static void expect_canon(const char *json, const char *want)
{
    cJSON *v = cJSON_Parse(json);
    buf b;

    assert_non_null(v);
    buf_init(&b, 0);
    assert_int_equal(canonjson_append(&b, v), 0);
    assert_string_equal(buf_str(&b), want);
    buf_free(&b);
    cJSON_Delete(v);
}

static void test_sorted_compact(void **state)
{
    (void)state;
    expect_canon("{ \"b\": 1, \"a\": {\"z\": [3, {\"y\": null, \"x\": true}], \"aa\": false} }",
                 "{\"a\":{\"aa\":false,\"z\":[3,{\"x\":true,\"y\":null}]},\"b\":1}");
    expect_canon("[]", "[]");
    expect_canon("{}", "{}");
    /* Bytewise order: upper case before lower, shorter prefix first. */
    expect_canon("{\"b\":0,\"B\":0,\"ab\":0,\"a\":0}", "{\"B\":0,\"a\":0,\"ab\":0,\"b\":0}");
}

static void test_strings(void **state)
{
    (void)state;
    expect_canon("\"q\\\"b\\\\n\\n\\t\\u0001\\u001f\"", "\"q\\\"b\\\\n\\n\\t\\u0001\\u001f\"");
    expect_canon("\"caf\\u00e9 \\u2603 /\"", "\"caf\xc3\xa9 \xe2\x98\x83 /\"");
}

/* canonjson_string alone (RTES's lineage key, serde_json's escaping):
 * short forms, \u00xx for the other controls, DEL and UTF-8 as they are. */
static void test_string_alone(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(canonjson_string(&b, "a\"\\\b\f\n\r\t\x01\x1f\x7f\xc3\xa9"), 0);
    assert_string_equal(buf_str(&b), "\"a\\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u001f\x7f\xc3\xa9\"");
    buf_free(&b);
}

static void test_numbers(void **state)
{
    (void)state;
    expect_canon("[1, -0, 2.5, 1.0, 100, 0.1, 1e21, 1e20, -3.25e-7, 12345678901234]",
                 "[1,0,2.5,1,100,0.1,1e+21,1e+20,-3.25e-07,12345678901234]");
}

static void test_sha256(void **state)
{
    char h[CANONJSON_HASH_LEN];
    cJSON *v = cJSON_Parse("{\"b\":2,\"a\":1}");

    (void)state;
    canonjson_sha256_bytes("", 0, h);
    assert_string_equal(h, "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_int_equal(canonjson_sha256(v, h), 0);
    /* sha256 of the text {"a":1,"b":2} */
    assert_string_equal(h, "sha256:43258cff783fe7036d8a43033f830adfc60ec037382473548ac742b888292777");
    cJSON_Delete(v);
}

/* The hash fed in pieces equals the hash of the whole document, and a
 * value that cannot be written fails the hash instead of skipping. */
static void test_streaming_hash(void **state)
{
    const char *items[] = {"{\"z\":[1,{\"y\":null}],\"a\":\"\\u00e9\"}", "2.5", "\"x\"", "{}"};
    char whole[CANONJSON_HASH_LEN], pieces[CANONJSON_HASH_LEN];
    cJSON *list = cJSON_CreateArray(), *deep, *one;
    canonjson_hash *h = canonjson_hash_new();

    (void)state;
    assert_non_null(h);
    canonjson_hash_raw(h, "[", 1);
    for (size_t i = 0; i < sizeof(items) / sizeof(items[0]); i++) {
        cJSON *v = cJSON_Parse(items[i]);

        assert_non_null(v);
        if (i)
            canonjson_hash_raw(h, ",", 1);
        assert_int_equal(canonjson_hash_value(h, v), 0);
        cJSON_AddItemToArray(list, v);
    }
    canonjson_hash_raw(h, "]", 1);
    assert_int_equal(canonjson_hash_final(h, pieces), 0);
    assert_int_equal(canonjson_sha256(list, whole), 0);
    assert_string_equal(pieces, whole);
    canonjson_hash_free(h);
    cJSON_Delete(list);

    h = canonjson_hash_new();
    deep = cJSON_CreateArray();
    for (int i = 0; i < CANONJSON_MAX_DEPTH + 2; i++) {
        cJSON *outer = cJSON_CreateArray();

        cJSON_AddItemToArray(outer, deep);
        deep = outer;
    }
    assert_int_equal(canonjson_hash_value(h, deep), -1);
    /* A good value after the failure does not make the hash good again. */
    one = cJSON_CreateNumber(1);
    assert_int_equal(canonjson_hash_value(h, one), -1);
    assert_int_equal(canonjson_hash_final(h, pieces), -1);
    canonjson_hash_free(h);
    cJSON_Delete(deep);
    cJSON_Delete(one);
}

static void test_depth_and_limit(void **state)
{
    char deep[2 * (CANONJSON_MAX_DEPTH + 10) + 1];
    cJSON *v;
    buf b;
    int i, n = CANONJSON_MAX_DEPTH + 5;

    (void)state;
    for (i = 0; i < n; i++)
        deep[i] = '[';
    for (i = 0; i < n; i++)
        deep[n + i] = ']';
    deep[2 * n] = '\0';
    v = cJSON_Parse(deep);
    assert_non_null(v);
    assert_int_equal(canonjson_depth(v), n);
    buf_init(&b, 0);
    assert_int_equal(canonjson_append(&b, v), -1);
    buf_free(&b);
    cJSON_Delete(v);
    v = cJSON_Parse("{\"a\":\"0123456789\"}");
    assert_int_equal(canonjson_depth(v), 1);
    assert_int_equal(canonjson_depth(cJSON_GetObjectItemCaseSensitive(v, "a")), 0);
    buf_init(&b, 8);
    assert_int_equal(canonjson_append(&b, v), -1);
    buf_free(&b);
    cJSON_Delete(v);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sorted_compact), cmocka_unit_test(test_strings), cmocka_unit_test(test_string_alone), cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_sha256), cmocka_unit_test(test_streaming_hash), cmocka_unit_test(test_depth_and_limit),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
