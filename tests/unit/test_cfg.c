/* Unit tests for cfg: typed getters, every kind of bad value, the .env
 * reader and the production rule for secrets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "cfg.h"
#include "log.h"

static cfg *fresh(void)
{
    cfg *c = cfg_new("test");
    assert_non_null(c);
    return c;
}

static void test_int_default_and_value(void **state)
{
    cfg *c = fresh();

    (void)state;
    unsetenv("T_PORT");
    assert_int_equal(cfg_int(c, "T_PORT", 8080, 1, 65535), 8080);
    setenv("T_PORT", "9000", 1);
    assert_int_equal(cfg_int(c, "T_PORT", 8080, 1, 65535), 9000);
    assert_false(cfg_failed(c));
    cfg_free(c);
}

static void test_int_bad_values(void **state)
{
    static const char *const bad[] = {"abc", "80x", "", " ", "70000", "0", "-1", "99999999999999999999999"};
    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        cfg *c = fresh();
        setenv("T_PORT", bad[i], 1);
        long v = cfg_int(c, "T_PORT", 8080, 1, 65535);
        if (bad[i][0] == '\0') {
            /* Empty means unset: the default, no error. */
            assert_false(cfg_failed(c));
        } else {
            assert_true(cfg_failed(c));
            assert_non_null(strstr(cfg_errstr(c), "T_PORT"));
            assert_non_null(strstr(cfg_errstr(c), bad[i]));
            assert_non_null(strstr(cfg_errstr(c), "from 1 to 65535"));
        }
        assert_int_equal(v, 8080);
        cfg_free(c);
    }
}

static void test_bool(void **state)
{
    cfg *c = fresh();

    (void)state;
    setenv("T_B", "Yes", 1);
    assert_int_equal(cfg_bool(c, "T_B", 0), 1);
    setenv("T_B", "off", 1);
    assert_int_equal(cfg_bool(c, "T_B", 1), 0);
    assert_false(cfg_failed(c));
    setenv("T_B", "maybe", 1);
    assert_int_equal(cfg_bool(c, "T_B", 1), 1);
    assert_true(cfg_failed(c));
    assert_non_null(strstr(cfg_errstr(c), "T_B=\"maybe\""));
    cfg_free(c);
}

static void test_enum(void **state)
{
    static const char *const levels[] = {"error", "warn", "info", "debug", NULL};
    cfg *c = fresh();

    (void)state;
    setenv("T_LEVEL", "DEBUG", 1);
    assert_string_equal(cfg_enum(c, "T_LEVEL", "info", levels), "debug");
    setenv("T_LEVEL", "loud", 1);
    assert_string_equal(cfg_enum(c, "T_LEVEL", "info", levels), "info");
    assert_true(cfg_failed(c));
    assert_non_null(strstr(cfg_errstr(c), "one of error|warn|info|debug"));
    cfg_free(c);
}

static void test_duration(void **state)
{
    cfg *c = fresh();

    (void)state;
    setenv("T_D", "250ms", 1);
    assert_int_equal(cfg_duration_ms(c, "T_D", 1, 1000), 250);
    setenv("T_D", "30s", 1);
    assert_int_equal(cfg_duration_ms(c, "T_D", 1, 1000), 30000);
    setenv("T_D", "5m", 1);
    assert_int_equal(cfg_duration_ms(c, "T_D", 1, 1000), 300000);
    setenv("T_D", "7", 1);
    assert_int_equal(cfg_duration_ms(c, "T_D", 1, 1000), 7000);
    assert_false(cfg_failed(c));
    setenv("T_D", "5 parsecs", 1);
    assert_int_equal(cfg_duration_ms(c, "T_D", 1, 1000), 1);
    setenv("T_D", "-3s", 1);
    cfg_duration_ms(c, "T_D", 1, 1000);
    assert_true(cfg_failed(c));
    cfg_free(c);
}

static void test_errors_accumulate(void **state)
{
    cfg *c = fresh();

    (void)state;
    setenv("T_A", "x", 1);
    setenv("T_B2", "y", 1);
    cfg_int(c, "T_A", 1, 0, 10);
    cfg_bool(c, "T_B2", 0);
    assert_non_null(strstr(cfg_errstr(c), "T_A"));
    assert_non_null(strstr(cfg_errstr(c), "\nT_B2"));
    assert_int_equal(cfg_finish(c), -1);
    cfg_free(c);
}

/* Whatever variable a bad URL comes from, its secrets are masked in the
 * report. */
static void test_error_masks_urls(void **state)
{
    cfg *c = fresh();

    (void)state;
    cfg_error(c, "ORCHESTRATOR_URL", "http://svc:hunter2@orch:9000/x?token=abc&v=1", "something");
    cfg_error(c, "DSN", "host=db password=hunter3 port=x", "something");
    cfg_error(c, "N", "42", "a number");
    assert_null(strstr(cfg_errstr(c), "hunter2"));
    assert_null(strstr(cfg_errstr(c), "hunter3"));
    assert_null(strstr(cfg_errstr(c), "abc"));
    assert_non_null(strstr(cfg_errstr(c), "http://svc:***@orch:9000/x?token=***&v=1"));
    assert_non_null(strstr(cfg_errstr(c), "N=\"42\""));
    cfg_free(c);
}

