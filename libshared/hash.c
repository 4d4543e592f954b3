/* hash: see hash.h. */
#include "hash.h"

#define FNV_OFFSET 2166136261u
#define FNV_PRIME 16777619u

uint32_t hash_fnv1a(const void *p, size_t n)
{
    const unsigned char *s = p;
    uint32_t h = FNV_OFFSET;

    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * FNV_PRIME;
    return h;
}

uint32_t hash_fnv1a_str(const char *s)
{
    uint32_t h = FNV_OFFSET;

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * FNV_PRIME;
    return h;
}
