/* pgarr: see pgarr.h. */
#include "pgarr.h"

#include <string.h>

#include "buf.h"

static int put_text(buf *b, const char *s, size_t n, unsigned flags)
{
    return flags & PGARR_UTF8 ? buf_append_utf8(b, s, n) : buf_append(b, s, n);
}

int pgarr_add(buf *b, const char *s, unsigned flags)
{
    const char *p;

    if (b->len && b->p[b->len - 1] != '{' && buf_append(b, ",", 1) < 0)
        return -1;
    if (!s)
        return buf_append(b, "NULL", 4);
    if (buf_append(b, "\"", 1) < 0)
        return -1;
    while ((p = strpbrk(s, "\"\\"))) {
        char esc[2] = {'\\', *p};

        if (put_text(b, s, (size_t)(p - s), flags) < 0 || buf_append(b, esc, 2) < 0)
            return -1;
        s = p + 1;
    }
    return put_text(b, s, strlen(s), flags) < 0 || buf_append(b, "\"", 1) < 0 ? -1 : 0;
}
