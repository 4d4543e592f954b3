#include "migrate.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "fmt.h"
#include "log.h"

/* What the notice receiver needs to name the file being applied. */
typedef struct {
    const char *file;
} migrate_ctx;

void migrate_sha256_hex(const void *data, size_t len, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    /* EVP_Digest fails only when OpenSSL cannot allocate its context; an
     * all-zero digest then cannot match any recorded checksum, so a run
     * refuses rather than applying twice. */
    memset(md, 0, sizeof(md));
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        memset(md, 0, 32);
    fmt_hex(hex, md, 32);
}

int migrate_parse_name(const char *name)
{
    size_t len = strlen(name);
    int digits = 0;
    long v = 0;

    while (digits < 9 && isdigit((unsigned char)name[digits]))
        v = v * 10 + (name[digits++] - '0');
    if (digits < 4 || name[digits] != '_' || len < (size_t)digits + 6 || strcmp(name + len - 4, ".sql") != 0)
        return -1;
    for (size_t i = (size_t)digits + 1; i < len - 4; i++)
        if (!isalnum((unsigned char)name[i]) && name[i] != '_' && name[i] != '-')
            return -1;
    return v > 0 && v <= INT_MAX ? (int)v : -1;
}

/* Copies `src` into `dst` on one line: every run of whitespace that holds
 * a line break or tab becomes one space, and trailing whitespace goes. */
static void migrate_oneline(char *dst, size_t dstlen, const char *src)
{
    size_t n = 0;

    if (!dstlen)
        return;
    for (; *src && n + 1 < dstlen; src++) {
        if (*src == '\n' || *src == '\r' || *src == '\t') {
            if (n && dst[n - 1] != ' ')
                dst[n++] = ' ';
        } else {
            dst[n++] = *src;
        }
    }
    while (n && dst[n - 1] == ' ')
        n--;
    dst[n] = '\0';
}

/* The line (1-based) of `sql` that holds character `pos` (1-based, counted
 * in UTF-8 characters as PostgreSQL reports it). */
static int migrate_line_of(const char *sql, long pos)
{
    long chars = 0;
    int line = 1;

    for (const unsigned char *p = (const unsigned char *)sql; *p; p++) {
        if ((*p & 0xC0) != 0x80 && ++chars >= pos)
            break;
        if (*p == '\n')
            line++;
    }
    return line;
}

/* A failed result as one line: "[<what>: ][line N: ]message[ (detail)]
 * [ (context)]". `sql` (may be NULL) turns the error position into a line
 * number of the file. */
static void migrate_pgerr(PGconn *conn, const PGresult *r, const char *what, const char *sql, char *err,
                          size_t errlen)
{
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *detail = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_DETAIL) : NULL;
    const char *context = r ? PQresultErrorField(r, PG_DIAG_CONTEXT) : NULL;
    const char *pos = r ? PQresultErrorField(r, PG_DIAG_STATEMENT_POSITION) : NULL;
    char msg[512], det[256] = "", ctx[256] = "", line[32] = "";

    migrate_oneline(msg, sizeof(msg), primary ? primary : PQerrorMessage(conn));
    if (!msg[0])
        snprintf(msg, sizeof(msg), "no answer from the server");
    if (detail) {
        char d[240];
        migrate_oneline(d, sizeof(d), detail);
        snprintf(det, sizeof(det), " (%s)", d);
    }
    if (context) {
        /* The innermost context line names the PL/pgSQL line of a DO block. */
        char c[240];
        migrate_oneline(c, sizeof(c), context);
        snprintf(ctx, sizeof(ctx), " (%s)", c);
    }
    if (pos && sql) {
        long p = strtol(pos, NULL, 10);
        if (p > 0)
            snprintf(line, sizeof(line), "line %d: ", migrate_line_of(sql, p));
    }
    snprintf(err, errlen, "%s%s%s%s%s", what ? what : "", what ? ": " : "", line, msg, det);
    if (ctx[0] && strlen(err) + strlen(ctx) < errlen)
        snprintf(err + strlen(err), errlen - strlen(err), "%s", ctx);
}

/* Reads a regular file of at most MIGRATE_MAX_FILE bytes without NUL bytes
 * (PQexec would stop at one, while the checksum covers every byte). *out
 * is malloc'd and NUL-terminated; the caller frees it. */
