#include "deps.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "amqpc.h"
#include "dbpool.h"
#include "log.h"
#include "migrate.h"
#include "rconn.h"

struct deps_pgmig {
    dbpool *db;
    char *dir;
    atomic_int done;
};

int deps_check_pg(void *ud)
{
    return dbpool_ping(ud, 2000);
}

deps_pgmig *deps_pgmig_new(dbpool *db, const char *migrations_dir)
{
    deps_pgmig *m = calloc(1, sizeof(*m));

    if (!m || !(m->dir = strdup(migrations_dir))) {
        free(m);
        return NULL;
    }
    m->db = db;
    atomic_init(&m->done, 0);
    return m;
}

void deps_pgmig_free(deps_pgmig *m)
{
    if (!m)
        return;
    free(m->dir);
    free(m);
}

int deps_pgmig_done(const deps_pgmig *m)
{
    return atomic_load(&m->done);
}

int deps_check_pg_migrate(void *ud)
{
    deps_pgmig *m = ud;

    if (!atomic_load(&m->done)) {
        PGconn *conn = dbpool_acquire(m->db, 2000);
        char err[512];
        int rc, applied = 0;

        if (!conn)
            return -1;
        rc = migrate_run(conn, m->dir, &applied, err, sizeof(err));
        dbpool_release(m->db, conn);
        if (rc < 0) {
            log_error("migrations failed: %s", err);
            return -1;
        }
        if (applied)
            log_event(LOG_INFO, "migrations applied", "\"count\":%d", applied);
        atomic_store(&m->done, 1);
    }
    return dbpool_ping(m->db, 2000);
}

int deps_check_redis(void *ud)
{
    return rconn_ping(ud);
}

int deps_check_amqp(void *ud)
{
    amqpc *a = ud;

    if (!amqpc_is_connected(a) && amqpc_connect(a) < 0)
        return -1;
    return amqpc_ping(a);
}
