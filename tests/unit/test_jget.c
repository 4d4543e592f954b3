/* Unit tests for jget: a string member is returned, anything else (other
 * types, a missing member, another case, a non-object, NULL) gives NULL;
 * jget_parse takes one RFC 8259 JSON text and says where and why it
 * refuses anything else that cJSON alone would take. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "jget.h"

static void test_str(void **state)
{
    cJSON *o = cJSON_Parse("{\"s\":\"v\",\"e\":\"\",\"n\":1,\"z\":null,\"b\":true,\"a\":[\"x\"],\"o\":{\"s\":\"in\"}}");
    cJSON *arr = cJSON_Parse("[\"s\"]");

    (void)state;
    assert_non_null(o);
    assert_string_equal(jget_str(o, "s"), "v");
    assert_string_equal(jget_str(o, "e"), "");
    assert_null(jget_str(o, "n"));
    assert_null(jget_str(o, "z"));
    assert_null(jget_str(o, "b"));
    assert_null(jget_str(o, "a"));
    assert_null(jget_str(o, "o"));
    assert_null(jget_str(o, "S"));
    assert_null(jget_str(o, "missing"));
    assert_string_equal(jget_str(cJSON_GetObjectItemCaseSensitive(o, "o"), "s"), "in");
    assert_null(jget_str(arr, "s"));
    assert_null(jget_str(NULL, "s"));
    cJSON_Delete(arr);
    cJSON_Delete(o);
}

static void refused(const char *s, size_t n, size_t want_at, const char *want_why)
{
    size_t at = 999;
    const char *why = NULL;

    assert_null(jget_parse(s, n, &at, &why));
    assert_int_equal(at, want_at);
    assert_string_equal(why, want_why);
}

/* n from the literal, which may hold a NUL */
#define REFUSED(lit, at, why) refused(lit, sizeof(lit) - 1, at, why)

static void test_parse(void **state)
{
    static const char *ok[] = {"{}", " {\"a\":[1,2.5e3,null,true]} \r\n\t", "\"caf\xc3\xa9\"", "0", "[\"\\u0001\\n\"]"};
    cJSON *j;

    (void)state;
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        j = jget_parse(ok[i], strlen(ok[i]), NULL, NULL);
        assert_non_null(j);
        cJSON_Delete(j);
    }
    j = jget_parse("{\"a\":1}", 7, NULL, NULL);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(j, "a")->valueint, 1);
    cJSON_Delete(j);
    /* What cJSON alone takes. */
    REFUSED("{\"a\":1},\"type\":\"x\"", 7, "trailing bytes");
    REFUSED("{} {}", 3, "trailing bytes");
    REFUSED("{\"a\":\"x\ny\"}", 7, "a control character");
    REFUSED("{\"a\":\"x\ty\"}", 7, "a control character");
    REFUSED("{\x01}", 1, "a control character");
    REFUSED("{\"a\":\"\xff\"}", 6, "invalid UTF-8");
    REFUSED("{\"a\":\"\xc3\"}", 6, "invalid UTF-8");
    /* An escaped quote does not end the string for the control check. */
    REFUSED("[\"\\\"\x02\"]", 4, "a control character");
    /* A NUL inside the length is a control character, not the end. */
    REFUSED("{}\0", 2, "a control character");
    REFUSED("{\"a\":", 4, "malformed JSON"); /* where cJSON stopped */
    REFUSED("", 0, "malformed JSON");
    assert_null(jget_parse("{", 1, NULL, NULL));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_str),
        cmocka_unit_test(test_parse),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
