/* runtime-migrate: applies the platform's migrations (which include the
 * runtime schema once its issue lands) using DB_URL or DATABASE_URL. */
#include <stdio.h>
#include <stdlib.h>

#include "cfg.h"
#include "dbpool.h"
#include "log.h"
#include "migrate.h"

int main(void)
{
    char conninfo[2048], dir[1024], err[512];
    int applied = 0;
    cfg *c = cfg_boot("runtime-migrate");

    if (!c)
        return 2;
    if (!cfg_str(c, "DATABASE_URL", NULL) && cfg_str(c, "DB_URL", NULL))
        setenv("DATABASE_URL", cfg_str(c, "DB_URL", ""), 1);
    dbpool_conninfo_from_cfg(c, conninfo, sizeof(conninfo));
    if (migrate_default_dir(dir, sizeof(dir)) < 0)
        cfg_error(c, "MIGRATIONS_DIR", cfg_str(c, "MIGRATIONS_DIR", ""), "a readable directory of migrations");
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    if (migrate_conninfo(conninfo, dir, &applied, err, sizeof(err)) < 0) {
        log_error("migration failed: %s", err);
        return 1;
    }
    printf(applied ? "applied %d migrations\n" : "up to date\n", applied);
    return 0;
}
