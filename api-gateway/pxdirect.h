/* pxdirect: the proxy's direct path (loop mode, http:// upstreams resolved
 * at start, requests without a body): the request written on a kept-alive
 * upstream connection of the loop's own and the answer read with h1parse,
 * without libcurl. The design is at the top of pxdirect.c.
 *
 * Threads and ownership: a loop's upstream connections (l->conns, the idle
 * stacks l->idle per upstream) are the loop's, created and freed here only;
 * a pxreq with r->direct holds one (r->conn) until px_direct_release.
 * Everything runs on the loop's thread except px_direct_prepare (proxy_new,
 * before the loops start), px_direct_fits and px_direct_setup (the
 * request's MHD thread, which in loop mode is its loop). */
#ifndef AE_PXDIRECT_H
#define AE_PXDIRECT_H

#include <stdint.h>

#include <curl/curl.h>

#include "httpd.h"
#include "pxhdr.h"
#include "pxint.h"

/* Resolves u's address once, at start; u->direct is 1 if it may go direct. */
void px_direct_prepare(upstream *u);
/* Whether req goes the direct way (1) or through libcurl (0). */
int px_direct_fits(proxy *px, upstream *u, httpd_req *req);
/* Builds the upstream request bytes into r->out_req from req (or from any
 * header source: px_direct_build); 0, or -1 when they do not fit. */
int px_direct_setup(pxreq *r, httpd_req *req, const char *rest);
int px_direct_build(pxreq *r, const char *method, const char *rest, pxhdr_each each, const void *src,
                    const pxhdr_req_info *info);
/* Starts r on a kept-alive or new connection of l (links it to l). */
void px_direct_start(pxloop *l, pxreq *r);
/* Hands staged body bytes on (whole answer or stream) and completes r when
 * the upstream's answer is over; called again when a full stream drains. */
void px_direct_flush(pxloop *l, pxreq *r);
/* Gives r's connection back to the idle stack (reuse) or closes it. */
void px_direct_release(pxloop *l, pxreq *r, int reuse);
/* An epoll event whose data carries PX_TAG. */
void px_direct_event(pxloop *l, uint64_t tag, uint32_t events);
/* Ends as timed out (504, or a stream cut) direct transfers past their
 * deadline (connect or silence). */
void px_direct_expire(pxloop *l, long long now);
/* The CURLcode's message as the direct path words it (for the error body). */
const char *px_direct_strerror(CURLcode rc);
/* The loop ends: closes every connection. */
void px_direct_fini(pxloop *l);

#endif
