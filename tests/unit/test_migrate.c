/* Unit tests for migrate's pure parts: file names, ordering, duplicates,
 * file checks, checksums and the default directory. The database side is
 * tested in tests/integration/test_migrate.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "migrate.h"

/* A scratch directory per test, removed with everything in it. */
typedef struct {
    char dir[64];
} fixture;

static int setup(void **state)
{
    fixture *fx = calloc(1, sizeof(*fx));

    if (!fx)
        return -1;
    snprintf(fx->dir, sizeof(fx->dir), "/tmp/ae-mig-XXXXXX");
    if (!mkdtemp(fx->dir)) {
        free(fx);
        return -1;
    }
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    fixture *fx = *state;
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", fx->dir);
    free(fx);
    return 0;
}

static void write_bytes(const char *dir, const char *name, const void *data, size_t len)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    write_bytes(dir, name, text, strlen(text));
}

static void remove_file(const char *dir, const char *name)
{
    char path[512];

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    assert_int_equal(unlink(path), 0);
}

static void test_parse_name(void **state)
{
    (void)state;
    assert_int_equal(migrate_parse_name("0001_erc8004.sql"), 1);
    assert_int_equal(migrate_parse_name("0010_add-index.sql"), 10);
    assert_int_equal(migrate_parse_name("0002_event_processing.sql"), 2);
    assert_int_equal(migrate_parse_name("12345_big.sql"), 12345);
    assert_int_equal(migrate_parse_name("999999999_max.sql"), 999999999);
    assert_int_equal(migrate_parse_name("0000000001_ten_digits.sql"), -1);
    assert_int_equal(migrate_parse_name("001_short.sql"), -1);
    assert_int_equal(migrate_parse_name("0001-dash.sql"), -1);
    assert_int_equal(migrate_parse_name("0001_.sql"), -1);
    assert_int_equal(migrate_parse_name("0001_x.txt"), -1);
    assert_int_equal(migrate_parse_name("0001_x.SQL"), -1);
    assert_int_equal(migrate_parse_name("0001_we ird.sql"), -1);
    assert_int_equal(migrate_parse_name("0001_a.b.sql"), -1);
    assert_int_equal(migrate_parse_name("0000_zero.sql"), -1);
    assert_int_equal(migrate_parse_name("x0001_a.sql"), -1);
    assert_int_equal(migrate_parse_name(".sql"), -1);
    assert_int_equal(migrate_parse_name(""), -1);
}

static void test_sha256(void **state)
{
    char hex[65];

    (void)state;
    migrate_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    migrate_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    /* FIPS 180-2's two-block example. */
    migrate_sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", 56, hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

static void test_scan_orders_numerically(void **state)
{
    fixture *fx = *state;
    char err[256], hex[65];
    migrate_file files[8];

    write_file(fx->dir, "0010_ten.sql", "SELECT 10;");
    write_file(fx->dir, "0002_two.sql", "SELECT 2;");
    write_file(fx->dir, "0100_hundred.sql", "SELECT 100;");
    write_file(fx->dir, "0009_nine.sql", "SELECT 9;");
    /* Not migrations: ignored rather than refused. */
    write_file(fx->dir, "README", "not a migration");
    write_file(fx->dir, "README.md", "not a migration");
    write_file(fx->dir, ".0003_hidden.sql", "SELECT 3;");
    write_file(fx->dir, "0004_backup.sql.bak", "SELECT 4;");
    write_file(fx->dir, "0005_editor.sql~", "SELECT 5;");
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), 4);
    assert_string_equal(files[0].name, "0002_two.sql");
    assert_int_equal(files[0].version, 2);
    assert_string_equal(files[1].name, "0009_nine.sql");
    assert_string_equal(files[2].name, "0010_ten.sql");
    assert_int_equal(files[2].version, 10);
    assert_string_equal(files[3].name, "0100_hundred.sql");
    migrate_sha256_hex("SELECT 10;", 10, hex);
    assert_string_equal(files[2].checksum, hex);
    /* One slot too few. */
    assert_int_equal(migrate_scan(fx->dir, files, 3, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "more than 3"));
}

static void test_scan_refuses_duplicates_and_bad_names(void **state)
{
    fixture *fx = *state;
    char err[256];
    migrate_file files[8];

    write_file(fx->dir, "0010_ten.sql", "SELECT 10;");
    write_file(fx->dir, "010_again.sql", "SELECT 11;");
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "010_again.sql"));
    assert_non_null(strstr(err, "not a migration name"));
    remove_file(fx->dir, "010_again.sql");

    /* Same number, different zero padding: the same version. */
    write_file(fx->dir, "00010_again.sql", "SELECT 11;");
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "version 10"));
    assert_non_null(strstr(err, "0010_ten.sql"));
    assert_non_null(strstr(err, "00010_again.sql"));
    remove_file(fx->dir, "00010_again.sql");

    write_file(fx->dir, "x_bad.sql", "SELECT 1;");
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "x_bad.sql"));
    remove_file(fx->dir, "x_bad.sql");

    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), 1);
}

static void test_scan_checks_files(void **state)
{
    fixture *fx = *state;
    char err[256], path[512];
    migrate_file files[8];
    char *big;

    /* A directory that looks like a migration. */
    snprintf(path, sizeof(path), "%s/0001_dir.sql", fx->dir);
    assert_int_equal(mkdir(path, 0755), 0);
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "not a regular file"));
    assert_int_equal(rmdir(path), 0);

    /* A NUL byte would cut the SQL that PQexec sees short of what the
     * checksum covers. */
    write_bytes(fx->dir, "0001_nul.sql", "SELECT 1;\0DROP TABLE x;", 23);
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "NUL"));
    remove_file(fx->dir, "0001_nul.sql");

    /* Exactly the limit is fine, one byte more is not. */
    big = malloc(MIGRATE_MAX_FILE + 1);
    assert_non_null(big);
    memset(big, ' ', MIGRATE_MAX_FILE + 1);
    write_bytes(fx->dir, "0001_big.sql", big, MIGRATE_MAX_FILE);
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), 1);
    write_bytes(fx->dir, "0001_big.sql", big, MIGRATE_MAX_FILE + 1);
    free(big);
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "larger than"));
    remove_file(fx->dir, "0001_big.sql");

    /* Empty directory: nothing to do; missing directory: an error. */
    assert_int_equal(migrate_scan(fx->dir, files, 8, err, sizeof(err)), 0);
    snprintf(path, sizeof(path), "%s/nope", fx->dir);
    assert_int_equal(migrate_scan(path, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "nope"));
}

static void test_default_dir(void **state)
{
    fixture *fx = *state;
    char out[512], missing[128];

    setenv("MIGRATIONS_DIR", fx->dir, 1);
    assert_int_equal(migrate_default_dir(out, sizeof(out)), 0);
    assert_string_equal(out, fx->dir);
    snprintf(missing, sizeof(missing), "%s/missing", fx->dir);
    setenv("MIGRATIONS_DIR", missing, 1);
    assert_int_equal(migrate_default_dir(out, sizeof(out)), -1);
    assert_string_equal(out, missing);
    unsetenv("MIGRATIONS_DIR");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_name),
        cmocka_unit_test(test_sha256),
        cmocka_unit_test_setup_teardown(test_scan_orders_numerically, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scan_refuses_duplicates_and_bad_names, setup, teardown),
        cmocka_unit_test_setup_teardown(test_scan_checks_files, setup, teardown),
        cmocka_unit_test_setup_teardown(test_default_dir, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