static int migrate_read(const char *path, char **out, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    struct stat st;
    size_t n;

    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fileno(f), &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: not a regular file", path);
        goto fail;
    }
    if (st.st_size > MIGRATE_MAX_FILE) {
        snprintf(err, errlen, "%s: larger than %d bytes", path, MIGRATE_MAX_FILE);
        goto fail;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        snprintf(err, errlen, "%s: out of memory", path);
        goto fail;
    }
    /* Asking for one byte more than the size notices a file that grows. */
    n = fread(buf, 1, (size_t)st.st_size + 1, f);
    if (ferror(f)) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (n != (size_t)st.st_size) {
        snprintf(err, errlen, "%s: changed while it was being read", path);
        goto fail;
    }
    if (memchr(buf, '\0', n)) {
        snprintf(err, errlen, "%s: contains a NUL byte", path);
        goto fail;
    }
    fclose(f);
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
fail:
    free(buf);
    fclose(f);
    return -1;
}

static int migrate_cmp(const void *a, const void *b)
{
    const migrate_file *x = a, *y = b;

    return (x->version > y->version) - (x->version < y->version);
}

static int migrate_is_sql(const char *name)
{
    size_t len = strlen(name);

    return name[0] != '.' && len > 4 && strcmp(name + len - 4, ".sql") == 0;
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

        if (!migrate_is_sql(e->d_name))
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
        if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= sizeof(path)) {
            snprintf(err, errlen, "%s: path too long", e->d_name);
            goto fail;
        }
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

/* Runs a statement whose rows do not matter. */
static int migrate_exec(PGconn *conn, const char *sql, const char *what, char *err, size_t errlen)
{
    PGresult *r = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(r);
    int ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;

    if (!ok)
        migrate_pgerr(conn, r, what, NULL, err, errlen);
    PQclear(r);
    return ok ? 0 : -1;
}

/* Returns 1 when the single-value query `sql` answered "t", 0 when it
 * answered anything else, -1 on error. */
static int migrate_query_bool(PGconn *conn, const char *sql, const char *what, char *err, size_t errlen)
{
    PGresult *r = PQexec(conn, sql);
    int rc;

    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        migrate_pgerr(conn, r, what, NULL, err, errlen);
        PQclear(r);
        return -1;
    }
    rc = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    return rc;
}

/* Takes the session lock, saying so in the log when another run holds it,
 * so that a service that seems stuck at start explains why. */
static int migrate_lock(PGconn *conn, char *err, size_t errlen)
{
    char sql[96];
    int got;

    snprintf(sql, sizeof(sql), "SELECT pg_try_advisory_lock(%lld)", (long long)MIGRATE_LOCK_KEY);
    got = migrate_query_bool(conn, sql, "migration lock", err, errlen);
    if (got != 0)
        return got < 0 ? -1 : 0;
    log_event(LOG_INFO, "waiting for the migration lock held by another run", "\"lock_key\":%lld",
              (long long)MIGRATE_LOCK_KEY);
    snprintf(sql, sizeof(sql), "SELECT pg_advisory_lock(%lld)", (long long)MIGRATE_LOCK_KEY);
    return migrate_exec(conn, sql, "migration lock", err, errlen);
}

/* Leaves the connection idle and without the lock, whatever happened. A
 * connection that is gone releases the lock with its session. */
static void migrate_unlock(PGconn *conn)
{
    char sql[96];

    if (PQtransactionStatus(conn) == PQTRANS_INTRANS || PQtransactionStatus(conn) == PQTRANS_INERROR)
        PQclear(PQexec(conn, "ROLLBACK"));
    snprintf(sql, sizeof(sql), "SELECT pg_advisory_unlock(%lld)", (long long)MIGRATE_LOCK_KEY);
    PQclear(PQexec(conn, sql));
}

/* Compares applied rows with the files. Sets matched[i] for each file that
 * is applied and stores the highest applied version in *max_applied (may be
 * NULL). Returns the number of applied versions, or -1 on a refusal or
 * error. */
