/* Unit tests of the action-workers' target (SSRF) guard beyond the ranges
 * test_template.c covers: addresses that a gateway translates to an IPv4
 * address the check never sees, and host names libcurl would resolve
 * itself (issue 10, item 9).
 *
 * The Makefile links unit tests against libshared only, so the module's
 * source is compiled into this binary directly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <cmocka.h>

#include "../../action-workers/target.c"

static int restricted(const char *ip)
{
    struct sockaddr_in6 sa;

    memset(&sa, 0, sizeof(sa));
    sa.sin6_family = AF_INET6;
    assert_int_equal(inet_pton(AF_INET6, ip, &sa.sin6_addr), 1);
    return target_addr_restricted((struct sockaddr *)&sa);
}

static void translated_v6_ranges_refused(void **state)
{
    (void)state;
    assert_true(restricted("64:ff9b::7f00:1"));     /* NAT64 of 127.0.0.1 */
    assert_true(restricted("64:ff9b::a9fe:a9fe"));  /* NAT64 of 169.254.169.254 */
    assert_true(restricted("64:ff9b::808:808"));    /* NAT64, even of a public address */
    assert_true(restricted("64:ff9b:1::a00:1"));    /* local-use NAT64 */
    assert_true(restricted("2002:7f00:1::1"));      /* 6to4 of 127.0.0.1 */
    assert_true(restricted("2002:808:808::1"));
    assert_true(restricted("::127.0.0.1"));         /* IPv4-compatible */
    assert_true(restricted("::10.0.0.1"));
    assert_true(restricted("::8.8.8.8"));
    assert_true(restricted("fec0::1"));             /* site-local */
    assert_true(restricted("feff::1"));
    assert_true(restricted("2001:0:4136:e378::1")); /* Teredo */
    assert_true(restricted("2001:db8::1"));         /* documentation */
    /* Still refused as before. */
    assert_true(restricted("::"));
    assert_true(restricted("::1"));
    assert_true(restricted("::ffff:10.0.0.1"));
    assert_true(restricted("fe80::1"));
    assert_true(restricted("fd12::1"));
    assert_true(restricted("ff02::1"));
    /* Public addresses pass. */
    assert_false(restricted("2001:4860:4860::8888"));
    assert_false(restricted("2606:4700::1111"));
    assert_false(restricted("64:ff9a::1"));
    assert_false(restricted("2003::1"));
    assert_false(restricted("::ffff:8.8.8.8"));
}

static void literal_urls_refused(void **state)
{
    char err[300];
    target_info ti;
    target_policy *p = target_policy_new("", err, sizeof(err));
    static const char *urls[] = {
        "http://[64:ff9b::7f00:1]/x", "http://[2002:a00:1::1]:8080/x", "https://[::127.0.0.1]/x",
        "http://[::a9fe:a9fe]/latest/meta-data", "http://[fec0::1]/x",
    };

    (void)state;
    assert_non_null(p);
    for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++) {
        err[0] = '\0';
        assert_int_equal(target_check(p, urls[i], &ti, err, sizeof(err)), -1);
        assert_non_null(strstr(err, "not in ALLOWED_TARGETS"));
    }
    target_policy_free(p);
    /* ALLOWED_TARGETS can still let one through. */
    p = target_policy_new("64:ff9b::/96", err, sizeof(err));
    assert_non_null(p);
    assert_int_equal(target_check(p, "http://[64:ff9b::7f00:1]/x", &ti, err, sizeof(err)), 0);
    target_policy_free(p);
}

static void non_ascii_hosts_refused(void **state)
{
    char err[300];
    target_info ti;
    target_policy *p = target_policy_new("127.0.0.1, ::1", err, sizeof(err));
    static const char *urls[] = {
        "http://b\xc3\xbc" "cher.example/x",   /* bücher.example */
        "https://\xd0\xb0pple.com/",            /* Cyrillic a */
        "http://127.0.0.1\xe3\x80\x82/x",      /* an ideographic full stop */
        "http://b%C3%BCcher.example/x",          /* percent-encoded: libcurl decodes it first */
    };

    (void)state;
    assert_non_null(p);
    for (size_t i = 0; i < sizeof(urls) / sizeof(urls[0]); i++) {
        err[0] = '\0';
        assert_int_equal(target_check(p, urls[i], &ti, err, sizeof(err)), -1);
        assert_true(err[0] != '\0');
        assert_null(strstr(err, "resolve"));
    }
    assert_int_equal(target_check(p, urls[0], &ti, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "ASCII"));
    /* ASCII names, IP literals and the punycode form are checked as before. */
    assert_int_equal(target_check(p, "http://127.0.0.1:9/x", &ti, err, sizeof(err)), 0);
    assert_int_equal(target_check(p, "http://[::2]/x", &ti, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not in ALLOWED_TARGETS"));
    assert_int_equal(target_check(p, "http://localhost:9/x", &ti, err, sizeof(err)), 0);
    assert_memory_equal(ti.resolve, "localhost:9:", 12);
    assert_int_equal(target_check(p, "http://xn--bcher-kva.invalid/x", &ti, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "cannot resolve"));
    target_policy_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(translated_v6_ranges_refused),
        cmocka_unit_test(literal_urls_refused),
        cmocka_unit_test(non_ascii_hosts_refused),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
