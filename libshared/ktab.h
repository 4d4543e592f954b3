/* ktab: a bounded, thread-safe table of small fixed-size records keyed by
 * strings (per-user, per-account state in a server's memory).
 *
 * The table is split in shards, each a chained hash table under its own
 * mutex. Every record is worked on inside a callback run with its shard
 * locked, so a read-modify-write of a record is atomic. A shard holds at
 * most cap/KTAB_SHARDS records: adding one to a full shard first drops its
 * least recently touched record. Keys are hashed with FNV-1a, which is not
 * keyed: tables whose keys clients choose freely should hold little per
 * key and rely on the bound. */
#ifndef AE_KTAB_H
#define AE_KTAB_H

#include <stddef.h>

#define KTAB_SHARDS 32

typedef struct ktab ktab;

/* Records of `value_size` bytes, at most `cap` (>= KTAB_SHARDS) of them.
 * NULL on OOM or bad arguments. Free with ktab_free. */
ktab *ktab_new(size_t value_size, long cap);
void ktab_free(ktab *t);

/* Called with the record's shard locked; `value` is the record (zeroed when
 * `created`). Returns KTAB_KEEP, or KTAB_REMOVE to drop the record. */
typedef int (*ktab_fn)(void *value, int created, void *arg);
enum { KTAB_KEEP = 0, KTAB_REMOVE = 1 };

/* Runs fn on the record of `key`, creating it when absent and `create` is
 * set; `now_ms` marks it touched. Returns 1 when fn ran, 0 when the record
 * is absent (and not created), -1 on OOM. */
int ktab_with(ktab *t, const char *key, int create, long long now_ms, ktab_fn fn, void *arg);

/* Drops the record of `key` (if any). */
void ktab_remove(ktab *t, const char *key);

/* Drops every record. */
void ktab_clear(ktab *t);

/* Number of records held. */
long ktab_size(ktab *t);

#endif
