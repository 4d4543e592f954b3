/* dbpool: a bounded, thread-safe pool of PostgreSQL connections over libpq.
 *
 * The pool never connects eagerly and never fails because the server is
 * down: connections are opened on demand. While the server is unreachable,
 * connect attempts follow one back-off shared by the whole pool (100 ms
 * doubling to 5 s), so callers fail fast instead of each hammering the
 * server, and the failure is logged once per back-off step. A connection
 * broken by a server restart is detected on release (PQstatus) or on the
 * next acquire and replaced, so after PostgreSQL comes back a caller needs
 * nothing more than one retry.
 *
 * Every connection is opened with connect_timeout=5, TCP keepalives and
 * application_name set to the program's name (program_invocation_short_name,
 * e.g. "api-gateway"); values given in the conninfo win over these. */
#ifndef AE_DBPOOL_H
#define AE_DBPOOL_H

#include <stddef.h>

#include <libpq-fe.h>

#include "cfg.h"

typedef struct dbpool dbpool;

/* Builds a libpq conninfo from DATABASE_URL when set (a postgres:// or
 * postgresql:// URI, or a keyword=value conninfo, checked with
 * PQconninfoParse; copied as is), else from DB_HOST (localhost), DB_PORT
 * (5432, 1..65535), DB_NAME (erc8004_backend), DB_USER and DB_PASSWORD
 * (both omitted when unset, leaving libpq's defaults) as keyword='value'
 * pairs with quotes and backslashes in values escaped. Bad values are
 * recorded in `c` with any password masked. Writes at most `outlen` bytes
 * (NUL included) into `out`. Returns 0, or -1 when a value was bad or the
 * result did not fit (out is then ""). */
int dbpool_conninfo_from_cfg(cfg *c, char *out, size_t outlen);

/* Creates a pool of at most `max_conns` (>= 1) connections for `conninfo`
 * (copied), and logs one "database" line naming it with secrets masked.
 * Reading DB_MAX_CONNECTIONS (default 10) is the caller's job.
 * Does not connect. Returns NULL only on OOM or bad arguments. Free with
 * dbpool_free. */
dbpool *dbpool_new(const char *conninfo, int max_conns);

/* Closes every connection and frees the pool. Every acquired connection
 * must have been released first. dbpool_free(NULL) is a no-op. */
void dbpool_free(dbpool *p);

/* Takes an idle healthy connection or opens a new one (below max_conns);
 * when all are in use, waits up to `timeout_ms` for one to be released
 * (timeout_ms <= 0: do not wait). While the pool is backing off after a
 * failed connect, returns NULL at once instead of connecting. Returns NULL
 * on timeout or when the server is unavailable, with the reason in
 * dbpool_errstr. The connection is the caller's alone until passed back
 * with dbpool_release; it must never be PQfinish'ed by the caller. */
PGconn *dbpool_acquire(dbpool *p, int timeout_ms);

/* Opens one connection outside any pool, with the pool's settings (5 s
 * connect timeout, TCP keepalives, tcp_user_timeout) and application_name
 * `name` (NULL: the program's name), for a connection a caller keeps to
 * itself (LISTEN, a pipeline). Returns NULL with the reason in `err`. The
 * caller owns the connection and PQfinish'es it. */
PGconn *dbpool_connect(const char *conninfo, const char *name, char *err, size_t errlen);

/* Gives a connection back. A connection whose PQstatus is bad is closed
 * and dropped; one left inside a transaction (or a failed one) is rolled
 * back, and closed when the ROLLBACK fails. Pending LISTENs are the
 * caller's business (use a dedicated connection for LISTEN). NULL is a
 * no-op. */
void dbpool_release(dbpool *p, PGconn *conn);

/* Runs a trivial query ("SELECT 1") on a pooled connection. Returns 0 when
 * the database answered, -1 otherwise (reason in dbpool_errstr). */
int dbpool_ping(dbpool *p, int timeout_ms);

/* Copies the last error into `buf` (thread-safe, always NUL-terminated,
 * "" when none) and returns `buf`. */
const char *dbpool_errstr(dbpool *p, char *buf, size_t len);

/* Counts for health checks and metrics: open connections, idle ones, and
 * callers waiting in dbpool_acquire. Any pointer may be NULL. */
void dbpool_stats(dbpool *p, int *total, int *idle, int *waiting);

/* Nonzero while the pool is backing off after a failed connect (the last
 * connect attempt failed and none has succeeded since). Cheap: no I/O, for
 * health routes that must not make a round trip per request. */
int dbpool_degraded(dbpool *p);

/* PQexecParams with `nparams` text parameters (NULL entries are SQL NULL).
 * Returns the result, which the caller frees with PQclear, when the status
 * is PGRES_COMMAND_OK or PGRES_TUPLES_OK; otherwise clears the result,
 * writes the reason into `err` (may be NULL) and returns NULL. The reason
 * starts with the five-character SQLSTATE and ": " ("23505: duplicate key
 * value ..."), so callers can test it with strncmp; a broken connection
 * gives "08006: ...". */
PGresult *dbpool_exec(PGconn *conn, const char *sql, int nparams, const char *const *params,
                      char *err, size_t errlen);

/* dbpool_exec that waits at most `timeout_ms` for the answer, for callers
 * that must not stall (an event loop): past it, returns NULL with
 * "57014: no answer within N ms"; the connection then still has the query
 * in flight, so dbpool_release closes it. */
PGresult *dbpool_exec_within(PGconn *conn, const char *sql, int nparams, const char *const *params, int timeout_ms,
                             char *err, size_t errlen);

/* dbpool_exec for a statement run often: prepared once per connection
 * under `name` (at most 63 bytes, one name per SQL text), then executed
 * without being parsed and planned again. A connection that does not know
 * the statement (new, or the server restarted) or whose plan went stale
 * prepares it again by itself. Same result and err as dbpool_exec. */
PGresult *dbpool_exec_prepared(PGconn *conn, const char *name, const char *sql, int nparams,
                               const char *const *params, char *err, size_t errlen);

#endif
