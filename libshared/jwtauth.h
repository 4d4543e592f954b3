/* jwtauth: HS256 JSON Web Tokens, signed and verified the same way by every
 * service (one truth for JWT checks).
 *
 * A jwtauth holds the secret and the issuer/audience policy. It is read-only
 * after jwtauth_new(), so one instance may be shared by many threads without
 * locking. Tokens and secrets are never logged here. */
#ifndef AE_JWTAUTH_H
#define AE_JWTAUTH_H

#include <cjson/cJSON.h>

typedef struct jwtauth jwtauth;

enum {
    JWTAUTH_OK = 0,
    JWTAUTH_EMALFORMED = -1,
    JWTAUTH_EALG = -2,
    JWTAUTH_ESIG = -3,
    JWTAUTH_EEXPIRED = -4,
    JWTAUTH_ENOTYET = -5,
    JWTAUTH_EISS = -6,
    JWTAUTH_EAUD = -7,
    JWTAUTH_EMISSING = -8 /* required claim absent */,
    JWTAUTH_ENOMEM = -9
};

/* Tokens longer than this are refused (EMALFORMED) before any decoding. */
#define JWTAUTH_MAX_TOKEN 16384

/* Creates a signer/verifier. `secret` is copied. `issuer`/`audience` NULL =
 * not checked (and not added when signing). `leeway_s`: clock skew allowance
 * for exp/nbf (negative is treated as 0). Returns NULL on OOM or when
 * `secret` is NULL or empty. Free with jwtauth_free(). */
jwtauth *jwtauth_new(const char *secret, const char *issuer, const char *audience, long leeway_s);

/* Frees `j` and wipes its copy of the secret. NULL is a no-op. */
void jwtauth_free(jwtauth *j);

/* Signs `claims` (not modified; any JSON object, NULL = {}) as HS256 with
 * the header {"alg":"HS256","typ":"JWT"}, adding iat=now, exp=now+ttl_s
 * (ttl_s > 0) and jti (random 128-bit hex) unless already present (a
 * caller's own iat/exp/jti win), and iss/aud from the configuration when set
 * and absent. On success *out is a malloc'd NUL-terminated token the caller
 * frees with free(); on failure it is set to NULL. Returns JWTAUTH_OK,
 * JWTAUTH_EMALFORMED (claims not an object, ttl_s <= 0, claims too large for
 * a JWTAUTH_MAX_TOKEN token) or JWTAUTH_ENOMEM. */
int jwtauth_sign(jwtauth *j, const cJSON *claims, long ttl_s, char **out);

/* Verifies signature (HS256 only: alg none, HS384/512, RS*, anything else
 * → JWTAUTH_EALG; a header without alg → EALG), exp (required → EMISSING
 * when absent), nbf (when present), iss/aud when configured (aud may be a
 * string or an array containing it). The header's typ is not required, so
 * tokens from other HS256 implementations verify. On success *claims_out (if
 * non-NULL) gets the payload as a cJSON object the caller frees with
 * cJSON_Delete; on failure it is set to NULL. Never crashes on garbage
 * (empty, no dots, bad base64, huge: see JWTAUTH_MAX_TOKEN). A configured
 * iss/aud that the token lacks is EISS/EAUD; exp or nbf that is not a number
 * is EMALFORMED; a header with "crit" is EMALFORMED (no extension is
 * understood). Checks run in this order: shape, alg, signature, exp, nbf,
 * iss, aud. */
int jwtauth_verify(jwtauth *j, const char *token, cJSON **claims_out);

/* A stable snake_case code ("token_expired", "invalid_signature",
 * "algorithm_not_allowed", ...) and a human message for a JWTAUTH_* value.
 * Static strings; never NULL. */
const char *jwtauth_reason(int rc);
const char *jwtauth_message(int rc);

/* Extracts the token from an "Authorization: Bearer <t>" header value
 * (case-insensitive scheme, blanks before the scheme and between scheme and
 * token skipped). Returns a pointer into `header` (the rest of the string),
 * or NULL when `header` is NULL, another scheme, the token is empty, or it
 * holds anything but token68 characters (A-Z a-z 0-9 - . _ ~ + / and
 * trailing =), trailing blanks included. */
const char *jwtauth_bearer(const char *header);

#endif
