/* Unit tests for rconn's configuration: REDIS_URL parsing and the
 * REDIS_HOST/REDIS_PORT/... fallback, plus fast failure without a server.
 * amqpc's AMQP_URL check lives here too, with the other client URLs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "amqpc.h"
#include "cfg.h"
#include "rconn.h"

static const char *const redis_vars[] = {"REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD",
                                         "REDIS_DB", NULL};

static int clear_env(void **state)
{
    (void)state;
    for (int i = 0; redis_vars[i]; i++)
        unsetenv(redis_vars[i]);
    return 0;
}

static void parse_ok(const char *url, const char *host, int port, const char *pass, int db)
{
    rconn_opts o;
    char err[256];

    memset(&o, 0x55, sizeof(o));
    if (rconn_parse_url(url, &o, err, sizeof(err)) != 0)
        fail_msg("%s: unexpected error: %s", url, err);
    assert_string_equal(o.host, host);
    assert_int_equal(o.port, port);
    assert_string_equal(o.password, pass);
    assert_int_equal(o.db, db);
    assert_string_equal(o.unix_path, "");
}

static void parse_bad(const char *url, const char *err_part)
{
    rconn_opts o;
    char err[256];

    err[0] = '\0';
    if (rconn_parse_url(url, &o, err, sizeof(err)) != -1)
        fail_msg("%s: accepted", url);
    if (!strstr(err, err_part))
        fail_msg("%s: error \"%s\" lacks \"%s\"", url, err, err_part);
}

static void test_parse_basic(void **state)
{
    (void)state;
    parse_ok("redis://127.0.0.1:56379", "127.0.0.1", 56379, "", 0);
    parse_ok("redis://localhost", "localhost", 6379, "", 0);
    parse_ok("redis://localhost/", "localhost", 6379, "", 0);
    parse_ok("redis://h:1/15", "h", 1, "", 15);
    parse_ok("REDIS://h:65535/0", "h", 65535, "", 0);
    parse_ok("redis://", "127.0.0.1", 6379, "", 0);
}

static void test_parse_password(void **state)
{
    (void)state;
    parse_ok("redis://:s3cret@h:7000/2", "h", 7000, "s3cret", 2);
    parse_ok("redis://default:pw@h", "h", 6379, "pw", 0);
    parse_ok("redis://:p%40ss%3Aw%2Fd@h", "h", 6379, "p@ss:w/d", 0);
    parse_ok("redis://:a:b@h", "h", 6379, "a:b", 0);
    parse_ok("redis://lonepw@h", "h", 6379, "lonepw", 0);
    parse_bad("redis://alice:pw@h", "ACL user");
    parse_bad("redis://:bad%zz@h", "escaped");
    parse_bad("redis://:bad%4@h", "escaped");
    parse_bad("redis://:nul%00@h", "escaped");
}

static void test_parse_ipv6(void **state)
{
    (void)state;
    parse_ok("redis://[::1]:6380/3", "::1", 6380, "", 3);
    parse_ok("redis://[::1]", "::1", 6379, "", 0);
    parse_bad("redis://[::1", "IPv6");
    parse_bad("redis://[::1]x", "IPv6");
}

static void test_parse_bad_port_db(void **state)
{
    (void)state;
    parse_bad("redis://h:0", "port");
    parse_bad("redis://h:65536", "port");
    parse_bad("redis://h:", "port");
    parse_bad("redis://h:12ab", "port");
    parse_bad("redis://h:-1", "port");
    parse_bad("redis://h:6379/x", "database");
    parse_bad("redis://h:6379/-1", "database");
    parse_bad("redis://h:6379/99999999999999999999", "database");
    parse_bad("redis://h:6379/1?timeout=3", "query");
}

static void test_parse_schemes(void **state)
{
    rconn_opts o;
    char err[256];

    (void)state;
    parse_bad("rediss://:pw@h:6380", "TLS");
    parse_bad("http://h", "redis://");
    parse_bad("h:6379", "redis://");
    parse_bad("", "redis://");
    assert_int_equal(rconn_parse_url("unix:///run/redis.sock?db=4", &o, err, sizeof(err)), 0);
    assert_string_equal(o.unix_path, "/run/redis.sock");
    assert_int_equal(o.db, 4);
    parse_bad("unix://relative", "absolute");
    parse_bad("unix:///s?x=1", "db=N");
    assert_int_equal(rconn_parse_url(NULL, &o, err, sizeof(err)), -1);
}

static void test_parse_long_host(void **state)
{
    char url[600];

    (void)state;
    snprintf(url, sizeof(url), "redis://%0300d:1", 7);
    parse_bad(url, "too long");
}

static void test_error_has_no_password(void **state)
{
    rconn_opts o;
    char err[256];

    (void)state;
    assert_int_equal(rconn_parse_url("redis://:hunter2@h:99999", &o, err, sizeof(err)), -1);
    assert_null(strstr(err, "hunter2"));
}

static void test_cfg_defaults(void **state)
{
    rconn_opts o;
    cfg *c = cfg_new("t");

    (void)state;
    assert_int_equal(rconn_opts_from_cfg(c, &o), 0);
    assert_string_equal(o.host, "127.0.0.1");
    assert_int_equal(o.port, 6379);
    assert_string_equal(o.password, "");
    assert_int_equal(o.db, 0);
    assert_false(cfg_failed(c));
    cfg_free(c);
}

static void test_cfg_vars(void **state)
{
    rconn_opts o;
    cfg *c = cfg_new("t");

    (void)state;
    setenv("REDIS_HOST", "cache", 1);
    setenv("REDIS_PORT", "7001", 1);
    setenv("REDIS_PASSWORD", "pw", 1);
    setenv("REDIS_DB", "3", 1);
    assert_int_equal(rconn_opts_from_cfg(c, &o), 0);
    assert_string_equal(o.host, "cache");
    assert_int_equal(o.port, 7001);
    assert_string_equal(o.password, "pw");
    assert_int_equal(o.db, 3);
    cfg_free(c);
}

static void test_cfg_url_wins_and_bad_values(void **state)
{
    rconn_opts o;
    cfg *c = cfg_new("t");

    (void)state;
    setenv("REDIS_URL", "redis://:x@u:5/1", 1);
    setenv("REDIS_HOST", "ignored", 1);
    assert_int_equal(rconn_opts_from_cfg(c, &o), 0);
    assert_string_equal(o.host, "u");
    assert_int_equal(o.port, 5);
    cfg_free(c);

    c = cfg_new("t");
    setenv("REDIS_URL", "rediss://:topsecret@u:5", 1);
    assert_int_equal(rconn_opts_from_cfg(c, &o), -1);
    assert_true(cfg_failed(c));
    assert_non_null(strstr(cfg_errstr(c), "REDIS_URL"));
    assert_null(strstr(cfg_errstr(c), "topsecret"));
    cfg_free(c);

    unsetenv("REDIS_URL");
    c = cfg_new("t");
    setenv("REDIS_PORT", "port", 1);
    setenv("REDIS_DB", "-2", 1);
    assert_int_equal(rconn_opts_from_cfg(c, &o), -1);
    assert_non_null(strstr(cfg_errstr(c), "REDIS_PORT=\"port\""));
    assert_non_null(strstr(cfg_errstr(c), "REDIS_DB=\"-2\""));
    assert_int_equal(o.port, 6379);
    cfg_free(c);
}

static void test_unreachable_fails_fast(void **state)
{
    rconn_opts o;
    rconn *r;
    char err[64];
    struct timespec t0, t1;

    (void)state;
    assert_int_equal(rconn_parse_url("redis://127.0.0.1:1", &o, err, sizeof(err)), 0);
    r = rconn_new(&o, 1000);
    assert_non_null(r);
    assert_null(rconn_context(r));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(rconn_connect(r), -1);
    assert_true(strlen(rconn_errstr(r)) > 0);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(rconn_ping(r), -1);
        assert_null(rconn_command(r, 1, "GET %s", "k"));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    assert_true((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 < 500);
    rconn_mark_broken(r);
    rconn_free(r);
    rconn_free(NULL);
}

static void amqp_url_case(const char *url, int want_rc, const char *err_part)
{
    char out[256];
    cfg *c = cfg_new("t");

    if (url)
        setenv("AMQP_URL", url, 1);
    else
        unsetenv("AMQP_URL");
    if (amqpc_url_from_cfg(c, out, sizeof(out)) != want_rc)
        fail_msg("%s: expected %d (%s)", url ? url : "(unset)", want_rc, cfg_errstr(c));
    if (want_rc == 0) {
        assert_string_equal(out, url ? url : AMQPC_DEFAULT_URL);
    } else {
        assert_string_equal(out, "");
        assert_non_null(strstr(cfg_errstr(c), "AMQP_URL"));
        assert_non_null(strstr(cfg_errstr(c), err_part));
        assert_null(strstr(cfg_errstr(c), "hunter2"));
    }
    cfg_free(c);
}

static void test_amqp_url(void **state)
{
    amqpc *a;

    (void)state;
    amqp_url_case(NULL, 0, NULL);
    amqp_url_case("amqp://guest:guest@127.0.0.1:55672/", 0, NULL);
    amqp_url_case("amqp://u:p@h/%2f", 0, NULL);
    amqp_url_case("amqps://u:hunter2@h:5671/", -1, "amqps");
    amqp_url_case("http://u:hunter2@h/", -1, "amqp://");
    amqp_url_case("amqp://u:hunter2@h:0/", -1, "port");
    amqp_url_case("amqp://u:hunter2@h/a/b", -1, "vhost");
    unsetenv("AMQP_URL");
    /* amqpc_new refuses what the check refuses and never connects. */
    assert_null(amqpc_new("amqps://h/", "t"));
    a = amqpc_new("amqp://guest:guest@127.0.0.1:1/", "t");
    assert_non_null(a);
    assert_false(amqpc_is_connected(a));
    assert_null(amqpc_state(a));
    assert_int_equal(amqpc_generation(a), 0);
    assert_int_equal(amqpc_ping(a), -1);
    assert_int_equal(amqpc_connect(a), -1);
    assert_int_equal(amqpc_connect(a), -1); /* inside the back-off window */
    assert_non_null(strstr(amqpc_errstr(a), "connect"));
    amqpc_free(a);
    amqpc_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_basic),
        cmocka_unit_test(test_parse_password),
        cmocka_unit_test(test_parse_ipv6),
        cmocka_unit_test(test_parse_bad_port_db),
        cmocka_unit_test(test_parse_schemes),
        cmocka_unit_test(test_parse_long_host),
        cmocka_unit_test(test_error_has_no_password),
        cmocka_unit_test_setup(test_cfg_defaults, clear_env),
        cmocka_unit_test_setup(test_cfg_vars, clear_env),
        cmocka_unit_test_setup(test_cfg_url_wins_and_bad_values, clear_env),
        cmocka_unit_test(test_unreachable_fails_fast),
        cmocka_unit_test(test_amqp_url),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
