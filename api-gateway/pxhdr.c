#include "pxhdr.h"

#include <string.h>
#include <strings.h>

#define PXHDR_MAX_CONN 16 /* Connection headers honoured (of one request or response) */

static int hdr_is(const char *name, size_t n, const char *want)
{
    return strlen(want) == n && strncasecmp(name, want, n) == 0;
}

/* RFC 9110 5.6.2 tchar. */
static int is_tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int is_token(const char *s, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)s[i]))
            return 0;
    return 1;
}

int pxhdr_hop_by_hop(const char *name, size_t n)
{
    static const char *const hop[] = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                                      "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                                      NULL};

    for (int i = 0; hop[i]; i++)
        if (hdr_is(name, n, hop[i]))
            return 1;
    return 0;
}

static int listed_n(const char *v, size_t vlen, const char *name, size_t n)
{
    const char *p = v, *end = v + vlen;

    while (p < end) {
        size_t len = 0;

        while (p < end && (*p == ' ' || *p == '\t' || *p == ','))
            p++;
        while (p + len < end && p[len] != ',' && p[len] != ' ' && p[len] != '\t')
            len++;
        if (len && len == n && strncasecmp(p, name, n) == 0)
            return 1;
        p += len;
    }
    return 0;
}

int pxhdr_listed_in(const char *conn_value, const char *name, size_t n)
{
    return conn_value && listed_n(conn_value, strlen(conn_value), name, n);
}

/* ---- request ---------------------------------------------------------- */

typedef struct {
    const char *conn[PXHDR_MAX_CONN];
    int nconn;
    const char *host;
    int has_accept;
    char xff[PXHDR_LINE_MAX]; /* "X-Forwarded-For: a, b" so far */
    size_t xff_len;
    int too_long;
    pxhdr_line_fn emit;
    void *ud;
    int rc;
} req_state;

static int req_dropped(const req_state *s, const char *name, size_t n)
{
    if (pxhdr_hop_by_hop(name, n) || hdr_is(name, n, "host") || hdr_is(name, n, "content-length") ||
        hdr_is(name, n, "expect") || hdr_is(name, n, "x-forwarded-for") || hdr_is(name, n, "x-forwarded-host") ||
        hdr_is(name, n, "x-forwarded-proto") || hdr_is(name, n, "x-request-id"))
        return 1;
    for (int i = 0; i < s->nconn; i++)
        if (pxhdr_listed_in(s->conn[i], name, n))
            return 1;
    return 0;
}

/* Appends n bytes to the line being built in buf (*len so far). */
static int put(char *buf, size_t *len, const char *s, size_t n)
{
    if (*len + n >= PXHDR_LINE_MAX)
        return -1;
    memcpy(buf + *len, s, n);
    *len += n;
    buf[*len] = '\0';
    return 0;
}

static void req_scan(void *vud, const char *name, const char *value)
{
    req_state *s = vud;
    size_t n = strlen(name);

    if (hdr_is(name, n, "connection")) {
        if (s->nconn < PXHDR_MAX_CONN)
            s->conn[s->nconn++] = value;
        else
            s->too_long = 1; /* a name it lists would be passed on */
    } else if (hdr_is(name, n, "host")) {
        if (!s->host)
            s->host = value;
    } else if (hdr_is(name, n, "x-forwarded-for") && *value && !strpbrk(value, "\r\n")) {
        /* Several X-Forwarded-For headers are one list (RFC 9110 5.3). */
        if ((s->xff_len == 0 ? put(s->xff, &s->xff_len, "X-Forwarded-For: ", 17)
                             : put(s->xff, &s->xff_len, ", ", 2)) < 0 ||
            put(s->xff, &s->xff_len, value, strlen(value)) < 0)
            s->too_long = 1;
    }
}

