/* rtsync: reading a Khala topic, shared by the poll route and the
 * WebSocket route. */
#ifndef RT_RTSYNC_H
#define RT_RTSYNC_H

#include "rt.h"

typedef struct {
    long long head;      /* head_cursor: the topic's last sequence (0 when none) */
    long long floor_seq; /* oldest_available_cursor: last pruned sequence */
    cJSON *messages;     /* array of messages after the cursor; caller frees */
} rtsync_window;

/* Reads the topic's window and up to `limit` messages after `after` in one
 * statement (one snapshot, so head, floor and messages agree). Returns 0,
 * or -1 with an error answer in `a`. */
int rtsync_read(rt *r, const char *topic, long long after, long limit, rtsync_window *w, rt_resp *a);

/* The stale_cursor details for a cursor `after` in window w (counting the
 * refusal in the metrics), or NULL when the cursor can be served. Caller
 * frees with cJSON_Delete. */
cJSON *rtsync_stale(rt *r, const char *topic, long long after, const rtsync_window *w);

#endif
