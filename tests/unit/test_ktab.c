/* Unit tests for ktab: records created on demand, updated atomically under
 * their shard's lock, removed, and bounded with least-recently-touched
 * eviction. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <cmocka.h>

#include "ktab.h"

typedef struct {
    long n;
} counter;

static int bump(void *value, int created, void *arg)
{
    counter *c = value;
    int *was_created = arg;

    if (was_created)
        *was_created = created;
    c->n++;
    return KTAB_KEEP;
}

static int read_n(void *value, int created, void *arg)
{
    (void)created;
    *(long *)arg = ((counter *)value)->n;
    return KTAB_KEEP;
}

static int drop(void *value, int created, void *arg)
{
    (void)value;
    (void)created;
    (void)arg;
    return KTAB_REMOVE;
}

static void test_create_update_remove(void **state)
{
    ktab *t = ktab_new(sizeof(counter), 1024);
    int created = -1;
    long n = 0;

    (void)state;
    assert_non_null(t);
    assert_int_equal(ktab_with(t, "alice", 0, 1, read_n, &n), 0);
    assert_int_equal(ktab_with(t, "alice", 1, 1, bump, &created), 1);
    assert_int_equal(created, 1);
    assert_int_equal(ktab_with(t, "alice", 1, 2, bump, &created), 1);
    assert_int_equal(created, 0);
    assert_int_equal(ktab_with(t, "alice", 0, 3, read_n, &n), 1);
    assert_int_equal(n, 2);
    assert_int_equal(ktab_size(t), 1);
    assert_int_equal(ktab_with(t, "alice", 0, 4, drop, NULL), 1);
    assert_int_equal(ktab_size(t), 0);
    ktab_with(t, "bob", 1, 5, bump, NULL);
    ktab_remove(t, "bob");
    ktab_remove(t, "nobody");
    assert_int_equal(ktab_with(t, "bob", 0, 6, read_n, &n), 0);
    ktab_with(t, "carol", 1, 7, bump, NULL);
    ktab_clear(t);
    assert_int_equal(ktab_size(t), 0);
    ktab_free(t);
    ktab_free(NULL);
    assert_null(ktab_new(8, 1));
}

/* However many keys come, the table keeps at most its cap, and what it
 * drops are the records touched longest ago. */
static void test_bounded_lru(void **state)
{
    ktab *t = ktab_new(sizeof(counter), 64);
    char key[32];
    long n;

    (void)state;
    for (int i = 0; i < 10000; i++) {
        snprintf(key, sizeof(key), "k%d", i);
        assert_int_equal(ktab_with(t, key, 1, 1000 + i, bump, NULL), 1);
    }
    assert_true(ktab_size(t) <= 64);
    assert_true(ktab_size(t) >= 32);
    assert_int_equal(ktab_with(t, "k9999", 0, 20000, read_n, &n), 1);
    assert_int_equal(ktab_with(t, "k0", 0, 20000, read_n, &n), 0);
    ktab_free(t);
}

static ktab *shared;

static void *hammer(void *arg)
{
    (void)arg;
    for (int i = 0; i < 20000; i++)
        ktab_with(shared, (i & 1) ? "odd" : "even", 1, i, bump, NULL);
    return NULL;
}

static void test_atomic_updates(void **state)
{
    pthread_t th[4];
    long odd = 0, even = 0;

    (void)state;
    shared = ktab_new(sizeof(counter), 1024);
    for (int i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, hammer, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    ktab_with(shared, "odd", 0, 0, read_n, &odd);
    ktab_with(shared, "even", 0, 0, read_n, &even);
    assert_int_equal(odd, 40000);
    assert_int_equal(even, 40000);
    ktab_free(shared);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_update_remove),
        cmocka_unit_test(test_bounded_lru),
        cmocka_unit_test(test_atomic_updates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
