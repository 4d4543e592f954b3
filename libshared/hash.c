/* hash: see hash.h. */
#include "hash.h"

#include <ctype.h>

#define FNV_PRIME 16777619u

uint32_t hash_fnv1a_add(uint32_t h, const void *p, size_t n)
{
    const unsigned char *s = p;

    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * FNV_PRIME;
    return h;
}

uint32_t hash_fnv1a(const void *p, size_t n)
{
    return hash_fnv1a_add(HASH_FNV1A_INIT, p, n);
}

uint32_t hash_fnv1a_str(const char *s)
{
    uint32_t h = HASH_FNV1A_INIT;

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * FNV_PRIME;
    return h;
}

uint32_t hash_fnv1a_str_ci(const char *s)
{
    uint32_t h = HASH_FNV1A_INIT;

    for (; *s; s++)
        h = (h ^ (unsigned char)tolower((unsigned char)*s)) * FNV_PRIME;
    return h;
}