static int migrate_check_applied(PGconn *conn, const migrate_file *files, int n, int *matched, int *max_applied,
                                 char *err, size_t errlen)
{
    PGresult *r = PQexec(conn, "SELECT version, name, checksum FROM schema_migrations ORDER BY version");
    int rows, rc = 0;

    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        migrate_pgerr(conn, r, "schema_migrations", NULL, err, errlen);
        PQclear(r);
        return -1;
    }
    rows = PQntuples(r);
    for (int i = 0; i < rows && rc >= 0; i++) {
        long v = strtol(PQgetvalue(r, i, 0), NULL, 10);
        int found = -1;

        for (int j = 0; j < n && found < 0; j++)
            if (files[j].version == v)
                found = j;
        if (found < 0) {
            snprintf(err, errlen,
                     "refusing to migrate: applied migration %s (version %ld) is missing from the migrations "
                     "directory",
                     PQgetvalue(r, i, 1), v);
            rc = -1;
        } else if (strcmp(files[found].checksum, PQgetvalue(r, i, 2)) != 0) {
            snprintf(err, errlen,
                     "refusing to migrate: applied migration %s has changed since it was applied "
                     "(recorded checksum %.12s, file now %.12s); add a new migration instead",
                     files[found].name, PQgetvalue(r, i, 2), files[found].checksum);
            rc = -1;
        } else {
            matched[found] = 1;
            if (max_applied && v > *max_applied)
                *max_applied = (int)v;
            rc++;
        }
    }
    PQclear(r);
    return rc;
}

static double migrate_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Applies one file in its own transaction. The file is read again here and
 * must still have the checksum the scan found, so that the recorded
 * checksum always belongs to the SQL that ran. */
static int migrate_apply(PGconn *conn, const char *dir, const migrate_file *f, migrate_ctx *ctx, char *err,
                         size_t errlen)
{
    char path[PATH_MAX], version[16], sum[65], esc[256], *sql = NULL;
    const char *params[3];
    double t0 = migrate_now_ms();
    size_t len;
    PGresult *r;
    int rc = -1;

    snprintf(path, sizeof(path), "%s/%s", dir, f->name);
    if (migrate_read(path, &sql, &len, err, errlen) < 0)
        return -1;
    migrate_sha256_hex(sql, len, sum);
    if (strcmp(sum, f->checksum) != 0) {
        snprintf(err, errlen, "%s: changed while migrating; run again", f->name);
        goto out;
    }
    if (migrate_exec(conn, "BEGIN", f->name, err, errlen) < 0)
        goto out;
    ctx->file = f->name;
    r = PQexec(conn, sql);
    ctx->file = NULL;
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK &&
        PQresultStatus(r) != PGRES_EMPTY_QUERY) {
        char why[768];
        migrate_pgerr(conn, r, f->name, sql, why, sizeof(why));
        snprintf(err, errlen, "%s; rolled back, nothing after it applied", why);
        PQclear(r);
        goto out;
    }
    PQclear(r);
    if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
        snprintf(err, errlen,
                 "%s: ended the migration's transaction itself (remove its BEGIN/COMMIT); not recorded, check "
                 "the schema by hand",
                 f->name);
        goto out;
    }
    snprintf(version, sizeof(version), "%d", f->version);
    params[0] = version;
    params[1] = f->name;
    params[2] = f->checksum;
    r = PQexecParams(conn, "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)", 3, NULL,
                     params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        migrate_pgerr(conn, r, f->name, NULL, err, errlen);
        PQclear(r);
        goto out;
    }
    PQclear(r);
    if (migrate_exec(conn, "COMMIT", f->name, err, errlen) < 0)
        goto out;
    log_event(LOG_INFO, "migration applied", "\"migration\":\"%s\",\"version\":%d,\"duration_ms\":%.1f",
              log_escape(esc, sizeof(esc), f->name), f->version, migrate_now_ms() - t0);
    rc = 0;
out:
    /* Whatever failed, the transaction goes; the caller still unlocks. */
    if (rc < 0 && PQtransactionStatus(conn) != PQTRANS_IDLE && PQtransactionStatus(conn) != PQTRANS_UNKNOWN)
        PQclear(PQexec(conn, "ROLLBACK"));
    free(sql);
    return rc;
}

