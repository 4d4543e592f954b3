/* rtserve: the server that carries the runtime's routes (rtroutes) and
 * its Khala WebSocket route. */
#ifndef RT_RTSERVE_H
#define RT_RTSERVE_H

#include <stddef.h>

#include "rt.h"

typedef struct rtserve rtserve;

/* At most this many threads commit appends in groups (rtappend), each on
 * one pooled connection beside the handler threads'. */
#define RTSERVE_APPEND_THREADS_MAX 64

/* Creates the server for `r` (borrowed; must outlive it) on host:port with
 * `threads` handler threads (handlers block on the database),
 * `append_threads` (1..RTSERVE_APPEND_THREADS_MAX) append threads, and
 * `append_conns` (0..RTPIPE_CONNS_MAX; 0: none) asynchronous connections
 * on which the loop itself commits the appends answered without events
 * (rtpipe). NULL with err on failure. Free with rtserve_free. */
rtserve *rtserve_new(rt *r, const char *host, int port, int threads, int append_threads, int append_conns,
                     char *err, size_t errlen);
/* Starts the handler threads, the LISTEN thread (its own connection with
 * `conninfo`) and the server. Returns 0 or -1 with err. */
int rtserve_start(rtserve *s, const char *conninfo, char *err, size_t errlen);
int rtserve_port(const rtserve *s);
/* Stops accepting and lets requests in flight finish for up to grace_ms. */
void rtserve_stop(rtserve *s, int grace_ms);
void rtserve_free(rtserve *s);

#endif
