/* canonjson: canonical JSON text and its SHA-256, for hashes that a client
 * must be able to recompute (run receipts, replay payload hashes).
 *
 * Canonical here means: object members sorted by key (bytewise, which for
 * UTF-8 is code point order, what Python's sort_keys and serde's BTreeMap
 * give), no whitespace, strings escaped minimally (", \ and control
 * characters; \b \f \n \r \t in their short form, others as \u00XX;
 * everything else, non-ASCII included, as UTF-8), and numbers as integers
 * when they are integral and below 1e16 in magnitude, else in the shortest
 * %g form that reads back to the same double (what Python's json.dumps
 * prints for a float: 2.5, 1e+16, -3.25e-07). Numbers go through a double
 * (cJSON), so integers beyond 2^53 lose precision. */
#ifndef AE_CANONJSON_H
#define AE_CANONJSON_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "buf.h"

/* Deepest nesting written; deeper values are refused. */
#define CANONJSON_MAX_DEPTH 128

/* How deep v nests (a scalar 0, [] and {} 1, [[1]] 2), for a check before
 * a value is stored that its canonical form will be written later: a
 * value deeper than CANONJSON_MAX_DEPTH less its place in the document
 * cannot be. */
int canonjson_depth(const cJSON *v);

/* "sha256:" + 64 hex digits + NUL. */
#define CANONJSON_HASH_LEN 72

/* Appends the canonical text of `v` to `out`. Returns 0, or -1 on OOM, when
 * `out` hit its maximum (out->truncated) or the value nests deeper than
 * CANONJSON_MAX_DEPTH. */
int canonjson_append(buf *out, const cJSON *v);

/* Writes "sha256:<hex>" of the canonical text of `v` into `out`. Returns 0
 * or -1 (as canonjson_append). */
int canonjson_sha256(const cJSON *v, char out[CANONJSON_HASH_LEN]);

/* A SHA-256 over canonical text fed in pieces, for documents too large to
 * hold whole (a run's every event): only the value being added is held.
 * Not thread-safe; one owner. */
typedef struct canonjson_hash canonjson_hash;

/* NULL on OOM. Free with canonjson_hash_free (NULL is a no-op). */
canonjson_hash *canonjson_hash_new(void);
void canonjson_hash_free(canonjson_hash *h);
/* Feeds `len` bytes as they are (the punctuation between values). */
void canonjson_hash_raw(canonjson_hash *h, const char *s, size_t len);
/* Feeds the canonical text of `v`. Returns 0 or -1 (as canonjson_append;
 * a value is bounded by 64 MiB). */
int canonjson_hash_value(canonjson_hash *h, const cJSON *v);
/* Writes "sha256:<hex>" of everything fed. Returns 0 or -1 (after an
 * earlier failure of canonjson_hash_value or of the digest). */
int canonjson_hash_final(canonjson_hash *h, char out[CANONJSON_HASH_LEN]);

/* Appends the NUL-terminated string s as a canonical JSON string, quotes
 * included: the minimal escaping above (DEL and non-ASCII pass as they
 * are, which is also serde_json's). Returns 0, or -1 as canonjson_append. */
int canonjson_string(buf *out, const char *s);

/* Writes "sha256:<hex>" of `len` bytes into `out`. */
void canonjson_sha256_bytes(const void *data, size_t len, char out[CANONJSON_HASH_LEN]);

#endif
