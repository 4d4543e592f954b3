#include "buf.h"

#include <stdlib.h>
#include <string.h>

void buf_init(buf *b, size_t max)
{
    memset(b, 0, sizeof(*b));
    b->max = max ? max : 1024 * 1024;
}

/* Grows the capacity to hold `need` bytes and the NUL (need <= max),
 * at least doubling it. */
static int grow(buf *b, size_t need)
{
    size_t cap = b->cap ? b->cap : 256;
    char *p;

    if (need + 1 <= b->cap)
        return 0;
    while (cap < need + 1)
        cap *= 2;
    if (cap > b->max + 1)
        cap = b->max + 1;
    p = realloc(b->p, cap);
    if (!p)
        return -1;
    if (!b->p)
        p[0] = '\0';
    b->p = p;
    b->cap = cap;
    return 0;
}

int buf_append(buf *b, const void *data, size_t n)
{
    size_t room = b->max > b->len ? b->max - b->len : 0;

    if (n > room) {
        b->truncated += n - room;
        n = room;
    }
    if (grow(b, b->len + n) < 0)
        return -1;
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

int buf_append_all_grow(buf *b, const void *data, size_t n)
{
    char *w = buf_extend(b, n);

    if (!w)
        return -1;
    if (n)
        memcpy(w, data, n);
    return 0;
}

char *buf_extend(buf *b, size_t n)
{
    char *w;

    if (n > b->max || b->len > b->max - n || grow(b, b->len + n) < 0)
        return NULL;
    w = b->p + b->len;
    b->len += n;
    b->p[b->len] = '\0';
    return w;
}

int buf_reserve(buf *b, size_t n)
{
    return grow(b, n > b->max ? b->max : n);
}

int buf_puts(buf *b, const char *s)
{
    return buf_append(b, s, strlen(s));
}

void buf_reset(buf *b)
{
    b->len = 0;
    b->truncated = 0;
    if (b->p)
        b->p[0] = '\0';
}

void buf_free(buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
    b->truncated = 0;
}

char *buf_take(buf *b)
{
    char *p;

    if (!b->p && buf_append(b, "", 0) < 0)
        return NULL;
    p = b->p;
    b->p = NULL;
    b->len = b->cap = 0;
    b->truncated = 0;
    return p;
}

const char *buf_str(const buf *b)
{
    return b->p ? b->p : "";
}

/* The length of the well-formed UTF-8 sequence at s (n > 0 bytes left),
 * or 0 with *bad set to the length of its longest invalid prefix (>= 1). */
static size_t utf8_seq(const unsigned char *s, size_t n, size_t *bad)
{
    unsigned lo = 0x80, hi = 0xBF;
    size_t need;

    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF) {
        need = 1;
    } else if (s[0] >= 0xE0 && s[0] <= 0xEF) {
        need = 2;
        lo = s[0] == 0xE0 ? 0xA0 : 0x80; /* no overlong forms */
        hi = s[0] == 0xED ? 0x9F : 0xBF; /* no surrogates */
    } else if (s[0] >= 0xF0 && s[0] <= 0xF4) {
        need = 3;
        lo = s[0] == 0xF0 ? 0x90 : 0x80;
        hi = s[0] == 0xF4 ? 0x8F : 0xBF; /* nothing past U+10FFFF */
    } else {
        *bad = 1;
        return 0;
    }
    for (size_t k = 1; k <= need; k++) {
        if (k >= n || s[k] < lo || s[k] > hi) {
            *bad = k;
            return 0;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    return need + 1;
}

size_t buf_utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    size_t bad = 0, k;

    while (p < end) {
        if (*p < 0x80) {
            p++;
            continue;
        }
        if (!(k = utf8_seq(p, (size_t)(end - p), &bad)))
            break;
        p += k;
    }
    return (size_t)(p - (const unsigned char *)s);
}

int buf_append_utf8(buf *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s, *end = p + n, *run = p;

    while (p < end) {
        size_t bad = 0, k;

        if (*p < 0x80) {
            p++;
            continue;
        }
        k = utf8_seq(p, (size_t)(end - p), &bad);
        if (k) {
            p += k;
            continue;
        }
        if (buf_append(b, run, (size_t)(p - run)) < 0 || buf_append(b, "\xEF\xBF\xBD", 3) < 0)
            return -1;
        p += bad;
        run = p;
    }
    return buf_append(b, run, (size_t)(p - run));
}
