/* Unit tests for the parts of dbpool and backoff that need no server:
 * building the libpq conninfo from configuration, the back-off arithmetic,
 * and the pool's fast failure against a port where nothing listens. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "backoff.h"
#include "cfg.h"
#include "dbpool.h"

static const char *const db_vars[] = {"DATABASE_URL", "DB_HOST", "DB_PORT", "DB_NAME",
                                      "DB_USER", "DB_PASSWORD", NULL};

static int clear_env(void **state)
{
    (void)state;
    for (int i = 0; db_vars[i]; i++)
        unsetenv(db_vars[i]);
    return 0;
}

/* Looks a keyword up in a conninfo string as libpq itself parses it, so the
 * tests check meaning (escaping included), not spelling. */
static char *conninfo_get(const char *conninfo, const char *key)
{
    char *err = NULL, *val = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &err);

    if (!opts) {
        PQfreemem(err);
        return NULL;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, key) == 0 && o->val)
            val = strdup(o->val);
    PQconninfoFree(opts);
    return val;
}

static void assert_kv(const char *conninfo, const char *key, const char *want)
{
    char *got = conninfo_get(conninfo, key);

    if (!want) {
        assert_null(got);
        return;
    }
    assert_non_null(got);
    assert_string_equal(got, want);
    free(got);
}

static void test_conninfo_defaults(void **state)
{
    char out[1024];
    cfg *c = cfg_new("t");

    (void)state;
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), 0);
    assert_false(cfg_failed(c));
    assert_kv(out, "host", "localhost");
    assert_kv(out, "port", "5432");
    assert_kv(out, "dbname", "erc8004_backend");
    assert_kv(out, "user", NULL);
    assert_kv(out, "password", NULL);
    cfg_free(c);
}

static void test_conninfo_db_vars_escaped(void **state)
{
    char out[1024];
    cfg *c = cfg_new("t");

    (void)state;
    setenv("DB_HOST", "db.example", 1);
    setenv("DB_PORT", "6543", 1);
    setenv("DB_NAME", "my db", 1);
    setenv("DB_USER", "o'brien", 1);
    setenv("DB_PASSWORD", "p a'ss\\word=x", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), 0);
    assert_false(cfg_failed(c));
    assert_kv(out, "host", "db.example");
    assert_kv(out, "port", "6543");
    assert_kv(out, "dbname", "my db");
    assert_kv(out, "user", "o'brien");
    assert_kv(out, "password", "p a'ss\\word=x");
    /* The raw text shows the escapes libpq expects. */
    assert_non_null(strstr(out, "user='o\\'brien'"));
    assert_non_null(strstr(out, "password='p a\\'ss\\\\word=x'"));
    cfg_free(c);
}

static void test_conninfo_database_url_wins(void **state)
{
    const char *url = "postgresql://u:secret@h1:5433/dbx?sslmode=disable";
    char out[1024];
    cfg *c = cfg_new("t");

    (void)state;
    setenv("DATABASE_URL", url, 1);
    setenv("DB_HOST", "ignored", 1);
    setenv("DB_PORT", "not-a-port", 1); /* not read when DATABASE_URL is set */
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), 0);
    assert_false(cfg_failed(c));
    assert_string_equal(out, url);
    assert_kv(out, "host", "h1");
    assert_kv(out, "port", "5433");
    cfg_free(c);
}

static void test_conninfo_keyword_database_url(void **state)
{
    char out[256];
    cfg *c = cfg_new("t");

    (void)state;
    setenv("DATABASE_URL", "host=127.0.0.1 port=55432 dbname=x", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), 0);
    assert_kv(out, "port", "55432");
    cfg_free(c);
}

static void test_conninfo_bad_port_recorded(void **state)
{
    char out[1024];
    cfg *c = cfg_new("t");

    (void)state;
    setenv("DB_PORT", "54x", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), -1);
    assert_true(cfg_failed(c));
    assert_non_null(strstr(cfg_errstr(c), "DB_PORT=\"54x\""));
    assert_string_equal(out, "");
    cfg_free(c);

    c = cfg_new("t");
    setenv("DB_PORT", "70000", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), -1);
    assert_non_null(strstr(cfg_errstr(c), "DB_PORT"));
    cfg_free(c);
}

static void test_conninfo_bad_url_redacted(void **state)
{
    char out[1024];
    cfg *c = cfg_new("t");

    (void)state;
    setenv("DATABASE_URL", "postgresql://u:topsecret@h:99999/db", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), -1);
    assert_true(cfg_failed(c));
    assert_non_null(strstr(cfg_errstr(c), "DATABASE_URL"));
    assert_null(strstr(cfg_errstr(c), "topsecret"));
    cfg_free(c);

    c = cfg_new("t");
    setenv("DATABASE_URL", "postgresql://u:topsecret@h/db?nosuchoption=1", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), -1);
    assert_null(strstr(cfg_errstr(c), "topsecret"));
    cfg_free(c);
}

static void test_conninfo_too_small(void **state)
{
    char out[16];
    cfg *c = cfg_new("t");

    (void)state;
    setenv("DB_PASSWORD", "a-rather-long-password", 1);
    assert_int_equal(dbpool_conninfo_from_cfg(c, out, sizeof(out)), -1);
    assert_string_equal(out, "");
    cfg_free(c);
}