static void test_secret_production(void **state)
{
    cfg *c = fresh();

    (void)state;
    unsetenv("T_SECRET");
    unsetenv("APP_ENV");
    assert_string_equal(cfg_secret(c, "T_SECRET", "dev"), "dev");
    assert_false(cfg_failed(c));
    setenv("APP_ENV", "production", 1);
    cfg_secret(c, "T_SECRET", "dev");
    assert_true(cfg_failed(c));
    cfg_free(c);
    c = fresh();
    setenv("T_SECRET", "a-real-secret-of-32-bytes-or-more", 1);
    assert_string_equal(cfg_secret(c, "T_SECRET", "dev"), "a-real-secret-of-32-bytes-or-more");
    assert_false(cfg_failed(c));
    cfg_free(c);
    /* Short ones and placeholders (what docker-compose used to fall back to)
     * are refused in production, and the value never appears in the error. */
    {
        static const char *const bad[] = {"real-secret", "0123456789abcdef0123456789abcde",
                                          "change-me-in-production-0123456789abcdef",
                                          "CHANGE-ME-ingest-token-0123456789abcdef", "my-changeme-secret-0123456789abcdef",
                                          "change-me-ingest", NULL};

        for (int i = 0; bad[i]; i++) {
            c = fresh();
            setenv("T_SECRET", bad[i], 1);
            cfg_secret(c, "T_SECRET", "dev");
            print_message("%s -> %s\n", bad[i], cfg_errstr(c));
            assert_true(cfg_failed(c));
            assert_null(strstr(cfg_errstr(c), bad[i]));
            assert_non_null(strstr(cfg_errstr(c), "T_SECRET"));
            cfg_free(c);
        }
    }
    /* Outside production they are accepted (with a warning). */
    unsetenv("APP_ENV");
    c = fresh();
    setenv("T_SECRET", "short", 1);
    assert_string_equal(cfg_secret(c, "T_SECRET", "dev"), "short");
    assert_false(cfg_failed(c));
    unsetenv("T_SECRET");
    cfg_free(c);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_dotenv(void **state)
{
    char path[] = "/tmp/ae-dotenv-XXXXXX", err[256];
    int fd = mkstemp(path);

    (void)state;
    assert_true(fd >= 0);
    close(fd);
    write_file(path, "# comment\n"
                     "\n"
                     "DE_PLAIN=hello\n"
                     "export DE_EXPORTED=yes\n"
                     "DE_SQ='single # not a comment'\n"
                     "DE_DQ=\"line\\nbreak \\\"q\\\"\"\n"
                     "DE_TRAIL=value # trailing comment\n"
                     "DE_KEEP=from-file\n"
                     "  DE_SPACES  =  padded\n");
    setenv("DE_KEEP", "from-env", 1);
    unsetenv("DE_PLAIN");
    assert_int_equal(cfg_load_dotenv(path, err, sizeof(err)), 0);
    assert_string_equal(getenv("DE_PLAIN"), "hello");
    assert_string_equal(getenv("DE_EXPORTED"), "yes");
    assert_string_equal(getenv("DE_SQ"), "single # not a comment");
    assert_string_equal(getenv("DE_DQ"), "line\nbreak \"q\"");
    assert_string_equal(getenv("DE_TRAIL"), "value");
    assert_string_equal(getenv("DE_KEEP"), "from-env");
    assert_string_equal(getenv("DE_SPACES"), "padded");
    unlink(path);
}

static void test_dotenv_errors(void **state)
{
    char path[] = "/tmp/ae-dotenv-XXXXXX", err[256];
    int fd = mkstemp(path);

    (void)state;
    assert_true(fd >= 0);
    close(fd);
    write_file(path, "GOOD=1\nthis line is wrong\n");
    assert_int_equal(cfg_load_dotenv(path, err, sizeof(err)), -1);
    assert_non_null(strstr(err, ":2:"));
    write_file(path, "BAD-NAME=1\n");
    assert_int_equal(cfg_load_dotenv(path, err, sizeof(err)), -1);
    write_file(path, "OPEN=\"unterminated\n");
    assert_int_equal(cfg_load_dotenv(path, err, sizeof(err)), -1);
    unlink(path);
    assert_int_equal(cfg_load_dotenv("/nonexistent/.env", err, sizeof(err)), 0);
}

static void test_log_escape(void **state)
{
    char out[64];

    (void)state;
    assert_string_equal(log_escape(out, sizeof(out), "a\"b\\c\nd\x01"), "a\\\"b\\\\c\\nd\\u0001");
    /* Truncation never splits an escape sequence and always terminates. */
    assert_string_equal(log_escape(out, 4, "\"\"\""), "\\\"");
    assert_int_equal(log_level_parse("WARN"), LOG_WARN);
    assert_int_equal(log_level_parse("loud"), -1);
    assert_int_equal(log_init(NULL, "loud", NULL), -1);
    assert_int_equal(log_init(NULL, NULL, "xml"), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_int_default_and_value),
        cmocka_unit_test(test_int_bad_values),
        cmocka_unit_test(test_bool),
        cmocka_unit_test(test_enum),
        cmocka_unit_test(test_duration),
        cmocka_unit_test(test_errors_accumulate),
        cmocka_unit_test(test_secret_production),
        cmocka_unit_test(test_error_masks_urls),
        cmocka_unit_test(test_dotenv),
        cmocka_unit_test(test_dotenv_errors),
        cmocka_unit_test(test_log_escape),
    };
    log_init("test", "error", "json");
    return cmocka_run_group_tests(tests, NULL, NULL);
}
