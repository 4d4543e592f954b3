/* apiutil: small helpers shared by the gateway's REST route modules:
 * database access that answers 503/500 itself, the `limit` query argument,
 * opaque keyset cursors, RFC 3339 and unix-time parsing, and reading typed
 * members of request bodies. Every helper that "answers" has sent the
 * response when it returns -1 (or NULL), so callers just return. */
#ifndef AE_APIUTIL_H
#define AE_APIUTIL_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#include "gateway.h"

/* How long a request waits for a pooled connection before answering 503. */
#define APIUTIL_DB_WAIT_MS 3000

/* Takes a pooled connection, or answers 503 "unavailable" and returns
 * NULL. Give it back with dbpool_release(gw->db, conn). */
PGconn *apiutil_db(gateway *gw, httpd_req *req);

/* Answers a failed query: 503 for connection failures (SQLSTATE class 08
 * and 57P), 500 otherwise. `err` is dbpool_exec's reason; it is logged,
 * never sent to the client. */
void apiutil_db_fail(httpd_req *req, const char *what, const char *err);

/* Runs `sql` with text parameters; on failure answers (as apiutil_db_fail)
 * and returns NULL. The caller PQclears the result. */
PGresult *apiutil_exec(httpd_req *req, PGconn *conn, const char *sql, int n, const char *const *params);

/* Like apiutil_exec, but as the prepared statement `name` (a string
 * literal naming `sql`, unique per SQL text): a read that runs on every
 * request skips planning after its first run on each pooled connection. The
 * statement is prepared on the connection the first time it is missing
 * (SQLSTATE 26000). Inside a transaction it falls back to apiutil_exec,
 * since the failed first attempt would abort the transaction. */
PGresult *apiutil_exec_prepared(httpd_req *req, PGconn *conn, const char *name, const char *sql, int n,
                                const char *const *params);

/* Reads ?limit= (1..max, default `def`). Adds "limit" to `details` when it
 * is bad and returns -1; returns 0 otherwise. */
int apiutil_limit(httpd_req *req, int def, int max, int *out, cJSON *details);

/* An opaque keyset cursor: a microsecond timestamp and a row id, encoded
 * as base64url of "<usec>:<id>". Returns a malloc'd string the caller frees
 * with free(), or NULL on OOM. */
char *apiutil_cursor_encode(const char *usec, const char *id);

/* Decodes ?cursor= into `usec` (decimal digits) and `id`. Returns 0 when
 * absent (usec[0] == '\0'), 0 when valid, -1 (with "cursor" in `details`)
 * when malformed. */
int apiutil_cursor_decode(httpd_req *req, char *usec, size_t usec_len, char *id, size_t id_len,
                          cJSON *details);

/* Parses a time given as unix seconds ("1700000000") or RFC 3339
 * ("2023-11-14T22:13:20Z", "...+02:00", fractional seconds allowed) into
 * unix seconds. Returns 0 or -1. */
int apiutil_parse_time(const char *s, int64_t *out);

/* Row `row` of `res` as an object, member per column (columns whose name
 * starts with "cursor_" are skipped): booleans, numbers (integer, numeric,
 * float), json/jsonb parsed, SQL NULL as null, everything else a string.
 * The caller frees it with cJSON_Delete; NULL on OOM. */
cJSON *apiutil_row_json(const PGresult *res, int row);

/* Constant-time equality of two NUL-terminated strings (time depends only
 * on the length of `b`, the secret). */
int apiutil_secret_eq(const char *a, const char *b);

/* Base64url without padding of `len` bytes into `out` (at least
 * 4*len/3+4 bytes). Returns `out`. */
char *apiutil_b64url(const unsigned char *in, size_t len, char *out, size_t outlen);

/* Lowercase hex SHA-256 of `s` into `out` (65 bytes). */
void apiutil_sha256_hex(const char *s, char out[65]);

/* Fills `buf` with `len` cryptographically random bytes. Returns 0 or -1. */
int apiutil_random(unsigned char *buf, size_t len);

#endif
