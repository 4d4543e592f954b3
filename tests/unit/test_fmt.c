/* Unit tests for fmt: fmt_i64 against snprintf over edge and random
 * values, fmt_copy's cuts, fmt_hex against snprintf("%02x"), fmt_uuid and
 * fmt_rfc3339 against known values. */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "fmt.h"

static void check(long long v)
{
    char got[FMT_I64_MAX], want[32];
    size_t n = fmt_i64(got, v);

    snprintf(want, sizeof(want), "%lld", v);
    assert_string_equal(got, want);
    assert_int_equal(n, strlen(want));
}

static void test_edges(void **state)
{
    (void)state;
    check(0);
    check(1);
    check(-1);
    check(9);
    check(10);
    check(-10);
    check(LLONG_MAX);
    check(LLONG_MIN);
    check(INT_MAX);
    check(INT_MIN);
}

static void test_random(void **state)
{
    unsigned long long x = 88172645463325252ULL;

    (void)state;
    for (int i = 0; i < 100000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        long long v = (long long)(x >> (i % 64));

        check(i % 2 && v != LLONG_MIN ? -v : v);
    }
}

static void test_copy(void **state)
{
    char small[4], big[16];

    (void)state;
    assert_int_equal(fmt_copy(big, sizeof(big), "host:80"), 7);
    assert_string_equal(big, "host:80");
    assert_int_equal(fmt_copy(small, sizeof(small), "abcdef"), 3);
    assert_string_equal(small, "abc");
    assert_int_equal(fmt_copy(small, sizeof(small), ""), 0);
    assert_string_equal(small, "");
    assert_int_equal(fmt_copy(small, 1, "x"), 0);
    assert_string_equal(small, "");
}

static void test_hex(void **state)
{
    unsigned char b[256];
    char got[2 * sizeof(b) + 1], want[2 * sizeof(b) + 1];

    (void)state;
    for (size_t i = 0; i < sizeof(b); i++) {
        b[i] = (unsigned char)(255 - i);
        snprintf(want + 2 * i, 3, "%02x", b[i]);
    }
    assert_int_equal(fmt_hex(got, b, sizeof(b)), 2 * sizeof(b));
    assert_string_equal(got, want);
    got[0] = 'x';
    assert_int_equal(fmt_hex(got, b, 0), 0);
    assert_string_equal(got, "");
}

static void test_uuid(void **state)
{
    /* RFC 4122's OID namespace. */
    static const unsigned char oid[16] = {0x6b, 0xa7, 0xb8, 0x12, 0x9d, 0xad, 0x11, 0xd1,
                                          0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8};
    static const unsigned char ones[16] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                           0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    char out[37];

    (void)state;
    assert_int_equal(fmt_uuid(out, oid), 36);
    assert_string_equal(out, "6ba7b812-9dad-11d1-80b4-00c04fd430c8");
    fmt_uuid(out, ones);
    assert_string_equal(out, "ffffffff-ffff-ffff-ffff-ffffffffffff");
}

static void rfc(long long sec, long nsec, int digits, const char *want)
{
    char got[FMT_RFC3339_MAX];
    struct timespec t = {.tv_sec = (time_t)sec, .tv_nsec = nsec};

    assert_int_equal(fmt_rfc3339(got, sizeof(got), &t, digits), strlen(want));
    assert_string_equal(got, want);
}

static void test_rfc3339(void **state)
{
    char small[8], now[FMT_RFC3339_MAX];
    struct timespec t = {.tv_sec = 1764621713, .tv_nsec = 987654321};

    (void)state;
    rfc(0, 0, 3, "1970-01-01T00:00:00.000Z");
    rfc(1764621713, 987654321, 0, "2025-12-01T20:41:53Z");
    rfc(1764621713, 987654321, 3, "2025-12-01T20:41:53.987Z");
    rfc(1764621713, 987654321, 6, "2025-12-01T20:41:53.987654Z");
    rfc(1764621713, 987654321, 9, "2025-12-01T20:41:53.987654321Z");
    rfc(1764621713, 999999, 3, "2025-12-01T20:41:53.000Z"); /* cut, not rounded */
    rfc(1764621713, 5000000, 3, "2025-12-01T20:41:53.005Z");
    rfc(951782400, 1000, 6, "2000-02-29T00:00:00.000001Z");
    rfc(253402300799LL, 999999999, 9, "9999-12-31T23:59:59.999999999Z");
    assert_int_equal(fmt_rfc3339(small, sizeof(small), &t, 3), sizeof(small) - 1);
    assert_string_equal(small, "2025-12");
    /* Now: the shape, and the second time() gave just before or after. */
    {
        struct timespec s0 = {.tv_sec = time(NULL)}, s1;
        char a[FMT_RFC3339_MAX], b[FMT_RFC3339_MAX];

        assert_int_equal(fmt_rfc3339(now, sizeof(now), NULL, 3), 24);
        s1.tv_sec = time(NULL);
        s1.tv_nsec = 0;
        fmt_rfc3339(a, sizeof(a), &s0, 0);
        fmt_rfc3339(b, sizeof(b), &s1, 0);
        assert_int_equal(now[19], '.');
        assert_int_equal(now[23], 'Z');
        assert_true(memcmp(now, a, 19) == 0 || memcmp(now, b, 19) == 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edges),
        cmocka_unit_test(test_random),
        cmocka_unit_test(test_copy),
        cmocka_unit_test(test_hex),
        cmocka_unit_test(test_uuid),
        cmocka_unit_test(test_rfc3339),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
