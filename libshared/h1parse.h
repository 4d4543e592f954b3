/* h1parse: an HTTP/1.x response parser (status line, headers,
 * Content-Length, chunked or read-to-close bodies), fed bytes in pieces of
 * any size. Shared by the action-workers' client (action-workers/h1.c) and
 * the gateway's direct upstream path (api-gateway/proxy_direct.c). It holds
 * no socket and allocates nothing beyond the body buffer it is given. */
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

#endif
