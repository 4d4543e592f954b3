/* migrate: applies database/migrations/NNNN_name.sql in order.
 *
 * Each pending file runs in its own transaction together with its row in
 * schema_migrations(version, name, checksum, applied_at). A session advisory
 * lock (MIGRATE_LOCK_KEY) is held for the whole run, so services that start
 * together do not race: the second waits, then finds nothing to do. A run
 * refuses to apply anything when an applied file changed (SHA-256 checksum)
 * or disappeared, or when file names are malformed or versions repeat. */
#ifndef AE_MIGRATE_H
#define AE_MIGRATE_H

#include <stddef.h>

#include <libpq-fe.h>

/* pg_advisory_lock key: "ae-migr" in ASCII. */
#define MIGRATE_LOCK_KEY 0x61652d6d696772LL

/* Largest migration file read. */
#define MIGRATE_MAX_FILE (4 * 1024 * 1024)

typedef struct {
    int version;
    char name[200];     /* file name, e.g. 0001_erc8004.sql */
    char checksum[65];  /* sha256 hex */
} migrate_file;

/* Applies pending migrations from `dir` on `conn`. *applied (may be NULL)
 * gets the number applied. Returns 0, or -1 with the reason in err. */
int migrate_run(PGconn *conn, const char *dir, int *applied, char *err, size_t errlen);

/* Connects with `conninfo`, runs migrate_run, disconnects. */
int migrate_conninfo(const char *conninfo, const char *dir, int *applied, char *err, size_t errlen);

/* MIGRATIONS_DIR when set, else <directory of this program>/../database/migrations
 * when it exists, else ./database/migrations. Returns 0, or -1 when none
 * of them is a directory. */
int migrate_default_dir(char *out, size_t outlen);

/* Lists `dir`'s migrations sorted by version into files (at most max).
 * Returns the count, or -1 with err (bad name, duplicate version, too many,
 * unreadable file). Checksums are filled in. */
int migrate_scan(const char *dir, migrate_file *files, int max, char *err, size_t errlen);

/* Parses a migration file name ("0012_add_x.sql" -> 12). Returns the
 * version, or -1 when the name is not NNNN_name.sql. */
int migrate_parse_name(const char *name);

/* SHA-256 of `len` bytes as 64 hex digits plus NUL into hex[65]. */
void migrate_sha256_hex(const void *data, size_t len, char hex[65]);

/* Prints applied and pending migrations (for `migrate --status`). */
int migrate_status(PGconn *conn, const char *dir, char *err, size_t errlen);

#endif
