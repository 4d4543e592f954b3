/* pxfront: the proxy's keep-alive front (loop mode). A client connection
 * whose direct-path request libmicrohttpd parsed is taken from it
 * (pxfront_adopt) and served by the loop itself until a request that is not
 * a plain direct-path one, which gives the socket back to libmicrohttpd.
 * The design is at the top of pxfront.c.
 *
 * Threads: every function runs on the loop's thread (l's). The loop owns
 * its fronts (l->fronts, freed by pxfront_fini); a pxreq answered by the
 * front has r->front set and is answered through the functions below
 * instead of through libmicrohttpd. */
#ifndef AE_PXFRONT_H
#define AE_PXFRONT_H

#include <stddef.h>
#include <stdint.h>

#include "httpd.h"
#include "pxint.h"

/* Takes r's connection from libmicrohttpd when it may (1: r is the front's
 * now, answered through it; 0: not taken, answer r as usual; -1: the socket
 * was taken but no front could hold it: it is closed, r is not answered). */
int pxfront_adopt(pxloop *l, pxreq *r, httpd_req *req);
/* An epoll event whose data carries PX_FTAG. */
void pxfront_event(pxloop *l, uint64_t tag, uint32_t events);
/* Closes idle fronts past the idle timeout (now: ms). */
void pxfront_expire(pxloop *l, long long now);
/* The loop ends: writes what it can, answers what is in flight, frees all. */
void pxfront_fini(pxloop *l);

/* Answers r on front f: a whole response (status, pxhdr header lines,
 * body), or a JSON error; xname/xvalue: one extra header or NULL. */
void pxfront_reply(pxloop *l, pxfront *f, pxreq *r, const pxfinfo *fi, int status, const char *lines,
                   size_t llen, const char *ctype, const char *body, size_t blen, const char *xname,
                   const char *xvalue);
void pxfront_error(pxloop *l, pxfront *f, pxreq *r, const pxfinfo *fi, int status, const char *code,
                   const char *msg, const char *xname, const char *xvalue);
/* A streamed answer (chunked unless its length is known; sse: an event
 * stream): its head, its bytes (0: taken; 1: the client's buffer is full,
 * nothing taken; -1: the client is gone), its end (broken: the upstream cut
 * it, so the client's connection is closed after what is buffered). */
void pxfront_stream_start(pxloop *l, pxreq *r, int sse, const char *lines, size_t llen);
int pxfront_stream_write(pxreq *r, const char *data, size_t n);
void pxfront_stream_end(pxloop *l, pxreq *r, int broken);

#endif
