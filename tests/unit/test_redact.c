/* Unit tests for redact_url: every secret-bearing part of a URL or
 * conninfo masked, the rest kept for the operator. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "redact.h"

static void check(const char *in, const char *want)
{
    char out[512];

    redact_url(out, sizeof(out), in);
    print_message("%s -> %s\n", in, out);
    assert_string_equal(out, want);
}

static void test_userinfo(void **state)
{
    (void)state;
    check("postgres://erc8004:hunter2@db:5432/app", "postgres://erc8004:***@db:5432/app");
    check("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db");
    check("postgres://u:p@ss@h/db", "postgres://u:***@h/db");
    check("postgres://u@h/db", "postgres://u@h/db");
    check("postgres://h:5432/db", "postgres://h:5432/db");
    check("amqp://guest:guest@127.0.0.1:5672/%2f", "amqp://guest:***@127.0.0.1:5672/%2f");
    check("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0");
    check("redis://s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0");
    check("REDISS://s3cret@h", "REDISS://***@h");
    check("redis://default:s3cret@h/1", "redis://default:***@h/1");
}

static void test_query_and_fragment(void **state)
{
    (void)state;
    check("postgres://u@h/db?password=hunter2&sslmode=require",
          "postgres://u@h/db?password=***&sslmode=require");
    check("postgres://h/db?sslmode=disable&PASSWORD=x&application_name=gw",
          "postgres://h/db?sslmode=disable&PASSWORD=***&application_name=gw");
    check("https://h/x?token=abc;api_key=def&x=1#access_token=ghi&state=s",
          "https://h/x?token=***;api_key=***&x=1#access_token=***&state=s");
    check("postgres://u:p@h/db?sslpassword=k&connect_timeout=5", "postgres://u:***@h/db?sslpassword=***&connect_timeout=5");
    check("https://h/?sig=1&X-Amz-Signature=2&Credential=3&sessionid=4&auth=5",
          "https://h/?sig=***&X-Amz-Signature=***&Credential=***&sessionid=***&auth=***");
    check("https://h/path?flag&q=1", "https://h/path?flag&q=1");
    /* An '@' after the query does not make a userinfo. */
    check("https://h/p?email=a@b.c", "https://h/p?email=a@b.c");
}

static void test_conninfo(void **state)
{
    (void)state;
    check("host=db port=5432 password=hunter2 dbname=app", "host=db port=5432 password=*** dbname=app");
    check("host=db password = 'a b\\' c' user=u", "host=db password=*** user=u");
    check("password=x", "password=***");
    check("host=db", "host=db");
    check("", "");
}

static void test_bounded(void **state)
{
    char out[16];

    (void)state;
    redact_url(out, sizeof(out), "postgres://user:averyveryverylongpassword@h/db");
    assert_true(strlen(out) < sizeof(out));
    assert_null(strstr(out, "avery"));
    assert_string_equal(redact_url(out, 1, "x:y"), "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_userinfo),
        cmocka_unit_test(test_query_and_fragment),
        cmocka_unit_test(test_conninfo),
        cmocka_unit_test(test_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