static void req_emit(void *vud, const char *name, const char *value)
{
    req_state *s = vud;
    size_t n = strlen(name), len = 0;
    char line[PXHDR_LINE_MAX];

    if (s->rc || !is_token(name, n) || strpbrk(value, "\r\n") || req_dropped(s, name, n))
        return;
    if (hdr_is(name, n, "accept"))
        s->has_accept = 1;
    if (put(line, &len, name, n) < 0 ||
        (*value ? put(line, &len, ": ", 2) < 0 || put(line, &len, value, strlen(value)) < 0
                : put(line, &len, ";", 1) < 0)) {
        s->rc = -2;
        return;
    }
    if (s->emit(s->ud, line) < 0)
        s->rc = -1;
}

/* Emits "name: a b" (a and b appended as they are). */
static int emit2(req_state *s, const char *name, const char *a, const char *b)
{
    char line[PXHDR_LINE_MAX];
    size_t len = 0;

    if (put(line, &len, name, strlen(name)) < 0 || put(line, &len, a, strlen(a)) < 0 ||
        put(line, &len, b, strlen(b)) < 0)
        return -2;
    return s->emit(s->ud, line) < 0 ? -1 : 0;
}

int pxhdr_request(pxhdr_each each, const void *src, const pxhdr_req_info *info, pxhdr_line_fn emit, void *ud)
{
    req_state s;
    int rc;

    memset(&s, 0, sizeof(s)); /* the xff buffer too: small next to a request */
    s.emit = emit;
    s.ud = ud;
    each(src, req_scan, &s);
    if (s.too_long)
        return -2;
    each(src, req_emit, &s);
    if (s.rc)
        return s.rc;
    rc = s.xff_len ? emit2(&s, s.xff, ", ", info->remote) : emit2(&s, "X-Forwarded-For: ", info->remote, "");
    if (!rc && s.host && *s.host && !strpbrk(s.host, "\r\n"))
        rc = emit2(&s, "X-Forwarded-Host: ", s.host, "");
    if (!rc)
        rc = emit2(&s, "X-Forwarded-Proto: ", info->proto, "");
    if (!rc)
        rc = emit2(&s, "X-Request-Id: ", info->request_id, "");
    if (!rc)
        rc = emit2(&s, "Expect:", "", "");
    if (!rc && !s.has_accept)
        rc = emit2(&s, "Accept:", "", "");
    return rc;
}

/* ---- response --------------------------------------------------------- */

/* Digits of data[0..n) after optional blanks, then only blanks or CR/LF:
 * the number, else -1. At most 18 digits. */
static long long parse_num(const char *p, size_t n)
{
    size_t i = 0, digits = 0;
    long long v = 0;

    while (i < n && (p[i] == ' ' || p[i] == '\t'))
        i++;
    while (i < n && p[i] >= '0' && p[i] <= '9') {
        if (++digits > 18)
            return -1;
        v = v * 10 + (p[i++] - '0');
    }
    if (!digits)
        return -1;
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\r' || p[i] == '\n'))
        i++;
    return i == n ? v : -1;
}

pxhdr_kind pxhdr_response_line(const char *data, size_t n, long long *num, size_t *keep_len)
{
    const char *colon, *v;
    size_t nlen, len = n;

    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        const char *sp = memchr(data, ' ', n);
        size_t i;
        int st = 0;

        /* "HTTP/1.1 200 OK": exactly three digits after the first space. */
        for (i = sp ? (size_t)(sp - data) + 1 : n; i < n && data[i] >= '0' && data[i] <= '9' && st < 1000; i++)
            st = st * 10 + (data[i] - '0');
        *num = st >= 100 && st <= 599 ? st : 502;
        return PXHDR_STATUS;
    }
    if (n >= 1 && n <= 2 && (data[0] == '\r' || data[0] == '\n'))
        return PXHDR_END;
    colon = memchr(data, ':', n);
    if (!colon)
        return PXHDR_DROP;
    nlen = (size_t)(colon - data);
    if (hdr_is(data, nlen, "content-length")) {
        *num = parse_num(colon + 1, n - nlen - 1);
        return PXHDR_LENGTH;
    }
    if (!is_token(data, nlen) || (pxhdr_hop_by_hop(data, nlen) && !hdr_is(data, nlen, "connection")) ||
        hdr_is(data, nlen, "date") || hdr_is(data, nlen, "x-request-id"))
        return PXHDR_DROP;
    while (len && (data[len - 1] == '\r' || data[len - 1] == '\n'))
        len--;
    for (v = colon + 1; v < data + len; v++)
        if (((unsigned char)*v < 0x20 && *v != '\t') || *v == 0x7f)
            return PXHDR_DROP;
    *keep_len = len;
    return PXHDR_KEEP;
}

