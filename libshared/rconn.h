/* rconn: one Redis connection (hiredis 0.14, RESP2) with its configuration,
 * AUTH/SELECT on connect, and reconnection with back-off.
 *
 * An rconn is NOT thread-safe: use one per thread. After an I/O error the
 * next use reconnects. When a connect fails, further connects fail fast
 * (no network I/O) for a back-off window (100 ms doubling to 5 s, equal
 * jitter), and the failure is logged once per back-off step.
 *
 * hiredis writes with write(2): the process must ignore SIGPIPE (svc_init
 * does), or a command sent to a restarted server kills it. */
#ifndef AE_RCONN_H
#define AE_RCONN_H

#include <stddef.h>

#include <hiredis/hiredis.h>

#include "cfg.h"

typedef struct rconn rconn;

/* Where to connect. unix_path, when not empty, wins over host/port. */
typedef struct {
    char host[256];
    int port;
    char password[256];
    int db;
    char unix_path[256];
} rconn_opts;

/* Fills `o` from REDIS_URL when set, else from REDIS_HOST (127.0.0.1),
 * REDIS_PORT (6379), REDIS_PASSWORD and REDIS_DB (0). Bad values are
 * recorded in `c` (defaults are kept). Returns 0, or -1 when a value was
 * bad. */
int rconn_opts_from_cfg(cfg *c, rconn_opts *o);

/* Parses redis://[[user]:password@]host[:port][/db] (port 6379 and db 0 by
 * default; user is ignored, password is %-decoded; host may be [v6]) and
 * unix:///path[?db=N]. rediss:// (TLS) is refused. Returns 0, or -1 with the
 * reason in `err` (which never contains the password). */
int rconn_parse_url(const char *url, rconn_opts *o, char *err, size_t errlen);

/* Creates a handle (options copied) with `timeout_ms` for connect and for
 * each command (<= 0: 5000). Does not connect. NULL on OOM. Free with
 * rconn_free. */
rconn *rconn_new(const rconn_opts *o, int timeout_ms);

/* Closes and frees. rconn_free(NULL) is a no-op. */
void rconn_free(rconn *r);

/* Ensures a live connection (connect, AUTH, SELECT). While backing off
 * after a failure, returns -1 at once. Returns 0 or -1 (rconn_errstr). */
int rconn_connect(rconn *r);

/* Like redisCommand. Connects first when needed. On an I/O error the
 * connection is marked broken; when `idempotent` is set it then reconnects
 * once (ignoring the back-off window for this single attempt) and retries
 * the command once. Returns the reply, which the caller frees with
 * freeReplyObject, or NULL with the reason in rconn_errstr. A
 * REDIS_REPLY_ERROR reply is returned as is, not as NULL. */
redisReply *rconn_command(rconn *r, int idempotent, const char *fmt, ...);

/* The same with an argument vector (argvlen NULL: strlen of each). */
redisReply *rconn_command_argv(rconn *r, int idempotent, int argc, const char **argv,
                               const size_t *argvlen);

/* EVAL of the Lua `script` with `nkeys` keys and `nargs` arguments:
 * keys_args holds the keys (KEYS[1..nkeys]) then the arguments (ARGV),
 * lens their lengths (NULL: strlen of each). Sent and retried as by
 * rconn_command_argv; returns the reply the same way. */
redisReply *rconn_eval(rconn *r, int idempotent, const char *script, int nkeys, int nargs,
                       const char *const *keys_args, const size_t *lens);

/* The raw context, for pipelining and blocking commands (BRPOPLPUSH,
 * SUBSCRIBE); NULL when not connected. It stays owned by the rconn. After
 * an error on it, call rconn_mark_broken. A caller may change its timeout
 * with redisSetTimeout; it is reset on reconnect. */
redisContext *rconn_context(rconn *r);

/* Closes the connection so that the next use reconnects. This does not
 * start a back-off step (only a failed connect does), so a connection broken
 * by a server restart is replaced by the very next call. */
void rconn_mark_broken(rconn *r);

/* The last error ("" when none). Valid until the next call on `r`. */
const char *rconn_errstr(const rconn *r);

/* PING. Returns 0 on PONG, -1 otherwise. */
int rconn_ping(rconn *r);

#endif
