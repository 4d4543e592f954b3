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

/* ---------------------------------------------------------------- requests */

void h1_request_init(h1_head *r)
{
    memset(r, 0, sizeof(*r));
}

/* RFC 9110 5.6.2 tchar. */
static int h1_tchar(unsigned char c)
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
        return 1;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

static int rerr(h1_head *r, int status, const char *msg)
{
    r->status = status;
    snprintf(r->err, sizeof(r->err), "%s", msg);
    return H1_PARSE_ERROR;
}

static int name_is(const h1_field *f, const char *name, size_t n)
{
    return f->nlen == n && strncasecmp(f->name, name, n) == 0;
}

static int request_line(h1_head *r, const char *base, const char *s, size_t n)
{
    size_t i = 0, t;

    while (i < n && h1_tchar((unsigned char)s[i]))
        i++;
    if (i == 0 || i >= n || s[i] != ' ')
        return rerr(r, 400, "malformed request line");
    r->moff = (size_t)(s - base);
    r->mlen = i;
    t = ++i;
    while (i < n && (unsigned char)s[i] > 0x20 && (unsigned char)s[i] < 0x7f)
        i++;
    if (i == t || i >= n || s[i] != ' ')
        return rerr(r, 400, "malformed request target");
    r->toff = (size_t)(s - base) + t;
    r->tlen = i - t;
    i++;
    if (n - i != 8 || memcmp(s + i, "HTTP/", 5) || s[i + 5] < '0' || s[i + 5] > '9' || s[i + 6] != '.' ||
        s[i + 7] < '0' || s[i + 7] > '9')
        return rerr(r, 400, "malformed HTTP version");
    if (s[i + 5] != '1' || (s[i + 7] != '0' && s[i + 7] != '1'))
        return rerr(r, 505, "HTTP version not supported");
    r->minor = s[i + 7] - '0';
    r->line_done = 1;
    return 0;
}

static int field_line(h1_head *r, const char *base, const char *s, size_t n)
{
    size_t i = 0, b, e;
    h1_field *f;

    if (s[0] == ' ' || s[0] == '\t')
        return rerr(r, 400, "obsolete line folding");
    while (i < n && h1_tchar((unsigned char)s[i]))
        i++;
    if (i == 0 || i >= n || s[i] != ':')
        return rerr(r, 400, "malformed header field");
    if (r->nfields >= H1_REQ_FIELDS_MAX)
        return rerr(r, 431, "too many header fields");
    b = i + 1;
    e = n;
    while (b < e && (s[b] == ' ' || s[b] == '\t'))
        b++;
    while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t'))
        e--;
    for (size_t k = b; k < e; k++) {
        unsigned char c = (unsigned char)s[k];

        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return rerr(r, 400, "control character in a header value");
    }
    f = &r->fields[r->nfields++];
    /* Offsets until the head is complete: the caller's buffer may move
     * as it grows. */
    f->noff = (size_t)(s - base);
    f->nlen = i;
    f->voff = f->noff + b;
    f->vlen = e - b;
    f->name = s;
    f->value = s + b;
    if (name_is(f, "content-length", 14)) {
        unsigned long long len = 0;

        if (r->has_len)
            return rerr(r, 400, "more than one Content-Length");
        if (f->vlen == 0 || f->vlen > 18)
            return rerr(r, 400, "Content-Length is not a number");
        for (size_t k = 0; k < f->vlen; k++) {
            if (f->value[k] < '0' || f->value[k] > '9')
                return rerr(r, 400, "Content-Length is not a number");
            len = len * 10 + (unsigned)(f->value[k] - '0');
        }
        r->has_len = 1;
        r->content_length = len;
    } else if (name_is(f, "transfer-encoding", 17)) {
        if (r->chunked || f->vlen != 7 || strncasecmp(f->value, "chunked", 7) != 0)
            return rerr(r, 400, "Transfer-Encoding other than chunked");
        r->chunked = 1;
    } else if (name_is(f, "host", 4)) {
        r->hosts++;
    } else if (name_is(f, "connection", 10)) {
        r->conn_close |= has_token(f->value, f->vlen, "close");
        r->conn_keep_alive |= has_token(f->value, f->vlen, "keep-alive");
        r->conn_upgrade |= has_token(f->value, f->vlen, "upgrade");
    } else if (name_is(f, "upgrade", 7)) {
        r->upgrade = 1;
    } else if (name_is(f, "expect", 6)) {
        r->expect = 1;
    }
    return 0;
}

