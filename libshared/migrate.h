/* migrate: applies database/migrations/NNNN_name.sql in order.
 *
 * Each pending file runs in its own transaction (BEGIN, the file's SQL sent
 * with PQexec so that it may hold several statements, the row in
 * schema_migrations, COMMIT), recorded in
 * schema_migrations(version int pk, name, checksum = sha256 hex of the
 * file's bytes, applied_at timestamptz). A failing file is rolled back
 * whole and nothing after it runs.
 *
 * A session advisory lock, pg_advisory_lock(MIGRATE_LOCK_KEY), is held for
 * the whole run, so services that start together do not race: the second
 * waits (logging that it waits), then finds nothing to do.
 *
 * A run refuses to apply anything when an applied file changed (checksum)
 * or disappeared, when a file name is not NNNN_name.sql, when two files
 * share a version, or when a file is not a regular file, is larger than
 * MIGRATE_MAX_FILE or holds a NUL byte. A pending file whose version is
 * below an applied one (a branch merged late) is applied, with a warning.
 *
 * Rules for migration files: no BEGIN/COMMIT of their own (a file that ends
 * the transaction is reported as an error), nothing that cannot run inside
 * a transaction (CREATE INDEX CONCURRENTLY, VACUUM), and SET LOCAL rather
 * than SET: services run migrations on a pooled connection that they keep.
 * Notices the SQL raises (RAISE NOTICE, "already exists, skipping") are
 * logged with the file's name, one log line each. */
#ifndef AE_MIGRATE_H
#define AE_MIGRATE_H

#include <stddef.h>

#include <libpq-fe.h>

/* pg_advisory_lock key: "ae-migr" in ASCII (27413986278893426). The
 * event-processor's batch lock (8004000002) is a different key. */
#define MIGRATE_LOCK_KEY 0x61652d6d696772LL

/* Largest migration file read, in bytes. */
#define MIGRATE_MAX_FILE (4 * 1024 * 1024)

/* Most migration files in one directory. */
#define MIGRATE_MAX_FILES 512

typedef struct {
    int version;
    char name[200];     /* file name, e.g. 0001_erc8004.sql */
    char checksum[65];  /* sha256 hex of the file's bytes */
} migrate_file;

/* Applies pending migrations from `dir` on `conn`, which must be idle (not
 * inside a transaction). The connection is left idle, unlocked and with
 * its notice receiver restored (the previous receiver gets a NULL argument
 * back, which is what libpq's default receiver expects). *applied (may be
 * NULL) gets the number applied, also when a later file failed. Logs one
 * line per applied file. Returns 0, or -1 with a one-line reason in err
 * (bounded by errlen). */
int migrate_run(PGconn *conn, const char *dir, int *applied, char *err, size_t errlen);

/* Connects with `conninfo` (URI or keyword=value; connect_timeout 10 s and
 * application_name "migrate" unless it says otherwise), runs migrate_run,
 * disconnects. Same return and err as migrate_run. */
int migrate_conninfo(const char *conninfo, const char *dir, int *applied, char *err, size_t errlen);

/* Writes into out: MIGRATIONS_DIR when set; else
 * <directory of /proc/self/exe>/../database/migrations (or ../../, for
 * build-san/bin) when it is a directory; else ./database/migrations.
 * Returns 0, or -1 when the chosen path is not a directory (out still
 * holds it, for the error message). */
int migrate_default_dir(char *out, size_t outlen);

/* Lists `dir`'s migrations sorted by version into files (at most max), with
 * their checksums. Files whose names do not end in ".sql" and hidden files
 * are ignored. Returns the count, or -1 with err (bad name, duplicate
 * version, too many, unreadable or oversized file). */
int migrate_scan(const char *dir, migrate_file *files, int max, char *err, size_t errlen);

/* Parses a migration file name: at least four digits, '_', one or more of
 * [A-Za-z0-9_-], ".sql" ("0012_add_x.sql" -> 12). Returns the version
 * (1..999999999), or -1 when the name is not of that form. */
int migrate_parse_name(const char *name);

/* SHA-256 of `len` bytes as 64 lower-case hex digits plus NUL into hex. */
void migrate_sha256_hex(const void *data, size_t len, char hex[65]);

/* Prints one line per migration ("applied  NAME" or "pending  NAME") to
 * stdout, for `migrate --status`. Takes no lock and changes nothing.
 * Returns 0, or -1 with err when a run would refuse. */
int migrate_status(PGconn *conn, const char *dir, char *err, size_t errlen);

#endif
