/* h1parse: an HTTP/1.x response parser (status line, headers,
 * Content-Length, chunked or read-to-close bodies), fed bytes in pieces of
 * any size, shared by the action-workers' client (action-workers/h1.c) and
 * the gateway's direct upstream path (api-gateway/proxy.c); and a strict
 * HTTP/1.1 request-head parser (h1_request_parse, below) for a server that
 * reads requests itself. Neither holds a socket; neither allocates beyond
 * the body buffer it is given. */
#ifndef AE_H1PARSE_H
#define AE_H1PARSE_H

#include <stddef.h>

#include "buf.h"

/* Called for every response header line, as received (with its CRLF). */
typedef void (*h1_header_fn)(void *ud, const char *line, size_t n);

#define H1_LINE_MAX 8192      /* longest status, header or chunk-size line */
#define H1_HEADERS_MAX 65536  /* most header bytes in one response */

enum { H1_PARSE_ERROR = -1, H1_PARSE_MORE = 0, H1_PARSE_DONE = 1 };

typedef struct {
    int state;
    int head_only;            /* the request was HEAD: no body follows */
    long status;              /* set once the status line is read */
    int http10, keep_alive, conn_close, chunked, has_len;
    unsigned long long remaining; /* body or chunk bytes still to come */
    size_t hdr_bytes;
    size_t linelen;
    buf *body;                /* where body bytes go (bounded by the buf); may be NULL */
    h1_header_fn on_header;   /* may be NULL */
    void *ud;
    char err[96];             /* why H1_PARSE_ERROR */
    char line[H1_LINE_MAX];
} h1_parser;

/* Prepares `p` for one response. */
void h1_parser_init(h1_parser *p, int head_only, buf *body, h1_header_fn on_header, void *ud);

/* Feeds `n` bytes. Returns H1_PARSE_MORE when more are needed,
 * H1_PARSE_DONE when the response is complete (`*used` bytes of this call
 * belonged to it), H1_PARSE_ERROR with the reason in p->err. */
int h1_parse(h1_parser *p, const char *data, size_t n, size_t *used);

/* The peer closed the connection: H1_PARSE_DONE when that ends the body
 * (a response without length), else H1_PARSE_ERROR. */
int h1_parse_eof(h1_parser *p);

/* Nonzero when the parser is inside a body (for PARTIAL vs PROTO). */
int h1_parse_in_body(const h1_parser *p);

/* Nonzero once the headers of the final (not 1xx) response are complete:
 * a caller that streams the body answers from here on. */
int h1_parse_head_done(const h1_parser *p);

/* Nonzero when the response may be followed by another one on the
 * connection (HTTP/1.1 without Connection: close, or 1.0 keep-alive, and
 * a delimited body). Only meaningful after H1_PARSE_DONE. */
int h1_parse_reusable(const h1_parser *p);

/* ---- request heads (RFC 9112 2-3, 5-6), strict.
 *
 * The head is parsed in place: the caller keeps the bytes received in one
 * buffer and calls h1_request_parse again with the longer buffer when more
 * arrive (the parser resumes after the last complete line it saw, so a head
 * trickled byte by byte costs O(length) in all; the buffer may move between
 * calls). Once the head is complete its spans point into the last buffer
 * given. Refused, each with its status: a bare LF or a CR not followed by
 * LF, obs-fold (a line starting with white space), white space between a
 * field name and its colon, a name that is not a token, a control byte in a
 * value, a request line that is not `token SP target SP HTTP/1.x` (400);
 * Content-Length that is not a plain number or given twice, Transfer-
 * Encoding other than one `chunked`, both together, Transfer-Encoding in
 * HTTP/1.0, no or several Host in HTTP/1.1 (400: the framing two parties
 * could read differently is how requests are smuggled); another HTTP
 * version (505); a line over H1_LINE_MAX, more than H1_REQ_FIELDS_MAX
 * fields or a head over the caller's bound (431). */

#define H1_REQ_FIELDS_MAX 64

typedef struct {
    const char *name, *value; /* valid once the head is complete */
    size_t nlen, vlen;
    size_t noff, voff;        /* the same as offsets into the buffer */
} h1_field;

typedef struct {
    size_t pos;                /* bytes of the buffer parsed (whole lines) */
    int line_done;             /* the request line was read */
    const char *method, *target; /* valid once the head is complete */
    size_t moff, toff, mlen, tlen;
    int minor;                 /* HTTP/1.<minor> */
    h1_field fields[H1_REQ_FIELDS_MAX];
    int nfields;
    int has_len, chunked, hosts;
    unsigned long long content_length;
    int conn_close, conn_keep_alive, conn_upgrade; /* Connection tokens */
    int upgrade, expect;       /* an Upgrade or Expect field is present */
    size_t head_len;           /* set with H1_PARSE_DONE: bytes of the head */
    int status;                /* set with H1_PARSE_ERROR: 400, 431 or 505 */
    char err[96];
} h1_head;

void h1_request_init(h1_head *r);

/* Parses the head at the start of `data` (`n` bytes, the same buffer as the
 * previous call, grown; `max_head` bounds the head). H1_PARSE_DONE once the
 * empty line that ends it is in (r->head_len bytes; what follows is body or
 * the next request), H1_PARSE_MORE, or H1_PARSE_ERROR with r->status and
 * r->err. After DONE or ERROR, h1_request_init before the next head. */
int h1_request_parse(h1_head *r, const char *data, size_t n, size_t max_head);

/* Nonzero when the connection may carry another request after this one:
 * HTTP/1.1 without Connection: close, or 1.0 with keep-alive. */
int h1_request_keep_alive(const h1_head *r);

/* The value of the first field named `name` (case-insensitive), or NULL;
 * *len gets its length. */
const char *h1_request_field(const h1_head *r, const char *name, size_t *len);

#endif
