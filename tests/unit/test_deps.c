/* Unit tests of libshared/deps' migrate-then-ping check without a server:
 * while the database cannot be reached the check fails and no migration
 * counts as applied. The check against a real server (migrations applied
 * on start, then pings) is what every service's integration tests see
 * through /health. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "dbpool.h"
#include "deps.h"

static void test_unreachable(void **state)
{
    dbpool *p = dbpool_new("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", 2);
    deps_pgmig *m;

    (void)state;
    assert_non_null(p);
    m = deps_pgmig_new(p, "/nonexistent/migrations");
    assert_non_null(m);
    assert_int_equal(deps_pgmig_done(m), 0);
    assert_int_equal(deps_check_pg_migrate(m), -1);
    assert_int_equal(deps_pgmig_done(m), 0);
    assert_int_equal(deps_check_pg(p), -1);
    deps_pgmig_free(m);
    deps_pgmig_free(NULL);
    dbpool_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unreachable),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
