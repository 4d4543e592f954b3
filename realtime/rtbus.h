/* rtbus: the Redis side of realtime scale-out: one subscriber connection
 * (SUBSCRIBE to the channels the loop asks for, messages handed to the
 * loop in batches) and one command connection (PUBLISH, hashes), each on
 * its own thread so the WebSocket loop never waits for Redis.
 *
 * Both reconnect with back-off (rconn); after a reconnect the subscriber
 * subscribes again to every channel it holds. Messages published while it
 * was down are lost (Redis pub/sub keeps nothing), which the docs state, and
 * so are those that arrive while the loop is too far behind (rtbus_new).
 *
 * Threads: rtbus_subscribe, rtbus_unsubscribe and rtbus_command may be
 * called from any thread (they queue); the message and reply callbacks run
 * on the wsapp loop (through wsapp_post). */
#ifndef RT_RTBUS_H
#define RT_RTBUS_H

#include <stddef.h>

#include <hiredis/hiredis.h>

#include "metrics.h"
#include "rconn.h"
#include "wsapp.h"

typedef struct rtbus rtbus;

/* A message on a subscribed channel, on the loop thread. The strings are
 * valid during the call only. */
typedef void (*rtbus_message_fn)(void *ud, const char *channel, size_t clen, const char *payload, size_t plen);

/* The reply to a command, on the loop thread; `r` is NULL when Redis could
 * not be reached (and is freed after the call). */
typedef void (*rtbus_reply_fn)(void *ud, redisReply *r);

/* Creates the bus (options copied; not connected). At most `max_held`
 * bytes of messages (channel and payload) wait for the loop at once; a
 * message past that is dropped and counted in realtime_bus_dropped_total
 * of `mx` (NULL: metrics_default()); realtime_bus_messages_total counts
 * every message read, realtime_bus_held_bytes what waits. NULL on OOM. */
rtbus *rtbus_new(const rconn_opts *o, wsapp *app, size_t max_held, metrics *mx, rtbus_message_fn on_message,
                 void *ud);
/* Stops the threads (if started) and frees. NULL is a no-op. Replies not
 * yet delivered are dropped. */
void rtbus_free(rtbus *b);
/* Starts both threads. Returns 0 or -1. */
int rtbus_start(rtbus *b);

/* Channel subscriptions (the name is copied). Counted: a channel asked for
 * twice needs two unsubscribes. Returns 0 or -1 (OOM). */
int rtbus_subscribe(rtbus *b, const char *channel, size_t len);
int rtbus_unsubscribe(rtbus *b, const char *channel, size_t len);

/* Queues a command (arguments copied). `fn` (may be NULL) gets the reply.
 * Commands run in order. Returns 0, or -1 when the queue is full (100,000
 * commands or 64 MiB waiting; the command is dropped, fn is not called). */
int rtbus_command(rtbus *b, rtbus_reply_fn fn, void *ud, int argc, const char *const *argv, const size_t *lens);

/* Nonzero while the subscriber connection is up. */
int rtbus_up(const rtbus *b);

#endif
