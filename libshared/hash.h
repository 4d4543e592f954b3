/* hash: FNV-1a (32 bits), the hash of the small in-process tables (the
 * breaker's hosts, the target cache, pooled connections, a push's
 * channels): fast on short keys, and not exposed to hash flooding since
 * the keys come from configuration and our own jobs. */
#ifndef AE_HASH_H
#define AE_HASH_H

#include <stddef.h>
#include <stdint.h>

/* The hash of n bytes at p. */
uint32_t hash_fnv1a(const void *p, size_t n);

/* The hash of a NUL-terminated string (its bytes before the NUL). */
uint32_t hash_fnv1a_str(const char *s);

#endif
