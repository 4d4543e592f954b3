/* auth: accounts (register, login, refresh, logout) and the Bearer check
 * every signed-in route uses.
 *
 * Access tokens are HS256 JWTs from jwtauth (claims sub = user id, iat,
 * exp, jti, plus username). Refresh tokens are opaque: 32 random bytes in
 * base64url, stored only as their SHA-256 in `refresh_tokens`, single-use
 * (each refresh rotates them within a family; a replayed one revokes the
 * family) and revoked by logout. */
#ifndef AE_AUTH_H
#define AE_AUTH_H

#include <stddef.h>

#include "gateway.h"

typedef struct {
    char user_id[128];
    char username[128];
} auth_user;

/* Prepares what login needs (the dummy hash in gw->dummy_hash). Returns 0,
 * or -1 with the reason in `err`. Call before serving. */
int auth_init(gateway *gw, char *err, size_t errlen);

/* Checks the request's "Authorization: Bearer <jwt>". Returns 0 and fills
 * `out`, or answers 401 (missing, malformed, forged, expired, alg none)
 * and returns -1. No database round trip: a token stays valid until it
 * expires even if the account is deactivated meanwhile. */
int auth_check(gateway *gw, httpd_req *req, auth_user *out);

/* auth_check, or its result when the guard already checked this request
 * on its headers (see guard.h). */
int auth_require(gateway *gw, httpd_req *req, auth_user *out);

#endif
