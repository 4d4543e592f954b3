/* httpstream: a response body written by another thread while the client
 * reads it (proxied responses; SSE streams were, see api-gateway/sse_out.c), without holding a thread.
 *
 * The writer appends into a bounded buffer; MHD's content reader takes
 * from it on the connection's thread. When the buffer is empty the reader
 * suspends the connection (a reader returning 0 alone would busy-wait) and
 * the next write resumes it. When a write does not fit, it is refused and
 * `on_drain` is called once the client has taken enough, so a fast writer
 * (an upstream) is paused rather than buffered without bound, and a slow
 * client costs no more than its buffer.
 *
 * Threads: httpstream_write/end/release from any thread (internally
 * locked); callbacks run on the connection's MHD thread, with no lock held.
 * A stream has two references: the creator's (httpstream_release) and the
 * connection's (dropped when MHD is done with the response, after
 * `on_close`). */
#ifndef AE_HTTPSTREAM_H
#define AE_HTTPSTREAM_H

#include <stddef.h>

#include "httpd.h"

typedef struct httpstream httpstream;

typedef void (*httpstream_fn)(void *ud);

/* Sets a streamed answer on `req` (from its handler, or for a deferred
 * request from any thread before httpd_req_resume). `length` is the body
 * size when known (sent as Content-Length), else -1 (chunked). At most
 * `max_buffered` bytes wait for the client (0: 256 KiB). `block` is the
 * most MHD takes per read (0: 8 KiB); libmicrohttpd allocates that much
 * with the response, so streams that are many and mostly idle (SSE) want
 * it small. Returns NULL on OOM or when the request has an answer
 * already. */
httpstream *httpstream_new(httpd_req *req, int status, const char *content_type, long long length,
                           size_t max_buffered, size_t block);

/* Adds a response header; only before the answer is queued (that is, in
 * the handler, or before httpd_req_resume). Returns 0 or -1. */
int httpstream_add_header(httpstream *s, const char *name, const char *value);

/* Callbacks, set before the answer is queued. on_drain: a refused write may
 * be retried. on_close: the connection is done with the stream (the body
 * was sent whole, or the client went away, or it failed); writes fail from
 * then on. */
void httpstream_set_callbacks(httpstream *s, httpstream_fn on_drain, httpstream_fn on_close, void *ud);

/* Appends n bytes. Returns 0 when taken, 1 when they do not fit now
 * (nothing taken; on_drain follows), -1 when the stream is over (client
 * gone, or ended). */
int httpstream_write(httpstream *s, const void *p, size_t n);

/* Like httpstream_write, but always takes the bytes unless that would
 * pass `limit` bytes buffered in all (then -2, nothing taken). For writers
 * that drop a client rather than wait (SSE). */
int httpstream_write_max(httpstream *s, const void *p, size_t n, size_t limit);

/* Ends the body after what is buffered; `error` nonzero ends it as failed
 * (the connection is closed, so the client sees the stream cut). */
void httpstream_end(httpstream *s, int error);

/* Ends the body as failed and closes the client's connection now, even
 * while the client reads nothing (a client that stopped reading). */
void httpstream_cut(httpstream *s);

/* Since when (CLOCK_MONOTONIC ms) the client has taken no byte while some
 * wait: its last read, or when bytes came to an empty buffer; 0 when none
 * wait. */
long long httpstream_waiting_since(httpstream *s);

/* Bytes waiting for the client. */
size_t httpstream_buffered(httpstream *s);

/* Drops the creator's reference. NULL is a no-op. */
void httpstream_release(httpstream *s);

#endif
