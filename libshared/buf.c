#include "buf.h"

#include <stdlib.h>
#include <string.h>

void buf_init(buf *b, size_t max)
{
    memset(b, 0, sizeof(*b));
    b->max = max ? max : 1024 * 1024;
}

int buf_append(buf *b, const void *data, size_t n)
{
    size_t room = b->max > b->len ? b->max - b->len : 0;

    if (n > room) {
        b->truncated += n - room;
        n = room;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        char *p;

        while (cap < b->len + n + 1)
            cap *= 2;
        p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

int buf_reserve(buf *b, size_t n)
{
    char *p;

    if (n > b->max)
        n = b->max;
    if (n + 1 <= b->cap)
        return 0;
    p = realloc(b->p, n + 1);
    if (!p)
        return -1;
    if (!b->p)
        p[0] = '\0';
    b->p = p;
    b->cap = n + 1;
    return 0;
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
