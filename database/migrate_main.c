/* bin/migrate: applies pending database migrations (see libshared/migrate.h).
 *
 *   migrate [--dir DIR] [--status]
 *
 * The database comes from DATABASE_URL, else DB_HOST/DB_PORT/DB_NAME/
 * DB_USER/DB_PASSWORD (dbpool_conninfo_from_cfg, the one reading of those
 * variables that every service shares); the directory from --dir, else
 * MIGRATIONS_DIR, else the default of migrate_default_dir. Exit status: 0
 * done, 1 refused or database error (one line on stderr saying which),
 * 2 bad usage or configuration. */
#include <stdio.h>
#include <string.h>

#include "cfg.h"
#include "dbpool.h"
#include "log.h"
#include "migrate.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: migrate [--dir DIR] [--status] [--help]\n"
                 "Applies DIR/NNNN_name.sql (default: MIGRATIONS_DIR, else database/migrations next to\n"
                 "the program) in order to the database of DATABASE_URL (or DB_HOST, DB_PORT, DB_NAME,\n"
                 "DB_USER, DB_PASSWORD), each in its own transaction, recorded in schema_migrations.\n"
                 "  --dir DIR  the migrations directory\n"
                 "  --status   list applied and pending migrations, change nothing\n"
                 "Exit status: 0 done, 1 refused or database error, 2 bad usage or configuration.\n");
}

/* Lists applied and pending migrations on a connection of its own. */
static int show_status(const char *conninfo, const char *dir)
{
    const char *const keys[] = {"connect_timeout", "application_name", "dbname", NULL};
    const char *const vals[] = {"10", "migrate", conninfo, NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    char err[1024], msg[1024];
    int rc = 1;

    if (PQstatus(conn) != CONNECTION_OK) {
        /* PQerrorMessage spans lines; the first one says what failed. */
        snprintf(msg, sizeof(msg), "%s", PQerrorMessage(conn));
        msg[strcspn(msg, "\n")] = '\0';
        fprintf(stderr, "migrate: cannot connect to the database: %s\n", msg);
    } else if (migrate_status(conn, dir, err, sizeof(err)) < 0) {
        fprintf(stderr, "migrate: %s\n", err);
    } else {
        rc = 0;
    }
    PQfinish(conn);
    return rc;
}

int main(int argc, char **argv)
{
    char conninfo[2048], dir[1024] = "", err[1024];
    int status = 0, applied = 0;
    cfg *c;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc && argv[i + 1][0]) {
            if ((size_t)snprintf(dir, sizeof(dir), "%s", argv[++i]) >= sizeof(dir)) {
                fprintf(stderr, "migrate: --dir: path too long\n");
                return 2;
            }
        } else if (strcmp(argv[i], "--status") == 0) {
            status = 1;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "migrate: unknown or incomplete option '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    c = cfg_boot("migrate");
    if (!c)
        return 2;
    dbpool_conninfo_from_cfg(c, conninfo, sizeof(conninfo));
    if (!dir[0] && migrate_default_dir(dir, sizeof(dir)) < 0)
        cfg_error(c, "MIGRATIONS_DIR", cfg_str(c, "MIGRATIONS_DIR", dir), "a directory of migrations");
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    if (status)
        return show_status(conninfo, dir);
    if (migrate_conninfo(conninfo, dir, &applied, err, sizeof(err)) < 0) {
        fprintf(stderr, "migrate: %s%s\n", err, applied ? " (the migrations before it were applied)" : "");
        return 1;
    }
    if (applied)
        printf("applied %d migrations\n", applied);
    else
        printf("up to date\n");
    return 0;
}
