/* Unit tests of libshared/pgarr: array literals as PostgreSQL's array
 * input reads them (quotes and backslashes escaped, NULL unquoted, commas
 * only between elements), and the UTF-8 repair flag. That the server
 * accepts them is covered by the event-processor and action-workers
 * integration tests, which send every batch this way. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"
#include "pgarr.h"

static void test_elements(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(buf_puts(&b, "{"), 0);
    assert_int_equal(pgarr_add(&b, "plain", 0), 0);
    assert_int_equal(pgarr_add(&b, "a\"b\\c", 0), 0);
    assert_int_equal(pgarr_add(&b, NULL, 0), 0);
    assert_int_equal(pgarr_add(&b, "", 0), 0);
    assert_int_equal(pgarr_add(&b, "NULL", 0), 0);
    assert_int_equal(pgarr_add(&b, "{x, y}", 0), 0);
    assert_int_equal(buf_puts(&b, "}"), 0);
    assert_string_equal(buf_str(&b), "{\"plain\",\"a\\\"b\\\\c\",NULL,\"\",\"NULL\",\"{x, y}\"}");
    buf_free(&b);
}

/* No comma before the first element, whether or not the '{' was written. */
static void test_first(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(pgarr_add(&b, "a", 0), 0);
    assert_int_equal(pgarr_add(&b, "b", 0), 0);
    assert_string_equal(buf_str(&b), "\"a\",\"b\"");
    buf_free(&b);
}

static void test_utf8(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(buf_puts(&b, "{"), 0);
    assert_int_equal(pgarr_add(&b, "x\xff\"y\xc3", PGARR_UTF8), 0);
    assert_int_equal(pgarr_add(&b, "kept\xff", 0), 0);
    assert_string_equal(buf_str(&b), "{\"x\xef\xbf\xbd\\\"y\xef\xbf\xbd\",\"kept\xff\"");
    buf_free(&b);
}

/* Past the buffer's maximum the literal is cut and says so. */
static void test_bounded(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 8);
    assert_int_equal(buf_puts(&b, "{"), 0);
    assert_int_equal(pgarr_add(&b, "abcdefgh", 0), 0);
    assert_true(b.truncated > 0);
    assert_int_equal(b.len, 8);
    buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_elements),
        cmocka_unit_test(test_first),
        cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_bounded),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
