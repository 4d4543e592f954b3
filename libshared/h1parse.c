/* h1parse: see h1parse.h. */
#include "h1parse.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

enum {
    P_STATUS = 0, P_HEADERS, P_BODY, P_EOF_BODY, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_END, P_TRAILERS, P_DONE,
    P_ERROR
};

/* ---------------------------------------------------------------- parser */

void h1_parser_init(h1_parser *p, int head_only, buf *body, h1_header_fn on_header, void *ud)
{
    p->state = P_STATUS;
    p->head_only = head_only;
    p->status = 0;
    p->http10 = p->keep_alive = p->conn_close = p->chunked = p->has_len = 0;
    p->remaining = 0;
    p->hdr_bytes = 0;
    p->linelen = 0;
    p->body = body;
    p->on_header = on_header;
    p->ud = ud;
    p->err[0] = '\0';
}

static int perr(h1_parser *p, const char *msg)
{
    snprintf(p->err, sizeof(p->err), "%s", msg);
    p->state = P_ERROR;
    return H1_PARSE_ERROR;
}

static int body_add(h1_parser *p, const char *d, size_t n)
{
    if (p->body && n && buf_append(p->body, d, n) < 0)
        return perr(p, "out of memory");
    return 0;
}

/* Does the comma list `v` (length n) hold the token `tok`, as a whole
 * element (case-insensitive, optional white space around it, parameters
 * after ';' ignored)? "closed" or "keep-alive-ish" are other tokens. */
static int has_token(const char *v, size_t n, const char *tok)
{
    size_t tl = strlen(tok), i = 0;

    while (i < n) {
        size_t b, e;

        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        b = i;
        while (i < n && v[i] != ',' && v[i] != ';')
            i++;
        e = i;
        while (e > b && (v[e - 1] == ' ' || v[e - 1] == '\t'))
            e--;
        if (e - b == tl && !strncasecmp(v + b, tok, tl))
            return 1;
        while (i < n && v[i] != ',')
            i++;
    }
    return 0;
}

static int status_line(h1_parser *p, const char *s, size_t n)
{
    if (n < 12 || memcmp(s, "HTTP/1.", 7) || (s[7] != '0' && s[7] != '1') || s[8] != ' ' || s[9] < '1' ||
        s[9] > '5' || s[10] < '0' || s[10] > '9' || s[11] < '0' || s[11] > '9' || (n > 12 && s[12] != ' '))
        return perr(p, "bad status line");
    p->status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    p->http10 = s[7] == '0';
    p->keep_alive = p->conn_close = p->chunked = p->has_len = 0;
    p->state = P_HEADERS;
    return 0;
}

static int end_of_headers(h1_parser *p)
{
    if (p->status >= 100 && p->status < 200 && p->status != 101) {
        p->state = P_STATUS; /* an interim answer: the real one follows */
        return 0;
    }
    if (p->head_only || p->status == 204 || p->status == 304 || p->status == 101)
        p->state = P_DONE;
    else if (p->chunked)
        p->state = P_CHUNK_SIZE;
    else if (p->has_len)
        p->state = p->remaining ? P_BODY : P_DONE;
    else {
        p->state = P_EOF_BODY;
        p->conn_close = 1;
    }
    return 0;
}

