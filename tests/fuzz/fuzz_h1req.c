/* The strict HTTP/1.1 request-head parser (libshared/h1parse.c,
 * h1_request_parse), on a stream of pipelined heads: each head is parsed in
 * one call and again fed in pieces (sizes from the input's first byte, the
 * buffer moved between calls), and the two must agree on the verdict, the
 * status and the head's length. A head accepted ends with CRLF CRLF, holds
 * no bare LF, CR alone or NUL, and its spans lie inside it: method and
 * field names tokens, values without CR, LF or NUL. */
#include "fuzz.h"
#include "h1parse.h"

#define MAXH 16384

static int tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static void inside(const char *base, size_t len, const char *p, size_t n)
{
    if (p < base || p + n > base + len)
        abort();
}

static void check_done(const h1_head *r, const char *d, size_t n)
{
    if (r->head_len < 4 || r->head_len > n || r->head_len > MAXH || memcmp(d + r->head_len - 4, "\r\n\r\n", 4))
        abort();
    for (size_t i = 0; i < r->head_len; i++) {
        if (d[i] == '\0' || (d[i] == '\n' && (i == 0 || d[i - 1] != '\r')) ||
            (d[i] == '\r' && (i + 1 >= r->head_len || d[i + 1] != '\n')))
            abort();
    }
    inside(d, r->head_len, r->method, r->mlen);
    inside(d, r->head_len, r->target, r->tlen);
    if (!r->mlen || !r->tlen || (r->minor != 0 && r->minor != 1) || r->nfields > H1_REQ_FIELDS_MAX)
        abort();
    for (size_t i = 0; i < r->mlen; i++)
        if (!tchar((unsigned char)r->method[i]))
            abort();
    for (int f = 0; f < r->nfields; f++) {
        const h1_field *fl = &r->fields[f];

        inside(d, r->head_len, fl->name, fl->nlen);
        inside(d, r->head_len, fl->value, fl->vlen);
        if (!fl->nlen)
            abort();
        for (size_t i = 0; i < fl->nlen; i++)
            if (!tchar((unsigned char)fl->name[i]))
                abort();
        if (memchr(fl->value, '\r', fl->vlen) || memchr(fl->value, '\n', fl->vlen) ||
            memchr(fl->value, '\0', fl->vlen))
            abort();
    }
    if ((r->has_len && r->chunked) || (r->minor == 1 && r->hosts != 1))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t step, off = 1;

    if (size < 1)
        return 0;
    step = (size_t)(data[0] & 0x1f) + 1;
    while (off < size) {
        const char *d = (const char *)data + off;
        size_t n = size - off, k = 0;
        h1_head whole, piece;
        int rw, rp = H1_PARSE_MORE;
        char *cur = NULL;

        h1_request_init(&whole);
        rw = h1_request_parse(&whole, d, n, MAXH);
        h1_request_init(&piece);
        while (rp == H1_PARSE_MORE && k < n) {
            char *copy;

            k = n - k < step ? n : k + step;
            copy = malloc(k);
            if (!copy)
                abort();
            memcpy(copy, d, k);
            free(cur);
            cur = copy;
            rp = h1_request_parse(&piece, cur, k, MAXH);
        }
        if (rp != rw || piece.status != whole.status || piece.head_len != whole.head_len)
            abort();
        if (rw == H1_PARSE_DONE) {
            check_done(&piece, cur, k);
            check_done(&whole, d, n);
            (void)h1_request_keep_alive(&whole);
            (void)h1_request_field(&whole, "host", NULL);
        } else if (rw == H1_PARSE_ERROR && whole.status != 400 && whole.status != 431 && whole.status != 505) {
            abort();
        }
        free(cur);
        if (rw != H1_PARSE_DONE)
            break;
        off += whole.head_len;
    }
    return 0;
}
