/* jsonstr: see jsonstr.h. */
#include "jsonstr.h"

#include <stdlib.h>
#include <string.h>

#include "buf.h"

/* Writes the escape of c into out and returns its length, or 0 when c
 * stands for itself. */
static size_t esc1(unsigned char c, char *out)
{
    static const char hex[] = "0123456789abcdef";
    char s = 0;

    if (c >= 0x20 && c != '"' && c != '\\' && c != 0x7f)
        return 0;
    switch (c) {
    case '"': s = '"'; break;
    case '\\': s = '\\'; break;
    case '\b': s = 'b'; break;
    case '\f': s = 'f'; break;
    case '\n': s = 'n'; break;
    case '\r': s = 'r'; break;
    case '\t': s = 't'; break;
    default: break;
    }
    out[0] = '\\';
    if (s) {
        out[1] = s;
        return 2;
    }
    memcpy(out + 1, "u00", 3);
    out[4] = hex[c >> 4];
    out[5] = hex[c & 15];
    return 6;
}

int jsonstr_append(buf *b, const char *s, size_t n)
{
    const char *run = s, *end = s + n;

    /* Runs of plain bytes are copied at once: most text has no escapes. */
    for (; s < end; s++) {
        char esc[JSONSTR_ESC_MAX];
        size_t k = esc1((unsigned char)*s, esc);

        if (!k)
            continue;
        if (buf_append(b, run, (size_t)(s - run)) < 0 || buf_append(b, esc, k) < 0)
            return -1;
        run = s + 1;
    }
    return buf_append(b, run, (size_t)(end - run));
}

int jsonstr_puts(buf *b, const char *s)
{
    s = s ? s : "";
    return jsonstr_append(b, s, strlen(s));
}

char *jsonstr_dup(const char *s)
{
    char esc[JSONSTR_ESC_MAX];
    size_t n = 0, o = 0;
    char *out;

    s = s ? s : "";
    for (const char *p = s; *p; p++) {
        size_t k = esc1((unsigned char)*p, esc);

        n += k ? k : 1;
    }
    if (!(out = malloc(n + 1)))
        return NULL;
    for (const char *p = s; *p; p++) {
        size_t k = esc1((unsigned char)*p, out + o);

        if (!k)
            out[o++] = *p;
        else
            o += k;
    }
    out[o] = '\0';
    return out;
}

char *jsonstr_into(char *dst, size_t dstlen, const char *s)
{
    size_t o = 0;

    if (dstlen == 0)
        return dst;
    for (s = s ? s : ""; *s; s++) {
        char esc[JSONSTR_ESC_MAX];
        size_t k = esc1((unsigned char)*s, esc);

        if (!k) {
            esc[0] = *s;
            k = 1;
        }
        if (o + k >= dstlen)
            break;
        memcpy(dst + o, esc, k);
        o += k;
    }
    dst[o] = '\0';
    return dst;
}