/* ---- backoff ---- */

static void test_backoff_cap_growth(void **state)
{
    (void)state;
    assert_int_equal(backoff_cap_ms(100, 5000, 0), 100);
    assert_int_equal(backoff_cap_ms(100, 5000, 1), 200);
    assert_int_equal(backoff_cap_ms(100, 5000, 5), 3200);
    assert_int_equal(backoff_cap_ms(100, 5000, 6), 5000);
    assert_int_equal(backoff_cap_ms(100, 5000, 1000000), 5000);
    assert_int_equal(backoff_cap_ms(100, 5000, -3), 100);
    assert_int_equal(backoff_cap_ms(0, 0, 4), 1);
    assert_int_equal(backoff_cap_ms(3, 1L << 40, 62), 1L << 40);
    assert_int_equal(backoff_delay_ms(100, 5000, 3, NULL), 800);
}

static void test_backoff_delay_bounds(void **state)
{
    unsigned int seed = 42;

    (void)state;
    for (int attempt = 0; attempt < 40; attempt++) {
        long cap = backoff_cap_ms(100, 5000, attempt);
        long lo = cap, hi = 0;

        for (int i = 0; i < 2000; i++) {
            long d = backoff_delay_ms(100, 5000, attempt, &seed);

            assert_in_range(d, cap / 2, cap);
            if (d < lo)
                lo = d;
            if (d > hi)
                hi = d;
        }
        /* Jitter really spreads the values over the window. */
        assert_true(lo < cap / 2 + cap / 10);
        assert_true(hi > cap - cap / 10);
    }
}

static void test_backoff_state(void **state)
{
    backoff b;
    long prev_cap = 0;

    (void)state;
    backoff_init(&b, 100, 5000);
    assert_int_equal(b.attempt, 0);
    for (int i = 0; i < 100; i++) {
        long cap = backoff_cap_ms(100, 5000, i);
        long d = backoff_next_ms(&b);

        assert_in_range(d, cap / 2, cap);
        assert_true(cap >= prev_cap);
        prev_cap = cap;
    }
    assert_true(b.attempt > 0 && b.attempt <= 100);
    backoff_reset(&b);
    assert_int_equal(b.attempt, 0);
    assert_in_range(backoff_next_ms(&b), 50, 100);
    assert_int_equal(b.attempt, 1);

    backoff_init(&b, 0, -5);
    assert_int_equal(b.base_ms, 1);
    assert_int_equal(b.max_ms, 1);
    assert_in_range(backoff_next_ms(&b), 0, 1);
}

/* ---- pool behaviour without a server ---- */

static long elapsed_ms(const struct timespec *t0)
{
    struct timespec t1;

    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (long)((t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000);
}

static void test_pool_args(void **state)
{
    (void)state;
    assert_null(dbpool_new(NULL, 1));
    assert_null(dbpool_new("", 0));
    dbpool_free(NULL);
    dbpool_release(NULL, NULL);
    assert_null(dbpool_acquire(NULL, 0));
}

static void test_pool_unreachable_fails_fast(void **state)
{
    /* Port 1 on loopback: connection refused at once. */
    dbpool *p = dbpool_new("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", 2);
    char err[256];
    struct timespec t0;
    int total = -1, idle = -1, waiting = -1;

    (void)state;
    assert_non_null(p);
    assert_false(dbpool_degraded(p));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_null(dbpool_acquire(p, 3000));
    assert_true(elapsed_ms(&t0) < 1000);
    assert_true(dbpool_degraded(p));
    assert_non_null(strstr(dbpool_errstr(p, err, sizeof(err)), "database unavailable"));
    /* Inside the back-off window: no connect at all, immediate NULL. */
    for (int i = 0; i < 100; i++)
        assert_null(dbpool_acquire(p, 3000));
    assert_true(elapsed_ms(&t0) < 1000);
    assert_int_equal(dbpool_ping(p, 100), -1);
    dbpool_stats(p, &total, &idle, &waiting);
    assert_int_equal(total, 0);
    assert_int_equal(idle, 0);
    assert_int_equal(waiting, 0);
    dbpool_free(p);
}

static void test_exec_without_conn(void **state)
{
    char err[64];

    (void)state;
    assert_null(dbpool_exec(NULL, "SELECT 1", 0, NULL, err, sizeof(err)));
    assert_int_equal(strncmp(err, "08003", 5), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_conninfo_defaults, clear_env),
        cmocka_unit_test_setup(test_conninfo_db_vars_escaped, clear_env),
        cmocka_unit_test_setup(test_conninfo_database_url_wins, clear_env),
        cmocka_unit_test_setup(test_conninfo_keyword_database_url, clear_env),
        cmocka_unit_test_setup(test_conninfo_bad_port_recorded, clear_env),
        cmocka_unit_test_setup(test_conninfo_bad_url_redacted, clear_env),
        cmocka_unit_test_setup(test_conninfo_too_small, clear_env),
        cmocka_unit_test(test_backoff_cap_growth),
        cmocka_unit_test(test_backoff_delay_bounds),
        cmocka_unit_test(test_backoff_state),
        cmocka_unit_test(test_pool_args),
        cmocka_unit_test(test_pool_unreachable_fails_fast),
        cmocka_unit_test(test_exec_without_conn),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
