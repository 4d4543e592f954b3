/* deps: health checks for the platform's dependencies, in the shape
 * health_add() takes. Each runs on the health thread, which owns the
 * connection it is given (rconn and amqpc are not thread-safe; the pool
 * is). */
#ifndef AE_DEPS_H
#define AE_DEPS_H

typedef struct dbpool dbpool;

/* `ud` is a dbpool *. */
int deps_check_pg(void *ud);

/* The PostgreSQL check of a service that migrates on start: until one run
 * has applied the pending migrations (migrate_run on a pooled connection;
 * a failure is logged and the check fails), each run tries that first;
 * then it pings. */
typedef struct deps_pgmig deps_pgmig;

/* `db` is borrowed and must outlive the result; `migrations_dir` is
 * copied. NULL on OOM. Free with deps_pgmig_free (NULL is a no-op). */
deps_pgmig *deps_pgmig_new(dbpool *db, const char *migrations_dir);
void deps_pgmig_free(deps_pgmig *m);

/* `ud` is a deps_pgmig *. */
int deps_check_pg_migrate(void *ud);

/* Nonzero once the migrations were applied; any thread may ask. */
int deps_pgmig_done(const deps_pgmig *m);
/* `ud` is an rconn * used only by the health thread. */
int deps_check_redis(void *ud);
/* `ud` is an amqpc * used only by the health thread; connects when needed. */
int deps_check_amqp(void *ud);

#endif
