/* Unit tests of libshared/hash: FNV-1a against the published test vectors
 * (www.isthe.com/chongo/tech/comp/fnv), every entry point. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "hash.h"

static void test_vectors(void **state)
{
    static const struct {
        const char *s;
        uint32_t h;
    } v[] = {{"", 0x811c9dc5u}, {"a", 0xe40c292cu}, {"foobar", 0xbf9cf968u}};

    (void)state;
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        assert_int_equal(hash_fnv1a_str(v[i].s), v[i].h);
        assert_int_equal(hash_fnv1a(v[i].s, strlen(v[i].s)), v[i].h);
    }
}

/* The length form hashes bytes past a NUL too; the string form stops. */
static void test_embedded_nul(void **state)
{
    (void)state;
    assert_int_not_equal(hash_fnv1a("a\0b", 3), hash_fnv1a_str("a\0b"));
    assert_int_equal(hash_fnv1a("a\0b", 1), hash_fnv1a_str("a"));
}

/* A key hashed in pieces is the key hashed whole. */
static void test_pieces(void **state)
{
    (void)state;
    assert_int_equal(hash_fnv1a_add(hash_fnv1a_add(HASH_FNV1A_INIT, "foo", 3), "bar", 3), 0xbf9cf968u);
    assert_int_equal(hash_fnv1a_add(HASH_FNV1A_INIT, "", 0), hash_fnv1a_str(""));
}

/* The case-folding form is the plain one over the lower-cased key. */
static void test_case_folded(void **state)
{
    (void)state;
    assert_int_equal(hash_fnv1a_str_ci("FooBar"), 0xbf9cf968u);
    assert_int_equal(hash_fnv1a_str_ci("foobar"), hash_fnv1a_str("foobar"));
    assert_int_equal(hash_fnv1a_str_ci(""), hash_fnv1a_str(""));
    assert_int_not_equal(hash_fnv1a_str("FooBar"), hash_fnv1a_str("foobar"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vectors),
        cmocka_unit_test(test_embedded_nul),
        cmocka_unit_test(test_pieces),
        cmocka_unit_test(test_case_folded),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
