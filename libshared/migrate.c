#include "migrate.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "log.h"

#define MIGRATE_MAX_FILES 512

void migrate_sha256_hex(const void *data, size_t len, char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL);
    for (unsigned int i = 0; i < 32 && i < mdlen; i++) {
        hex[i * 2] = digits[md[i] >> 4];
        hex[i * 2 + 1] = digits[md[i] & 15];
    }
    hex[64] = '\0';
}

int migrate_parse_name(const char *name)
{
    size_t len = strlen(name);
    int digits = 0;
    long v = 0;

    while (isdigit((unsigned char)name[digits]) && digits < 9)
        v = v * 10 + (name[digits++] - '0');
    if (digits < 4 || name[digits] != '_' || len < (size_t)digits + 6 || strcmp(name + len - 4, ".sql") != 0)
        return -1;
    for (size_t i = (size_t)digits + 1; i < len - 4; i++)
        if (!isalnum((unsigned char)name[i]) && name[i] != '_' && name[i] != '-')
            return -1;
    return v > 0 && v <= INT_MAX ? (int)v : -1;
}

/* Reads a whole file (bounded). *out is malloc'd, NUL-terminated. */
static int migrate_read(const char *path, char **out, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0;

    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    buf = malloc(MIGRATE_MAX_FILE + 1);
    if (!buf) {
        fclose(f);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    n = fread(buf, 1, MIGRATE_MAX_FILE + 1, f);
    fclose(f);
    if (n > MIGRATE_MAX_FILE) {
        free(buf);
        snprintf(err, errlen, "%s: larger than %d bytes", path, MIGRATE_MAX_FILE);
        return -1;
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

static int migrate_cmp(const void *a, const void *b)
{
    const migrate_file *x = a, *y = b;

    return (x->version > y->version) - (x->version < y->version);
}

int migrate_scan(const char *dir, migrate_file *files, int max, char *err, size_t errlen)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;

    if (!d) {
        snprintf(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    while ((e = readdir(d))) {
        char path[PATH_MAX], *data;
        size_t len;
        int v;

        if (e->d_name[0] == '.' || strcmp(e->d_name + (strlen(e->d_name) > 4 ? strlen(e->d_name) - 4 : 0), ".sql"))
            continue;
        v = migrate_parse_name(e->d_name);
        if (v < 0 || strlen(e->d_name) >= sizeof(files[0].name)) {
            snprintf(err, errlen, "%s: not a migration name (expected NNNN_name.sql)", e->d_name);
            goto fail;
        }
        if (n >= max) {
            snprintf(err, errlen, "%s: more than %d migrations", dir, max);
            goto fail;
        }
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (migrate_read(path, &data, &len, err, errlen) < 0)
            goto fail;
        files[n].version = v;
        snprintf(files[n].name, sizeof(files[n].name), "%s", e->d_name);
        migrate_sha256_hex(data, len, files[n].checksum);
        free(data);
        n++;
    }
    closedir(d);
    qsort(files, (size_t)n, sizeof(files[0]), migrate_cmp);
    for (int i = 1; i < n; i++) {
        if (files[i].version == files[i - 1].version) {
            snprintf(err, errlen, "%s and %s share version %d", files[i - 1].name, files[i].name, files[i].version);
            return -1;
        }
    }
    return n;
fail:
    closedir(d);
    return -1;
}

/* Runs a statement that returns no rows of interest. */
static int migrate_exec(PGconn *conn, const char *sql, char *err, size_t errlen)
{
    PGresult *r = PQexec(conn, sql);
    int ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;

    if (!ok)
        snprintf(err, errlen, "%s", PQerrorMessage(conn));
    PQclear(r);
    return ok ? 0 : -1;
}

static int migrate_lock(PGconn *conn, int take, char *err, size_t errlen)
{
    char sql[96];

    snprintf(sql, sizeof(sql), "SELECT pg_advisory_%s(%lld)", take ? "lock" : "unlock", (long long)MIGRATE_LOCK_KEY);
    return migrate_exec(conn, sql, err, errlen);
}

/* Compares applied rows with the files. Returns the number of applied
 * versions found in files (matched[i] set), or -1 on a refusal. */
static int migrate_check_applied(PGconn *conn, const migrate_file *files, int n, int *matched, char *err,
                                 size_t errlen)
{
    PGresult *r = PQexec(conn, "SELECT version, name, checksum FROM schema_migrations ORDER BY version");
    int rows, rc = 0;

    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "%s", PQerrorMessage(conn));
        PQclear(r);
        return -1;
    }
    rows = PQntuples(r);
    for (int i = 0; i < rows && rc >= 0; i++) {
        long v = strtol(PQgetvalue(r, i, 0), NULL, 10);
        int found = -1;

        for (int j = 0; j < n; j++)
            if (files[j].version == v)
                found = j;
        if (found < 0) {
            snprintf(err, errlen, "applied migration %s is missing from the migrations directory",
                     PQgetvalue(r, i, 1));
            rc = -1;
        } else if (strcmp(files[found].checksum, PQgetvalue(r, i, 2)) != 0) {
            snprintf(err, errlen, "applied migration %s has changed since it was applied (checksum %.12s..., now %.12s...)",
                     files[found].name, PQgetvalue(r, i, 2), files[found].checksum);
            rc = -1;
        } else {
            matched[found] = 1;
            rc++;
        }
    }
    PQclear(r);
    return rc;
}

static int migrate_apply(PGconn *conn, const char *dir, const migrate_file *f, char *err, size_t errlen)
{
    char path[PATH_MAX], version[16], *sql = NULL;
    const char *params[3];
    size_t len;
    PGresult *r;
    int rc = -1;

    snprintf(path, sizeof(path), "%s/%s", dir, f->name);
    if (migrate_read(path, &sql, &len, err, errlen) < 0)
        return -1;
    if (migrate_exec(conn, "BEGIN", err, errlen) < 0)
        goto out;
    if (migrate_exec(conn, sql, err, errlen) < 0) {
        char why[512];
        snprintf(why, sizeof(why), "%s", err);
        snprintf(err, errlen, "%s: %s", f->name, why);
        goto rollback;
    }
    snprintf(version, sizeof(version), "%d", f->version);
    params[0] = version;
    params[1] = f->name;
    params[2] = f->checksum;
    r = PQexecParams(conn, "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)", 3, NULL,
                     params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        snprintf(err, errlen, "%s", PQerrorMessage(conn));
        PQclear(r);
        goto rollback;
    }
    PQclear(r);
    rc = migrate_exec(conn, "COMMIT", err, errlen);
    if (rc == 0)
        log_event(LOG_INFO, "migration applied", "\"migration\":\"%s\"", f->name);
    goto out;
rollback:
    PQclear(PQexec(conn, "ROLLBACK"));
out:
    free(sql);
    return rc;
}

static int migrate_locked(PGconn *conn, const char *dir, const migrate_file *files, int n, int *applied, char *err,
                          size_t errlen)
{
    int matched[MIGRATE_MAX_FILES] = {0};

    if (migrate_exec(conn,
                     "SET client_min_messages = warning;"
                     "CREATE TABLE IF NOT EXISTS schema_migrations (version int PRIMARY KEY, name text NOT NULL, "
                     "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                     err, errlen) < 0)
        return -1;
    if (migrate_check_applied(conn, files, n, matched, err, errlen) < 0)
        return -1;
    for (int i = 0; i < n; i++) {
        if (matched[i])
            continue;
        if (migrate_apply(conn, dir, &files[i], err, errlen) < 0)
            return -1;
        (*applied)++;
    }
    return 0;
}

int migrate_run(PGconn *conn, const char *dir, int *applied, char *err, size_t errlen)
{
    migrate_file *files = calloc(MIGRATE_MAX_FILES, sizeof(*files));
    int n, rc = -1, count = 0;
    char unlock_err[256];

    if (!files) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    n = migrate_scan(dir, files, MIGRATE_MAX_FILES, err, errlen);
    if (n < 0 || migrate_lock(conn, 1, err, errlen) < 0)
        goto out;
    rc = migrate_locked(conn, dir, files, n, &count, err, errlen);
    migrate_lock(conn, 0, unlock_err, sizeof(unlock_err));
out:
    if (applied)
        *applied = count;
    free(files);
    return rc;
}

int migrate_conninfo(const char *conninfo, const char *dir, int *applied, char *err, size_t errlen)
{
    PGconn *conn = PQconnectdb(conninfo);
    int rc;

    if (PQstatus(conn) != CONNECTION_OK) {
        snprintf(err, errlen, "cannot connect: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return -1;
    }
    rc = migrate_run(conn, dir, applied, err, errlen);
    PQfinish(conn);
    return rc;
}

static int migrate_is_dir(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int migrate_default_dir(char *out, size_t outlen)
{
    const char *env = getenv("MIGRATIONS_DIR");
    char exe[PATH_MAX];
    ssize_t n;

    if (env && *env) {
        snprintf(out, outlen, "%s", env);
        return migrate_is_dir(out) ? 0 : -1;
    }
    n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        char *slash;

        exe[n] = '\0';
        slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            /* bin/x and build-san/bin/x both sit below the repository. */
            for (int up = 1; up <= 2; up++) {
                char cand[PATH_MAX + 64];
                snprintf(cand, sizeof(cand), "%s/%s/database/migrations", exe, up == 1 ? ".." : "../..");
                if (migrate_is_dir(cand) && strlen(cand) < outlen) {
                    snprintf(out, outlen, "%s", cand);
                    return 0;
                }
            }
        }
    }
    snprintf(out, outlen, "database/migrations");
    return migrate_is_dir(out) ? 0 : -1;
}

int migrate_status(PGconn *conn, const char *dir, char *err, size_t errlen)
{
    migrate_file *files = calloc(MIGRATE_MAX_FILES, sizeof(*files));
    int matched[MIGRATE_MAX_FILES] = {0};
    int n, rc = -1;
    PGresult *r = NULL;

    if (!files) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    n = migrate_scan(dir, files, MIGRATE_MAX_FILES, err, errlen);
    if (n < 0)
        goto out;
    r = PQexec(conn, "SELECT to_regclass('schema_migrations') IS NOT NULL");
    if (PQresultStatus(r) == PGRES_TUPLES_OK && strcmp(PQgetvalue(r, 0, 0), "t") == 0 &&
        migrate_check_applied(conn, files, n, matched, err, errlen) < 0)
        goto out;
    for (int i = 0; i < n; i++)
        printf("%-8s %s\n", matched[i] ? "applied" : "pending", files[i].name);
    rc = 0;
out:
    PQclear(r);
    free(files);
    return rc;
}
