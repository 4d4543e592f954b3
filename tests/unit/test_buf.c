/* Unit tests of libshared/buf: the maximum (buf_append cuts and counts,
 * buf_append_all and buf_extend refuse and leave the buffer unchanged),
 * growth, reserve, take, and the UTF-8 repair. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "buf.h"

static void test_append_cuts_at_max(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 5);
    assert_string_equal(buf_str(&b), "");
    assert_int_equal(buf_append(&b, "abc", 3), 0);
    assert_int_equal(buf_append(&b, "defg", 4), 0);
    assert_string_equal(buf_str(&b), "abcde");
    assert_int_equal(b.truncated, 2);
    buf_reset(&b);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.truncated, 0);
    assert_string_equal(buf_str(&b), "");
    buf_free(&b);
}

static void test_append_all_refuses(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 5);
    assert_int_equal(buf_append_all(&b, "abc", 3), 0);
    assert_int_equal(buf_append_all(&b, "def", 3), -1);
    assert_string_equal(buf_str(&b), "abc");
    assert_int_equal(b.truncated, 0);
    assert_int_equal(buf_append_all(&b, "de", 2), 0);
    assert_string_equal(buf_str(&b), "abcde");
    assert_int_equal(buf_append_all(&b, "", 0), 0);
    buf_free(&b);
}

/* Many small appends through the inline path and its slow path. */
static void test_growth(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 1 << 20);
    for (int i = 0; i < 10000; i++)
        assert_int_equal(buf_append_all(&b, "0123456789", 10), 0);
    assert_int_equal(b.len, 100000);
    assert_int_equal(strlen(buf_str(&b)), 100000);
    assert_memory_equal(b.p + 99990, "0123456789", 10);
    buf_free(&b);
}

static void test_extend(void **state)
{
    buf b;
    char *w;

    (void)state;
    buf_init(&b, 10);
    assert_int_equal(buf_puts(&b, "ab"), 0);
    w = buf_extend(&b, 3);
    assert_non_null(w);
    memcpy(w, "xyz", 3);
    assert_string_equal(buf_str(&b), "abxyz");
    assert_null(buf_extend(&b, 6));
    assert_int_equal(b.len, 5);
    assert_null(buf_extend(&b, (size_t)-1));
    assert_non_null(buf_extend(&b, 5));
    assert_int_equal(b.len, 10);
    buf_free(&b);
}

/* Reserving a little more before each append must not copy the buffer
 * each time: the capacity at least doubles. */
static void test_reserve(void **state)
{
    buf b;
    int grows = 0;

    (void)state;
    buf_init(&b, 1 << 20);
    for (size_t n = 1; n <= 100000; n++) {
        size_t cap = b.cap;

        assert_int_equal(buf_reserve(&b, n), 0);
        assert_true(b.cap >= n + 1);
        grows += b.cap != cap;
    }
    assert_true(grows < 20);
    assert_int_equal(buf_reserve(&b, (size_t)1 << 30), 0);
    assert_int_equal(b.cap, (1 << 20) + 1);
    buf_free(&b);
}

static void test_take(void **state)
{
    buf b;
    char *s;

    (void)state;
    buf_init(&b, 0);
    s = buf_take(&b);
    assert_non_null(s);
    assert_string_equal(s, "");
    free(s);
    assert_int_equal(buf_puts(&b, "kept"), 0);
    s = buf_take(&b);
    assert_string_equal(s, "kept");
    assert_int_equal(b.len, 0);
    assert_null(b.p);
    free(s);
}

static void test_utf8_repair(void **state)
{
    static const char in[] = "ok \xc3\xa9 \xff \xe2\x82 \xed\xa0\x80 \xf0\x9f\x98\x80";
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(buf_append_utf8(&b, in, sizeof(in) - 1), 0);
    /* A lone byte, a truncated sequence and each byte of a surrogate's
     * encoding (ED is valid only before 80-9F) become U+FFFD. */
    assert_string_equal(buf_str(&b), "ok \xc3\xa9 \xef\xbf\xbd \xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd "
                                     "\xf0\x9f\x98\x80");
    buf_free(&b);
}

static void test_utf8_valid(void **state)
{
    (void)state;
    assert_int_equal(buf_utf8_valid("", 0), 0);
    assert_int_equal(buf_utf8_valid("plain", 5), 5);
    assert_int_equal(buf_utf8_valid("caf\xC3\xA9 \xF0\x9F\x98\x80", 10), 10);
    assert_int_equal(buf_utf8_valid("ab\xFF" "cd", 5), 2);        /* never a UTF-8 byte */
    assert_int_equal(buf_utf8_valid("a\xC0\xAF", 3), 1);       /* overlong "/" */
    assert_int_equal(buf_utf8_valid("a\xED\xA0\x80", 4), 1);   /* a surrogate */
    assert_int_equal(buf_utf8_valid("\xF4\x90\x80\x80", 4), 0); /* past U+10FFFF */
    assert_int_equal(buf_utf8_valid("ok\xE2\x82", 4), 2);      /* cut short */
    assert_int_equal(buf_utf8_valid("a\0b", 3), 3);             /* NUL is UTF-8 */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_append_cuts_at_max), cmocka_unit_test(test_append_all_refuses),
        cmocka_unit_test(test_growth),             cmocka_unit_test(test_extend),
        cmocka_unit_test(test_reserve),            cmocka_unit_test(test_take),
        cmocka_unit_test(test_utf8_repair),        cmocka_unit_test(test_utf8_valid),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