static int end_of_head(h1_head *r, const char *base, size_t end)
{
    r->method = base + r->moff;
    r->target = base + r->toff;
    for (int i = 0; i < r->nfields; i++) {
        r->fields[i].name = base + r->fields[i].noff;
        r->fields[i].value = base + r->fields[i].voff;
    }
    if (r->has_len && r->chunked)
        return rerr(r, 400, "Content-Length and Transfer-Encoding together");
    if (r->chunked && r->minor == 0)
        return rerr(r, 400, "Transfer-Encoding in HTTP/1.0");
    if (r->hosts > 1 || (r->minor == 1 && r->hosts == 0))
        return rerr(r, 400, r->hosts ? "more than one Host" : "no Host in an HTTP/1.1 request");
    r->head_len = end;
    return H1_PARSE_DONE;
}

/* The first byte of the line at `s` (`span` bytes of it here, its LF last
 * when `lf`) that is an error on its own, whatever follows: a CR not
 * followed by LF, a bare LF, the byte past H1_LINE_MAX, the byte past the
 * head's bound. The earliest wins, so the verdict does not depend on how
 * the bytes were split. (size_t)-1 when none. */
static size_t line_error(h1_head *r, const char *data, const char *s, size_t span, int lf, size_t max_head)
{
    size_t pos = (size_t)(s - data), at = (size_t)-1, i = 0;
    const char *cr;
    int status = 0;
    const char *msg = NULL;

    while ((cr = memchr(s + i, '\r', span - i)) != NULL) {
        i = (size_t)(cr - s) + 1;
        if (i < span && s[i] != '\n') {
            at = pos + i - 1;
            status = 400;
            msg = "CR without LF";
            break;
        }
    }
    if (lf && (span < 2 || s[span - 2] != '\r') && pos + span - 1 < at) {
        at = pos + span - 1;
        status = 400;
        msg = "bare LF";
    }
    if (span > H1_LINE_MAX && pos + H1_LINE_MAX < at) {
        at = pos + H1_LINE_MAX;
        status = 431;
        msg = "header line too long";
    }
    if (pos + span > max_head && max_head < at) {
        at = max_head;
        status = 431;
        msg = "request head too large";
    }
    if (msg)
        rerr(r, status, msg);
    return at;
}

int h1_request_parse(h1_head *r, const char *data, size_t n, size_t max_head)
{
    if (r->status)
        return H1_PARSE_ERROR;
    if (r->head_len)
        return H1_PARSE_DONE;
    while (r->pos < n) {
        const char *s = data + r->pos, *lf = memchr(s, '\n', n - r->pos);
        size_t span = lf ? (size_t)(lf - s) + 1 : n - r->pos, len;
        int rc;

        if (line_error(r, data, s, span, lf != NULL, max_head) != (size_t)-1)
            return H1_PARSE_ERROR;
        if (!lf)
            return H1_PARSE_MORE;
        len = span - 2;
        r->pos += span;
        if (!r->line_done) {
            if (len == 0)
                continue; /* RFC 9112 2.2: an empty line before the request line */
            rc = request_line(r, data, s, len);
        } else if (len == 0) {
            return end_of_head(r, data, r->pos);
        } else {
            rc = field_line(r, data, s, len);
        }
        if (rc < 0)
            return rc;
    }
    return H1_PARSE_MORE;
}

int h1_request_keep_alive(const h1_head *r)
{
    if (r->conn_close)
        return 0;
    return r->minor == 1 || r->conn_keep_alive;
}

const char *h1_request_field(const h1_head *r, const char *name, size_t *len)
{
    size_t n = strlen(name);

    for (int i = 0; i < r->nfields; i++)
        if (name_is(&r->fields[i], name, n)) {
            if (len)
                *len = r->fields[i].vlen;
            return r->fields[i].value;
        }
    return NULL;
}
