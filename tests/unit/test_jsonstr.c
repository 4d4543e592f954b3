/* Unit tests of libshared/jsonstr: the escapes themselves, every byte
 * round-tripping through a JSON parser (cJSON), the bounded form never
 * cutting an escape in two, and the three entry points agreeing. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <cmocka.h>

#include "buf.h"
#include "jsonstr.h"

static void test_escapes(void **state)
{
    char out[64];

    (void)state;
    assert_string_equal(jsonstr_into(out, sizeof(out), "a\"b\\c\nd\x01"), "a\\\"b\\\\c\\nd\\u0001");
    assert_string_equal(jsonstr_into(out, sizeof(out), "\b\f\r\t\x1f\x7f"), "\\b\\f\\r\\t\\u001f\\u007f");
    assert_string_equal(jsonstr_into(out, sizeof(out), "plain, caf\xc3\xa9"), "plain, caf\xc3\xa9");
    assert_string_equal(jsonstr_into(out, sizeof(out), NULL), "");
}

/* Every byte 1..255 escaped, quoted and parsed back gives the same bytes. */
static void test_round_trip(void **state)
{
    char raw[256], *dup;
    buf b, q;
    cJSON *v;

    (void)state;
    for (int i = 1; i < 256; i++)
        raw[i - 1] = (char)i;
    raw[255] = '\0';
    buf_init(&b, 0);
    buf_init(&q, 0);
    assert_int_equal(jsonstr_puts(&b, raw), 0);
    dup = jsonstr_dup(raw);
    assert_non_null(dup);
    assert_string_equal(dup, buf_str(&b));
    assert_int_equal(buf_puts(&q, "\""), 0);
    assert_int_equal(buf_puts(&q, dup), 0);
    assert_int_equal(buf_puts(&q, "\""), 0);
    v = cJSON_Parse(buf_str(&q));
    assert_non_null(v);
    assert_true(cJSON_IsString(v));
    assert_memory_equal(v->valuestring, raw, 256);
    cJSON_Delete(v);
    free(dup);
    buf_free(&b);
    buf_free(&q);
}

/* The length form escapes what it is given, NUL bytes included. */
static void test_length_form(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(jsonstr_append(&b, "a\0b\"", 4), 0);
    assert_string_equal(buf_str(&b), "a\\u0000b\\\"");
    assert_int_equal(jsonstr_append(&b, "xyz", 0), 0);
    assert_int_equal(b.len, strlen("a\\u0000b\\\""));
    buf_free(&b);
}

/* Cut at the last whole escape: never "\" or "\u00" at the end. */
static void test_bounded(void **state)
{
    char out[8];

    (void)state;
    assert_string_equal(jsonstr_into(out, 4, "\"\"\""), "\\\"");
    assert_string_equal(jsonstr_into(out, 7, "ab\x01"), "ab");
    assert_string_equal(jsonstr_into(out, 8, "a\x01"), "a\\u0001");
    assert_string_equal(jsonstr_into(out, 1, "abc"), "");
    out[0] = 'x';
    assert_ptr_equal(jsonstr_into(out, 0, "abc"), out);
    assert_int_equal(out[0], 'x');
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_length_form),
        cmocka_unit_test(test_bounded),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
