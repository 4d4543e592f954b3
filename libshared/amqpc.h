/* amqpc: one AMQP 0-9-1 connection with one channel (channel 1), over
 * librabbitmq-c 0.11, with reconnection and back-off.
 *
 * Not thread-safe: one amqpc per thread. After a connection-level failure
 * the handle is marked closed and the next amqpc_connect reconnects; while
 * backing off (100 ms doubling to 5 s) amqpc_connect fails fast, and the
 * failure is logged once per back-off step. A channel-level error (e.g. a
 * failed passive declare) closes and reopens the channel. */
#ifndef AE_AMQPC_H
#define AE_AMQPC_H

#include <stddef.h>

#include <amqp.h>

#include "cfg.h"

typedef struct amqpc amqpc;

/* The URL default when AMQP_URL is not set. */
#define AMQPC_DEFAULT_URL "amqp://guest:guest@127.0.0.1:5672/%2f"

/* Reads AMQP_URL (default AMQPC_DEFAULT_URL) and checks it the way
 * amqpc_new will parse it: amqp:// only (amqps:// is refused), a port from
 * 1 to 65535, at most one path segment for the vhost. A bad value is
 * recorded in `c` with the password masked. Copies the URL into `out`
 * (outlen bytes, NUL included). Returns 0, or -1 (out is then ""). */
int amqpc_url_from_cfg(cfg *c, char *out, size_t outlen);

/* Creates a handle for `url` (amqp://user:pass@host:port/vhost, vhost
 * %-decoded, "/" when empty; NULL: AMQPC_DEFAULT_URL), parsed with
 * amqp_parse_url on a private copy. `connection_name` is sent as the
 * connection_name client property (NULL: none). Does not connect. Returns
 * NULL on OOM or an unparsable URL. Logs one "amqp" line naming the URL,
 * secrets masked (as every error about it). Free
 * with amqpc_free. */
amqpc *amqpc_new(const char *url, const char *connection_name);

/* Closes and frees. amqpc_free(NULL) is a no-op. */
void amqpc_free(amqpc *a);

/* Opens the connection, logs in and opens channel 1, unless already
 * connected. Returns 0, or -1 (amqpc_errstr) at once while backing off. */
int amqpc_connect(amqpc *a);

/* Nonzero when connected. */
int amqpc_is_connected(const amqpc *a);

/* The connection state for consumers (amqp_basic_consume,
 * amqp_consume_message), owned by the handle; NULL when disconnected. */
amqp_connection_state_t amqpc_state(amqpc *a);

/* Counts successful connects (0 before the first). A reconnect loses the
 * channel's consumers and exclusive/auto-delete queues, so a consumer keeps
 * the value it started with and re-declares and re-subscribes when it
 * changes. */
unsigned long amqpc_generation(const amqpc *a);

/* The channel number in use (1). */
int amqpc_channel(const amqpc *a);

/* Checks an RPC reply. On a connection-level failure (library/socket error
 * or connection.close) marks the connection closed so the next
 * amqpc_connect reconnects; on channel.close reopens the channel. Returns
 * 0, or -1 with the reason (prefixed with `what`) in amqpc_errstr. */
int amqpc_check(amqpc *a, amqp_rpc_reply_t r, const char *what);

/* Declares a topic exchange (connecting first when needed). 0 or -1. */
int amqpc_declare_topic_exchange(amqpc *a, const char *name, int durable);

/* Declares a durable, non-exclusive queue (connecting first when needed)
 * and binds it to `exchange` with `routing_key` unless that is NULL.
 * 0 or -1. */
int amqpc_declare_queue_bind(amqpc *a, const char *queue, const char *exchange,
                             const char *routing_key);

/* The same with the queue's durability chosen: a queue that already exists
 * with the other durability makes the broker close the channel
 * (PRECONDITION_FAILED, reported here), which consumers that follow another
 * service's declarations (RABBITMQ_QUEUE_DURABLE) must be able to avoid.
 * 0 or -1. */
int amqpc_declare_queue(amqpc *a, const char *queue, int durable, const char *exchange,
                        const char *routing_key);

/* Publishes `len` bytes (content type application/json; delivery mode 2
 * when `persistent`), connecting first when needed. Returns 0 when the
 * frame was written (no publisher confirms), -1 otherwise. */
int amqpc_publish(amqpc *a, const char *exchange, const char *routing_key, const char *body,
                  size_t len, int persistent);

/* Cheap liveness for health checks: connected and the broker answers a
 * passive declare of "amq.topic". Does not connect. 0 or -1. */
int amqpc_ping(amqpc *a);

/* Closes channel and connection (politely when possible). The handle can
 * connect again. */
void amqpc_close(amqpc *a);

/* The last error ("" when none). Valid until the next call on `a`. */
const char *amqpc_errstr(const amqpc *a);

#endif