/* Nonzero when any Connection line of lines..end lists name (slow path:
 * more Connection lines than PXHDR_MAX_CONN). */
static int listed_anywhere(const char *lines, const char *end, const char *name, size_t n)
{
    for (const char *l = lines; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l)), *colon;

        if (!nl)
            nl = end;
        colon = memchr(l, ':', (size_t)(nl - l));
        if (colon && hdr_is(l, (size_t)(colon - l), "connection") &&
            listed_n(colon + 1, (size_t)(nl - colon - 1), name, n))
            return 1;
        l = nl + 1;
    }
    return 0;
}

void pxhdr_response(const char *lines, size_t len, pxhdr_pair_fn emit, void *ud)
{
    const char *end = lines + len, *conn[PXHDR_MAX_CONN];
    size_t conn_len[PXHDR_MAX_CONN];
    int nconn = 0, more = 0;

    for (const char *l = lines; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l)), *colon;

        if (!nl)
            nl = end;
        colon = memchr(l, ':', (size_t)(nl - l));
        if (colon && hdr_is(l, (size_t)(colon - l), "connection")) {
            if (nconn < PXHDR_MAX_CONN) {
                conn[nconn] = colon + 1;
                conn_len[nconn++] = (size_t)(nl - colon - 1);
            } else {
                more = 1;
            }
        }
        l = nl + 1;
    }
    for (const char *l = lines; l < end;) {
        const char *nl = memchr(l, '\n', (size_t)(end - l)), *colon, *v;
        char name[PXHDR_NAME_MAX], val[PXHDR_VALUE_MAX];
        size_t n, vn;
        int drop = 0;

        if (!nl)
            nl = end;
        colon = memchr(l, ':', (size_t)(nl - l));
        if (!colon)
            goto next;
        n = (size_t)(colon - l);
        if (hdr_is(l, n, "connection"))
            goto next;
        for (int i = 0; i < nconn && !drop; i++)
            drop = listed_n(conn[i], conn_len[i], l, n);
        if (more && !drop)
            drop = listed_anywhere(lines, end, l, n);
        v = colon + 1;
        while (v < nl && (*v == ' ' || *v == '\t'))
            v++;
        vn = (size_t)(nl - v);
        if (drop || n >= sizeof(name) || vn >= sizeof(val))
            goto next;
        memcpy(name, l, n);
        name[n] = '\0';
        memcpy(val, v, vn);
        val[vn] = '\0';
        emit(ud, name, val);
    next:
        l = nl + 1;
    }
}

/* ---- path ------------------------------------------------------------- */

/* Length of the path separator at p (/, \, %2f or %5c), else 0. An
 * upstream that decodes %2f or takes \ for / before it resolves dot
 * segments would climb on them too. */
static size_t sep_len(const char *p)
{
    if (*p == '/' || *p == '\\')
        return 1;
    if (p[0] == '%' && ((p[1] == '2' && (p[2] == 'f' || p[2] == 'F')) || (p[1] == '5' && (p[2] == 'c' || p[2] == 'C'))))
        return 3;
    return 0;
}

int pxhdr_has_dot_segment(const char *p)
{
    for (const char *s = p; *s && *s != '?'; s++) {
        size_t sep = sep_len(s);
        const char *t;
        int dots = 0;

        if (!sep)
            continue;
        t = s + sep;
        for (;;) {
            if (*t == '.') {
                t++;
                dots++;
            } else if (t[0] == '%' && t[1] == '2' && (t[2] == 'e' || t[2] == 'E')) {
                t += 3;
                dots++;
            } else {
                break;
            }
        }
        if (dots >= 1 && dots <= 2 && (sep_len(t) || *t == '\0' || *t == '?'))
            return 1;
    }
    return 0;
}
