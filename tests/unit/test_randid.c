/* Unit tests for randid: UUID shape (8-4-4-4-12 lowercase hex, version 4,
 * RFC 4122 variant), prefixes and cuts, no repeats, and randid_fill
 * filling every byte. */
#include <ctype.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "randid.h"

static void assert_uuid(const char *s)
{
    assert_int_equal(strlen(s), RANDID_UUID_LEN);
    for (int i = 0; i < RANDID_UUID_LEN; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23)
            assert_int_equal(s[i], '-');
        else
            assert_true(isxdigit((unsigned char)s[i]) && !isupper((unsigned char)s[i]));
    }
    assert_int_equal(s[14], '4');
    assert_non_null(strchr("89ab", s[19]));
}

static int cmp(const void *a, const void *b)
{
    return strcmp(a, b);
}

static void test_uuid(void **state)
{
    enum { N = 20000 };
    char (*ids)[RANDID_UUID_LEN + 1] = calloc(N, sizeof(*ids));

    (void)state;
    assert_non_null(ids);
    for (int i = 0; i < N; i++) {
        assert_int_equal(randid_uuid(ids[i], sizeof(ids[i]), ""), RANDID_UUID_LEN);
        assert_uuid(ids[i]);
    }
    qsort(ids, N, sizeof(*ids), cmp);
    for (int i = 1; i < N; i++)
        assert_string_not_equal(ids[i - 1], ids[i]);
    free(ids);
}

static void test_prefix(void **state)
{
    char out[64], small[10];

    (void)state;
    assert_int_equal(randid_uuid(out, sizeof(out), "codexw_"), 7 + RANDID_UUID_LEN);
    assert_memory_equal(out, "codexw_", 7);
    assert_uuid(out + 7);
    assert_int_equal(randid_uuid(small, sizeof(small), "room_"), sizeof(small) - 1);
    assert_memory_equal(small, "room_", 5);
    assert_int_equal(strlen(small), sizeof(small) - 1);
    assert_int_equal(randid_uuid(small, 4, "room_"), 3);
    assert_string_equal(small, "roo");
}

static void test_fill(void **state)
{
    unsigned char a[64], b[64];
    int zero = 0;

    (void)state;
    memset(a, 0, sizeof(a));
    memset(b, 0, sizeof(b));
    randid_fill(a, sizeof(a));
    randid_fill(b, sizeof(b));
    assert_memory_not_equal(a, b, sizeof(a));
    for (size_t i = 0; i < sizeof(a); i++)
        zero += a[i] == 0;
    /* 12 zeros or more among 64 random bytes: a chance below 10^-16. */
    assert_true(zero < 12);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_uuid),
        cmocka_unit_test(test_prefix),
        cmocka_unit_test(test_fill),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
