/* Unit tests for jget: a string member is returned, anything else (other
 * types, a missing member, another case, a non-object, NULL) gives NULL. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_str),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
