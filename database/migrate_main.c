/* migrate: applies pending database migrations (see libshared/migrate.h). */
#include <stdio.h>
#include <string.h>

#include "cfg.h"
#include "dbpool.h"
#include "log.h"
#include "migrate.h"

static void usage(FILE *out)
{
    fprintf(out, "usage: migrate [--dir DIR] [--status]\n"
                 "Applies database/migrations/NNNN_name.sql in order to DATABASE_URL (or DB_*).\n");
}

int main(int argc, char **argv)
{
    char conninfo[2048], dir[1024] = "", err[1024];
    int status = 0, applied = 0, rc;
    PGconn *conn;
    cfg *c;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
            snprintf(dir, sizeof(dir), "%s", argv[++i]);
        } else if (strcmp(argv[i], "--status") == 0) {
            status = 1;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else {
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
    conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "migrate: cannot connect to the database: %s", PQerrorMessage(conn));
        PQfinish(conn);
        return 1;
    }
    rc = status ? migrate_status(conn, dir, err, sizeof(err)) : migrate_run(conn, dir, &applied, err, sizeof(err));
    PQfinish(conn);
    if (rc < 0) {
        fprintf(stderr, "migrate: refused: %s\n", err);
        return 1;
    }
    if (!status)
        printf(applied ? "applied %d migrations\n" : "up to date\n", applied);
    return 0;
}
