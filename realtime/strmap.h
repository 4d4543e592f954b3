/* strmap: a string-keyed hash table of pointers (chained, doubling), for
 * the realtime loop's topics, rooms and users. Keys are copied; values are
 * the caller's. Not thread-safe (one loop owns each map).
 *
 * The hash is FNV-1a seeded per process with random bytes, so clients that
 * choose topic names cannot aim for one chain without knowing the seed. */
#ifndef RT_STRMAP_H
#define RT_STRMAP_H

#include <stddef.h>

typedef struct strmap strmap;

/* NULL on OOM. Free with strmap_free (values are not freed). */
strmap *strmap_new(void);
/* The same with `buckets` (a power of two, at least 2) to begin with, for
 * the many small maps (a user's rooms). */
strmap *strmap_new_sized(size_t buckets);
void strmap_free(strmap *m);

/* The value for the key, or NULL. */
void *strmap_get(const strmap *m, const char *key, size_t len);
/* Sets (or replaces) the value. Returns 0 or -1 (OOM). */
int strmap_put(strmap *m, const char *key, size_t len, void *val);
/* Removes the key; returns its value or NULL. */
void *strmap_del(strmap *m, const char *key, size_t len);
size_t strmap_count(const strmap *m);
/* The map's own copy of the key stored for `key` (NUL-terminated), or NULL;
 * valid until the key is removed. */
const char *strmap_key(const strmap *m, const char *key, size_t len);

#endif