static int header_line(h1_parser *p, const char *s, size_t n)
{
    const char *colon = memchr(s, ':', n), *v;
    size_t nl, vl;

    if (!colon || colon == s)
        return perr(p, "malformed header line");
    nl = (size_t)(colon - s);
    v = colon + 1;
    vl = n - nl - 1;
    while (vl && (*v == ' ' || *v == '\t')) {
        v++;
        vl--;
    }
    while (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
        vl--;
    if (nl == 14 && !strncasecmp(s, "content-length", 14)) {
        unsigned long long len = 0;

        if (!vl || vl > 18)
            return perr(p, "bad Content-Length");
        for (size_t i = 0; i < vl; i++) {
            if (v[i] < '0' || v[i] > '9')
                return perr(p, "bad Content-Length");
            len = len * 10 + (unsigned)(v[i] - '0');
        }
        if (p->has_len && p->remaining != len)
            return perr(p, "conflicting Content-Length");
        p->has_len = 1;
        p->remaining = len;
    } else if (nl == 17 && !strncasecmp(s, "transfer-encoding", 17)) {
        if (has_token(v, vl, "chunked"))
            p->chunked = 1;
    } else if (nl == 10 && !strncasecmp(s, "connection", 10)) {
        if (has_token(v, vl, "close"))
            p->conn_close = 1;
        if (has_token(v, vl, "keep-alive"))
            p->keep_alive = 1;
    }
    return 0;
}

static int chunk_size(h1_parser *p, const char *s, size_t n)
{
    unsigned long long v = 0;
    size_t i = 0;

    for (; i < n; i++) {
        int d;

        if (s[i] >= '0' && s[i] <= '9')
            d = s[i] - '0';
        else if (s[i] >= 'a' && s[i] <= 'f')
            d = s[i] - 'a' + 10;
        else if (s[i] >= 'A' && s[i] <= 'F')
            d = s[i] - 'A' + 10;
        else
            break;
        if (i >= 15)
            return perr(p, "chunk too large");
        v = v * 16 + (unsigned)d;
    }
    if (i == 0 || (i < n && s[i] != ';' && s[i] != ' ' && s[i] != '\t'))
        return perr(p, "bad chunk size");
    if (v == 0)
        p->state = P_TRAILERS;
    else {
        p->remaining = v;
        p->state = P_CHUNK_DATA;
    }
    return 0;
}

/* One complete line (with its LF) in p->line. */
static int one_line(h1_parser *p)
{
    size_t raw = p->linelen, n = raw;
    const char *s = p->line;

    p->linelen = 0;
    if (n && s[n - 1] == '\n')
        n--;
    if (n && s[n - 1] == '\r')
        n--;
    switch (p->state) {
    case P_STATUS:
        if (n == 0)
            return 0; /* tolerate a stray empty line before the status */
        return status_line(p, s, n);
    case P_HEADERS:
        if (n == 0)
            return end_of_headers(p);
        if (header_line(p, s, n) < 0)
            return H1_PARSE_ERROR;
        if (p->on_header)
            p->on_header(p->ud, s, raw);
        return 0;
    case P_CHUNK_SIZE:
        return chunk_size(p, s, n);
    case P_CHUNK_END:
        if (n)
            return perr(p, "bad chunk terminator");
        p->state = P_CHUNK_SIZE;
        return 0;
    case P_TRAILERS:
        if (n == 0)
            p->state = P_DONE;
        return 0;
    default:
        return perr(p, "parser misuse");
    }
}

int h1_parse(h1_parser *p, const char *d, size_t n, size_t *used)
{
    size_t i = 0;

    while (i < n && p->state != P_DONE) {
        if (p->state == P_ERROR)
            return H1_PARSE_ERROR;
        if (p->state == P_BODY || p->state == P_CHUNK_DATA) {
            size_t k = n - i;

            if ((unsigned long long)k > p->remaining)
                k = (size_t)p->remaining;
            if (body_add(p, d + i, k) < 0)
                return H1_PARSE_ERROR;
            i += k;
            p->remaining -= k;
            if (!p->remaining)
                p->state = p->state == P_BODY ? P_DONE : P_CHUNK_END;
            continue;
        }
        if (p->state == P_EOF_BODY) {
            if (body_add(p, d + i, n - i) < 0)
                return H1_PARSE_ERROR;
            i = n;
            continue;
        }
        {
            const char *nl = memchr(d + i, '\n', n - i);
            size_t k = nl ? (size_t)(nl - (d + i)) + 1 : n - i;
            int in_head = p->state == P_STATUS || p->state == P_HEADERS || p->state == P_TRAILERS;

            if (p->linelen + k > H1_LINE_MAX)
                return perr(p, in_head ? "header line too long" : "chunk line too long");
            if (in_head) {
                p->hdr_bytes += k;
                if (p->hdr_bytes > H1_HEADERS_MAX)
                    return perr(p, "headers too large");
            }
            memcpy(p->line + p->linelen, d + i, k);
            p->linelen += k;
            i += k;
            if (nl && one_line(p) < 0)
                return H1_PARSE_ERROR;
        }
    }
    *used = i;
    if (p->state == P_ERROR)
        return H1_PARSE_ERROR;
    return p->state == P_DONE ? H1_PARSE_DONE : H1_PARSE_MORE;
}

int h1_parse_eof(h1_parser *p)
{
    if (p->state == P_EOF_BODY || p->state == P_DONE) {
        p->state = P_DONE;
        return H1_PARSE_DONE;
    }
    return perr(p, "connection closed before the end of the response");
}

int h1_parse_in_body(const h1_parser *p)
{
    return p->state == P_BODY || p->state == P_CHUNK_DATA || p->state == P_CHUNK_SIZE || p->state == P_CHUNK_END ||
           p->state == P_TRAILERS || p->state == P_EOF_BODY;
}

int h1_parse_reusable(const h1_parser *p)
{
    if (p->state != P_DONE || p->conn_close || p->status == 101)
        return 0;
    return !p->http10 || p->keep_alive;
}

int h1_parse_head_done(const h1_parser *p)
{
    return h1_parse_in_body(p) || p->state == P_DONE;
}
