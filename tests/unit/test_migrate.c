/* Unit tests for migrate's pure parts: file names, ordering, duplicates and
 * checksums. The database side is tested in tests/integration/test_migrate.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "migrate.h"

static void test_parse_name(void **state)
{
    (void)state;
    assert_int_equal(migrate_parse_name("0001_erc8004.sql"), 1);
    assert_int_equal(migrate_parse_name("0010_add-index.sql"), 10);
    assert_int_equal(migrate_parse_name("12345_big.sql"), 12345);
    assert_int_equal(migrate_parse_name("001_short.sql"), -1);
    assert_int_equal(migrate_parse_name("0001-dash.sql"), -1);
    assert_int_equal(migrate_parse_name("0001_.sql"), -1);
    assert_int_equal(migrate_parse_name("0001_x.txt"), -1);
    assert_int_equal(migrate_parse_name("0001_we ird.sql"), -1);
    assert_int_equal(migrate_parse_name("0000_zero.sql"), -1);
}

static void test_sha256(void **state)
{
    char hex[65];

    (void)state;
    migrate_sha256_hex("abc", 3, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    migrate_sha256_hex("", 0, hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_scan_orders_numerically(void **state)
{
    char dir[] = "/tmp/ae-mig-XXXXXX", err[256];
    migrate_file files[8];

    (void)state;
    assert_non_null(mkdtemp(dir));
    write_file(dir, "0010_ten.sql", "SELECT 10;");
    write_file(dir, "0002_two.sql", "SELECT 2;");
    write_file(dir, "0100_hundred.sql", "SELECT 100;");
    write_file(dir, "README", "not a migration");
    assert_int_equal(migrate_scan(dir, files, 8, err, sizeof(err)), 3);
    assert_string_equal(files[0].name, "0002_two.sql");
    assert_string_equal(files[1].name, "0010_ten.sql");
    assert_string_equal(files[2].name, "0100_hundred.sql");
    assert_int_equal(strlen(files[0].checksum), 64);
    assert_int_equal(migrate_scan(dir, files, 2, err, sizeof(err)), -1);
    write_file(dir, "0010_again.sql", "SELECT 11;");
    assert_int_equal(migrate_scan(dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "version 10"));
    write_file(dir, "0010_again.sql", "");
    char path[512];
    snprintf(path, sizeof(path), "%s/0010_again.sql", dir);
    unlink(path);
    write_file(dir, "x_bad.sql", "SELECT 1;");
    assert_int_equal(migrate_scan(dir, files, 8, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "x_bad.sql"));
    const char *names[] = {"0010_ten.sql", "0002_two.sql", "0100_hundred.sql", "README", "x_bad.sql"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_name),
        cmocka_unit_test(test_sha256),
        cmocka_unit_test(test_scan_orders_numerically),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
