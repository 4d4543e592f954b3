/* The gateway proxy's header and path rules (api-gateway/pxhdr.c):
 * "<request headers>\n--\n<response head>\n--\n<path rest>".
 * The request headers ("Name: value" lines) become the upstream's: no
 * emitted line may hold CR or LF, name a hop-by-hop header or one the
 * client's Connection lists, and X-Forwarded-For and X-Request-Id come
 * once, ours. The response head is fed line by line as libcurl's header
 * callback gets it; what reaches the client is header fields only, none of
 * them hop-by-hop. A path rest that passes must hold no "." or ".."
 * segment once %2e, %2f, %5c and \ are decoded as an upstream might. */
#include <strings.h>

#include "buf.h"
#include "fuzz.h"
#include "pxhdr.h"

#define MAXH 64

typedef struct {
    char *name[MAXH], *value[MAXH];
    int n;
} hlist;

static void each(const void *src, pxhdr_visit visit, void *vud)
{
    const hlist *h = src;

    for (int i = 0; i < h->n; i++)
        visit(vud, h->name[i], h->value[i]);
}

static int name_is(const char *s, size_t n, const char *want)
{
    return strlen(want) == n && strncasecmp(s, want, n) == 0;
}

static int token(const char *s, size_t n)
{
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              (c && strchr("!#$%&'*+-.^_`|~", c))))
            return 0;
    }
    return 1;
}

typedef struct {
    const hlist *in;
    int xff, rid, expect, lines;
} req_check;

static int on_line(void *ud, const char *line)
{
    req_check *c = ud;
    size_t n = strcspn(line, ":;");

    c->lines++;
    if (strpbrk(line, "\r\n") || !line[n] || !token(line, n))
        abort();
    if (pxhdr_hop_by_hop(line, n) || name_is(line, n, "host") || name_is(line, n, "content-length"))
        abort();
    for (int i = 0; i < c->in->n; i++)
        if (!strcasecmp(c->in->name[i], "connection") && pxhdr_listed_in(c->in->value[i], line, n) &&
            !name_is(line, n, "expect") && !name_is(line, n, "accept") && !name_is(line, n, "x-forwarded-for") &&
            !name_is(line, n, "x-forwarded-host") && !name_is(line, n, "x-forwarded-proto") &&
            !name_is(line, n, "x-request-id"))
            abort();
    if (name_is(line, n, "x-forwarded-for")) {
        size_t len = strlen(line);

        if (c->xff++ || len < 9 || strcmp(line + len - 9, "127.0.0.1") != 0)
            abort();
    }
    if (name_is(line, n, "x-request-id") && (c->rid++ || strcmp(line, "X-Request-Id: rid-1") != 0))
        abort();
    if (name_is(line, n, "expect") && (c->expect++ || strcmp(line, "Expect:") != 0))
        abort();
    return c->lines > 200 ? -1 : 0; /* the -1 path: an append that failed */
}

static void on_pair(void *ud, const char *name, const char *value)
{
    size_t n = strlen(name);

    (void)ud;
    if (!token(name, n) || pxhdr_hop_by_hop(name, n) || name_is(name, n, "date") ||
        name_is(name, n, "x-request-id") || name_is(name, n, "content-length"))
        abort();
    for (const char *v = value; *v; v++)
        if (((unsigned char)*v < 0x20 && *v != '\t') || *v == 0x7f)
            abort();
}

static void request(const uint8_t *d, size_t size)
{
    pxhdr_req_info info = {"127.0.0.1", "rid-1", "http"};
    hlist h = {.n = 0};
    req_check c = {&h, 0, 0, 0, 0};
    char *all = fuzz_str(d, size), *p = all;
    int rc;

    if (!all)
        return;
    while (p && *p && h.n < MAXH) {
        char *nl = strchr(p, '\n'), *colon;

        if (nl)
            *nl = '\0';
        colon = strchr(p, ':');
        if (colon) {
            *colon = '\0';
            h.name[h.n] = p;
            for (p = colon + 1; *p == ' '; p++)
                ;
            h.value[h.n++] = p;
        }
        p = nl ? nl + 1 : NULL;
    }
    rc = pxhdr_request(each, &h, &info, on_line, &c);
    if (rc == 0 && (c.xff != 1 || c.rid != 1 || c.expect != 1))
        abort();
    if (rc != 0 && rc != -1 && rc != -2)
        abort();
    free(all);
}

static void response(const uint8_t *d, size_t size)
{
    buf kept;

    buf_init(&kept, 1 << 20);
    for (size_t off = 0; off < size;) {
        const uint8_t *nl = memchr(d + off, '\n', size - off);
        size_t n = nl ? (size_t)(nl - (d + off)) + 1 : size - off, keep = 0;
        long long num = 0;
        const char *line = (const char *)d + off;

        /* libcurl's buffer is not NUL-terminated: a copy of exactly n bytes
         * lets ASan catch a read past the line. */
        char *copy = malloc(n);

        if (!copy)
            break;
        memcpy(copy, line, n);
        switch (pxhdr_response_line(copy, n, &num, &keep)) {
        case PXHDR_STATUS:
            if (num < 100 || num > 599)
                abort();
            buf_reset(&kept);
            break;
        case PXHDR_LENGTH:
            if (num < -1)
                abort();
            break;
        case PXHDR_KEEP:
            if (keep > n || !memchr(copy, ':', keep))
                abort();
            buf_append(&kept, copy, keep);
            buf_append(&kept, "\n", 1);
            break;
        default:
            break;
        }
        free(copy);
        off += n;
    }
    pxhdr_response(kept.p ? kept.p : "", kept.len, on_pair, NULL);
    buf_free(&kept);
}

/* The oracle: decode what an upstream might, then look at the segments
 * after the first separator. */
static void path(const uint8_t *d, size_t size)
{
    char *s = fuzz_str(d, size), *dec;
    size_t j = 0;

    if (!s)
        return;
    dec = malloc(strlen(s) + 1);
    if (!dec) {
        free(s);
        return;
    }
    for (size_t i = 0; s[i] && s[i] != '?'; i++) {
        if (s[i] == '%' && s[i + 1] == '2' && (s[i + 2] == 'e' || s[i + 2] == 'E'))
            dec[j++] = '.', i += 2;
        else if (s[i] == '%' && s[i + 1] == '2' && (s[i + 2] == 'f' || s[i + 2] == 'F'))
            dec[j++] = '/', i += 2;
        else if (s[i] == '%' && s[i + 1] == '5' && (s[i + 2] == 'c' || s[i + 2] == 'C'))
            dec[j++] = '/', i += 2;
        else
            dec[j++] = s[i] == '\\' ? '/' : s[i];
    }
    dec[j] = '\0';
    if (!pxhdr_has_dot_segment(s)) {
        for (char *seg = strchr(dec, '/'); seg; seg = strchr(seg + 1, '/')) {
            size_t len = strcspn(seg + 1, "/");

            if ((len == 1 && seg[1] == '.') || (len == 2 && seg[1] == '.' && seg[2] == '.'))
                abort();
        }
    }
    free(dec);
    free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *b, *c;
    size_t bn, cn, an = fuzz_split(data, size, &b, &bn);

    bn = fuzz_split(b, bn, &c, &cn);
    request(data, an);
    response(b, bn);
    path(c, cn);
    return 0;
}
