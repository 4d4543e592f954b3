/* pxhdr: the reverse proxy's header and path rules (SPEC 2b), kept pure
 * (no I/O, no allocation, no libcurl or MHD types) so that proxy.c and
 * tests/fuzz/fuzz_proxy_headers.c run the same code.
 *
 * Request: the client's header list becomes the upstream's. Dropped:
 * hop-by-hop headers (RFC 9110 7.6.1), every name a Connection header lists,
 * Host, Content-Length and Expect (libcurl writes its own), and the
 * forwarding headers the gateway sets itself. Added: X-Forwarded-For (the
 * client's chain, then its address), X-Forwarded-Host (the client's Host),
 * X-Forwarded-Proto, X-Request-Id, an empty Expect (no 100-continue) and,
 * when the client sent none, an empty Accept (libcurl would add one).
 *
 * Response: what an upstream answers loses its hop-by-hop headers, Date and
 * X-Request-Id (the gateway's own), whatever its Connection header lists,
 * and any line that is not a header field (a name that is not a token, a
 * control byte in the value): the client never sees them. */
#ifndef AE_PXHDR_H
#define AE_PXHDR_H

#include <stddef.h>

/* Longest header line given to emit (libcurl's form, NUL included). */
#define PXHDR_LINE_MAX 8192
/* Longest response header name and value passed on. */
#define PXHDR_NAME_MAX 256
#define PXHDR_VALUE_MAX 8192

/* The client's headers: each(src, visit, vud) calls visit once per header,
 * in the order received (httpd_req_each_header's shape). */
typedef void (*pxhdr_visit)(void *vud, const char *name, const char *value);
typedef void (*pxhdr_each)(const void *src, pxhdr_visit visit, void *vud);
/* Takes one upstream request line, "Name: value", or "Name;" for an empty
 * value (libcurl's form: "Name:" would delete its own header instead).
 * 0, or -1 to stop. */
typedef int (*pxhdr_line_fn)(void *ud, const char *line);

typedef struct {
    const char *remote;     /* the client's address */
    const char *request_id; /* the request's id (httpd_req_id) */
    const char *proto;      /* "http" or "https" */
} pxhdr_req_info;

/* Emits the upstream's request header lines from the client's. Returns 0;
 * -1 when emit failed (out of memory); -2 when a header line would not
 * fit in PXHDR_LINE_MAX or the client sent more than 16 Connection headers
 * (the request is refused: 431). */
int pxhdr_request(pxhdr_each each, const void *src, const pxhdr_req_info *info, pxhdr_line_fn emit, void *ud);

/* Nonzero for a hop-by-hop header name (n bytes, any case). */
int pxhdr_hop_by_hop(const char *name, size_t n);
/* Nonzero when `name` (n bytes) is listed in the Connection value. */
int pxhdr_listed_in(const char *conn_value, const char *name, size_t n);

/* One line of an upstream's response head as libcurl's header callback gets
 * it (data, n bytes, with its CRLF): */
typedef enum {
    PXHDR_STATUS,  /* a status line: *num = its status (502 when unreadable); a new head starts */
    PXHDR_END,     /* the blank line ending the head */
    PXHDR_LENGTH,  /* Content-Length: *num = its value (-1 when not a number) */
    PXHDR_DROP,    /* not passed on */
    PXHDR_KEEP     /* kept: *keep_len = the line's length without CR/LF */
} pxhdr_kind;
pxhdr_kind pxhdr_response_line(const char *data, size_t n, long long *num, size_t *keep_len);

/* Calls emit(ud, name, value) (NUL-terminated, at most PXHDR_NAME_MAX /
 * PXHDR_VALUE_MAX bytes: a longer one is left out) for every line of `lines`
 * (len bytes of "Name: value\n", the KEEP lines stored in order) but
 * Connection and the names it lists. */
typedef void (*pxhdr_pair_fn)(void *ud, const char *name, const char *value);
void pxhdr_response(const char *lines, size_t len, pxhdr_pair_fn emit, void *ud);

/* Nonzero when the rest of a proxied target (what follows the service
 * name, with its query) holds a "." or ".." segment, between any of the
 * separators an upstream may take for "/" (/, \, %2f, %5c; dots plain or
 * %2e): it could climb out of the upstream's base path. */
int pxhdr_has_dot_segment(const char *rest);

#endif
