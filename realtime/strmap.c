/* strmap: see strmap.h. */
#include "strmap.h"

#include "hash.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

typedef struct strmap_ent {
    struct strmap_ent *next;
    void *val;
    uint32_t hash;
    size_t len;
    char key[];
} strmap_ent;

struct strmap {
    strmap_ent **b;
    size_t nb, n;
    uint32_t seed;
};

/* FNV-1a over the per-process seed, then the key. */
static uint32_t strmap_hash(const strmap *m, const char *k, size_t n)
{
    return hash_fnv1a_add(hash_fnv1a_add(HASH_FNV1A_INIT, &m->seed, sizeof(m->seed)), k, n);
}

strmap *strmap_new(void)
{
    return strmap_new_sized(64);
}

strmap *strmap_new_sized(size_t buckets)
{
    strmap *m = calloc(1, sizeof(*m));

    if (!m)
        return NULL;
    m->nb = buckets < 2 ? 2 : buckets;
    m->b = calloc(m->nb, sizeof(*m->b));
    if (!m->b) {
        free(m);
        return NULL;
    }
    if (getrandom(&m->seed, sizeof(m->seed), 0) != (ssize_t)sizeof(m->seed))
        m->seed = (uint32_t)(uintptr_t)m;
    return m;
}

void strmap_free(strmap *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->nb; i++)
        while (m->b[i]) {
            strmap_ent *e = m->b[i];

            m->b[i] = e->next;
            free(e);
        }
    free(m->b);
    free(m);
}

static strmap_ent **strmap_slot(const strmap *m, const char *key, size_t len, uint32_t h)
{
    strmap_ent **p = &m->b[h & (m->nb - 1)];

    while (*p && !((*p)->hash == h && (*p)->len == len && memcmp((*p)->key, key, len) == 0))
        p = &(*p)->next;
    return p;
}

void *strmap_get(const strmap *m, const char *key, size_t len)
{
    strmap_ent *e = *strmap_slot(m, key, len, strmap_hash(m, key, len));

    return e ? e->val : NULL;
}

const char *strmap_key(const strmap *m, const char *key, size_t len)
{
    strmap_ent *e = *strmap_slot(m, key, len, strmap_hash(m, key, len));

    return e ? e->key : NULL;
}

static void strmap_grow(strmap *m)
{
    size_t nb = m->nb * 2;
    strmap_ent **b = calloc(nb, sizeof(*b));

    if (!b)
        return;
    for (size_t i = 0; i < m->nb; i++)
        while (m->b[i]) {
            strmap_ent *e = m->b[i];

            m->b[i] = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
        }
    free(m->b);
    m->b = b;
    m->nb = nb;
}

int strmap_put(strmap *m, const char *key, size_t len, void *val)
{
    uint32_t h = strmap_hash(m, key, len);
    strmap_ent **p = strmap_slot(m, key, len, h), *e;

    if (*p) {
        (*p)->val = val;
        return 0;
    }
    e = malloc(sizeof(*e) + len + 1);
    if (!e)
        return -1;
    e->next = NULL;
    e->val = val;
    e->hash = h;
    e->len = len;
    memcpy(e->key, key, len);
    e->key[len] = '\0';
    *p = e;
    if (++m->n > m->nb)
        strmap_grow(m);
    return 0;
}

void *strmap_del(strmap *m, const char *key, size_t len)
{
    strmap_ent **p = strmap_slot(m, key, len, strmap_hash(m, key, len)), *e = *p;
    void *v;

    if (!e)
        return NULL;
    *p = e->next;
    v = e->val;
    free(e);
    m->n--;
    return v;
}

size_t strmap_count(const strmap *m) { return m->n; }
