/* Unit tests of action-workers/origin.c: the normalized origin an MCP
 * token is bound to, and the comparison that decides whether it is sent.
 * Compiled in directly (unit tests link libshared only). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../action-workers/origin.c"

static void normalizes(void **state)
{
    char o[300];

    (void)state;
    assert_int_equal(origin_normalize("HTTPS://MCP.Example.COM/mcp?x=1", 0, o, sizeof(o)), 0);
    assert_string_equal(o, "https://mcp.example.com:443");
    assert_int_equal(origin_normalize("http://127.0.0.1/mcp", 0, o, sizeof(o)), 0);
    assert_string_equal(o, "http://127.0.0.1:80");
    assert_int_equal(origin_normalize("http://127.0.0.1:8931", 1, o, sizeof(o)), 0);
    assert_string_equal(o, "http://127.0.0.1:8931");
    assert_int_equal(origin_normalize("http://[::1]:9/", 1, o, sizeof(o)), 0);
    assert_string_equal(o, "http://[::1]:9");
    /* The user part is not the host: the request goes to evil. */
    assert_int_equal(origin_normalize("https://mcp.example.com@evil.example/mcp", 0, o, sizeof(o)), 0);
    assert_string_equal(o, "https://evil.example:443");
    /* libcurl decodes a percent-encoded host and connects there, and other
     * numeric IPv4 forms are the address they spell: so is the origin. */
    assert_int_equal(origin_normalize("http://%6dcp.example.com/", 0, o, sizeof(o)), 0);
    assert_string_equal(o, "http://mcp.example.com:80");
    assert_int_equal(origin_normalize("http://0x7f.1:81/", 0, o, sizeof(o)), 0);
    assert_string_equal(o, "http://127.0.0.1:81");
}

static void refuses(void **state)
{
    char o[300];

    (void)state;
    assert_int_equal(origin_normalize("ftp://mcp.example.com", 1, o, sizeof(o)), -1);
    assert_int_equal(origin_normalize("not a url", 0, o, sizeof(o)), -1);
    assert_int_equal(origin_normalize(NULL, 0, o, sizeof(o)), -1);
    /* A bound origin is an origin: no path, query, fragment or user. */
    assert_int_equal(origin_normalize("https://mcp.example.com/mcp", 1, o, sizeof(o)), -1);
    assert_int_equal(origin_normalize("https://mcp.example.com/?a", 1, o, sizeof(o)), -1);
    assert_int_equal(origin_normalize("https://u@mcp.example.com", 1, o, sizeof(o)), -1);
    assert_int_equal(origin_normalize("https://mcp.example.com", 1, o, 10), -1);
}

static void same(void **state)
{
    (void)state;
    assert_true(origin_same("https://mcp.example.com/mcp", "https://mcp.example.com"));
    assert_true(origin_same("https://mcp.example.com:443/mcp", "HTTPS://MCP.EXAMPLE.COM/"));
    assert_true(origin_same("http://mcp.example.com/mcp", "http://mcp.example.com:80"));
    assert_false(origin_same("http://mcp.example.com/mcp", "https://mcp.example.com"));
    assert_false(origin_same("https://mcp.example.com:8443/mcp", "https://mcp.example.com"));
    assert_false(origin_same("https://mcp.example.com.evil.example/mcp", "https://mcp.example.com"));
    assert_false(origin_same("https://evil.example/mcp.example.com", "https://mcp.example.com"));
    assert_false(origin_same("https://mcp.example.com@evil.example/", "https://mcp.example.com"));
    assert_false(origin_same("https://mcp.example.com/mcp", NULL));
    assert_false(origin_same("https://mcp.example.com/mcp", "https://mcp.example.com/mcp"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(normalizes),
        cmocka_unit_test(refuses),
        cmocka_unit_test(same),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
