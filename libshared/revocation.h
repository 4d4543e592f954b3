/* revocation: whether a user's access tokens still count, without a
 * database round trip per request.
 *
 * An access token is refused once its user is deactivated (is_active
 * false), deleted, or has revoked every token (logout everywhere), which
 * sets users.tokens_valid_after: tokens with iat at or before that second
 * are refused. The state per user is cached in bounded memory and dropped
 * when migration 0012's trigger notifies `user_tokens` with the user's id:
 * every gateway instance LISTENs (pglisten), so a change made through any
 * instance, or straight in SQL, reaches all of them within the notification
 * latency (milliseconds). While the LISTEN connection is down nothing is
 * cached (every check asks the database), and on each reconnection the
 * cache is emptied, since notifications may have been missed. Entries also
 * expire after `ttl_ms` as a safety net.
 *
 * Shared by the gateway (every request) and realtime (WebSocket handshakes
 * and RefreshToken), so a sign-out everywhere reaches both.
 *
 * Thread-safe: the gateway's worker threads share one. */
#ifndef AE_REVOCATION_H
#define AE_REVOCATION_H

#include "dbpool.h"

typedef struct revocation revocation;

enum {
    REVOCATION_OK = 0,
    REVOCATION_REVOKED = 1,  /* issued at or before tokens_valid_after */
    REVOCATION_INACTIVE = 2, /* the account is deactivated */
    REVOCATION_UNKNOWN = 3   /* no such user (deleted) */
};

/* Starts the listener on `conninfo`; `app_name` names its connection
 * ("<app_name>-tokens"), `metric_prefix` its counters
 * (<prefix>_token_state_reads_total, _hits_total). Returns NULL on OOM.
 * Free with revocation_free. */
revocation *revocation_new(const char *conninfo, long ttl_ms, const char *app_name, const char *metric_prefix);
void revocation_free(revocation *rv);

/* The verdict for a token of `user_id` issued at `iat` (unix seconds):
 * REVOCATION_*, or -1 when the database could not be asked (reason in
 * err). */
int revocation_check(revocation *rv, dbpool *db, const char *user_id, long long iat, char *err, size_t errlen);

/* Bounds each database read of revocation_check (and the wait for a
 * pooled connection) to `ms`, for a caller on an event loop; after a read
 * that failed, reads fail at once for a second. 0 (the default) waits as
 * long as the database takes. Set before use. */
void revocation_set_read_timeout(revocation *rv, int ms);

/* Drops what is cached for `user_id` (after this instance changed it). */
void revocation_forget(revocation *rv, const char *user_id);

/* Nonzero while changes made elsewhere are being heard (for tests/health). */
int revocation_listening(const revocation *rv);

/* A human reason for a REVOCATION_* verdict. */
const char *revocation_message(int verdict);

#endif
