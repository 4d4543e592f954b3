/* hash: FNV-1a (32 bits), the hash of the in-process tables (the breaker's
 * hosts, the target cache, pooled connections, a push's channels, the
 * trigger index, metric series, rate-limit buckets): fast on short keys.
 * It is not keyed: a table whose keys a client chooses (rate-limit keys)
 * bounds its chains or its size itself. */
#ifndef AE_HASH_H
#define AE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* The hash of nothing: where hash_fnv1a_add starts. */
#define HASH_FNV1A_INIT 2166136261u

/* Continues hash h over n bytes at p, for a key in several pieces:
 * hash_fnv1a_add(hash_fnv1a_add(HASH_FNV1A_INIT, a, na), b, nb) is the
 * hash of a and b back to back. */
uint32_t hash_fnv1a_add(uint32_t h, const void *p, size_t n);

/* The hash of n bytes at p. */
uint32_t hash_fnv1a(const void *p, size_t n);

/* The hash of a NUL-terminated string (its bytes before the NUL). */
uint32_t hash_fnv1a_str(const char *s);

/* The hash of a NUL-terminated string with ASCII letters folded to lower
 * case, for keys that compare with strcasecmp (run ids, header names):
 * "AB" and "ab" hash alike. */
uint32_t hash_fnv1a_str_ci(const char *s);

#endif