static int migrate_locked(PGconn *conn, const char *dir, const migrate_file *files, int n, migrate_ctx *ctx,
                          int *applied, char *err, size_t errlen)
{
    int matched[MIGRATE_MAX_FILES] = {0}, max_applied = 0, exists;

    /* Created only when missing rather than with IF NOT EXISTS, which would
     * raise a notice on every start; the lock makes the check race-free. */
    exists = migrate_query_bool(conn, "SELECT to_regclass('schema_migrations') IS NOT NULL", "schema_migrations",
                                err, errlen);
    if (exists < 0)
        return -1;
    if (!exists && migrate_exec(conn,
                                "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text NOT NULL, "
                                "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                                "schema_migrations", err, errlen) < 0)
        return -1;
    if (migrate_check_applied(conn, files, n, matched, &max_applied, err, errlen) < 0)
        return -1;
    for (int i = 0; i < n; i++) {
        if (matched[i])
            continue;
        if (files[i].version < max_applied) {
            char esc[256];
            log_event(LOG_WARN, "applying a migration after later ones", "\"migration\":\"%s\",\"max_applied\":%d",
                      log_escape(esc, sizeof(esc), files[i].name), max_applied);
        }
        if (migrate_apply(conn, dir, &files[i], ctx, err, errlen) < 0)
            return -1;
        (*applied)++;
    }
    return 0;
}

/* Logs the server's notices and warnings during a run (RAISE NOTICE in a
 * migration, e.g. the TimescaleDB line of 0001) with the file's name. */
static void migrate_notice(void *arg, const PGresult *res)
{
    const migrate_ctx *ctx = arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    log_level lvl = sev && strcmp(sev, "WARNING") == 0 ? LOG_WARN : LOG_INFO;
    char one[512], e_msg[1100], e_file[256];

    if (!log_enabled(lvl))
        return;
    migrate_oneline(one, sizeof(one), msg ? msg : PQresultErrorMessage(res));
    log_event(lvl, "migration notice", "\"migration\":\"%s\",\"severity\":\"%s\",\"notice\":\"%s\"",
              log_escape(e_file, sizeof(e_file), ctx && ctx->file ? ctx->file : ""), sev ? sev : "NOTICE",
              log_escape(e_msg, sizeof(e_msg), one));
}

int migrate_run(PGconn *conn, const char *dir, int *applied, char *err, size_t errlen)
{
    migrate_file *files = calloc(MIGRATE_MAX_FILES, sizeof(*files));
    PQnoticeReceiver old_receiver = NULL;
    migrate_ctx ctx = {NULL};
    int n, rc = -1, count = 0;

    if (!files) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        migrate_pgerr(conn, NULL, "database connection", NULL, err, errlen);
        goto out;
    }
    if (PQtransactionStatus(conn) != PQTRANS_IDLE) {
        snprintf(err, errlen, "migrate_run needs an idle connection (this one is inside a transaction)");
        goto out;
    }
    n = migrate_scan(dir, files, MIGRATE_MAX_FILES, err, errlen);
    if (n < 0) {
        char why[768];
        snprintf(why, sizeof(why), "%s", err);
        snprintf(err, errlen, "refusing to migrate: %s", why);
        goto out;
    }
    old_receiver = PQsetNoticeReceiver(conn, migrate_notice, &ctx);
    if (migrate_lock(conn, err, errlen) == 0) {
        rc = migrate_locked(conn, dir, files, n, &ctx, &count, err, errlen);
        migrate_unlock(conn);
    }
    PQsetNoticeReceiver(conn, old_receiver, NULL);
out:
    if (applied)
        *applied = count;
    free(files);
    return rc;
}

int migrate_conninfo(const char *conninfo, const char *dir, int *applied, char *err, size_t errlen)
{
    /* Defaults before dbname, so that the expanded conninfo overrides them. */
    const char *const keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *const vals[] = {"10", "migrate", conninfo, NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    int rc;

    if (applied)
        *applied = 0;
    if (PQstatus(conn) != CONNECTION_OK) {
        migrate_pgerr(conn, NULL, "cannot connect to the database", NULL, err, errlen);
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
    int n, rc = -1, exists;

    if (!files) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    n = migrate_scan(dir, files, MIGRATE_MAX_FILES, err, errlen);
    if (n < 0) {
        char why[768];
        snprintf(why, sizeof(why), "%s", err);
        snprintf(err, errlen, "refusing to migrate: %s", why);
        goto out;
    }
    exists = migrate_query_bool(conn, "SELECT to_regclass('schema_migrations') IS NOT NULL", "schema_migrations",
                                err, errlen);
    if (exists < 0 || (exists && migrate_check_applied(conn, files, n, matched, NULL, err, errlen) < 0))
        goto out;
    for (int i = 0; i < n; i++)
        printf("%-8s %s\n", matched[i] ? "applied" : "pending", files[i].name);
    rc = 0;
out:
    free(files);
    return rc;
}
