/* authbody: the field checks of the auth routes' JSON bodies (register,
 * login, refresh, logout), apart from the routes so that
 * tests/fuzz/fuzz_gateway_bodies.c runs them. Pure: a body in, the fields
 * or the problems out. */
#ifndef AE_AUTHBODY_H
#define AE_AUTHBODY_H

#include <stddef.h>

#include <cjson/cJSON.h>

#define AUTHBODY_MIN_PASSWORD 8
#define AUTHBODY_MAX_PASSWORD 256 /* bytes; well inside libcrypt's CRYPT_MAX_PASSPHRASE_SIZE */

/* Strings borrowed from the body; email_lower is the email in lower case
 * (how it is stored and looked up). */
typedef struct {
    const char *username, *email, *password, *refresh_token;
    char email_lower[256];
} authbody_fields;

/* Each fills *f and returns 0, or adds one member per bad field to
 * `details` ({"field": "what is wrong"}) and returns -1. */
int authbody_register(const cJSON *body, cJSON *details, authbody_fields *f);
int authbody_login(const cJSON *body, cJSON *details, authbody_fields *f);
int authbody_refresh(const cJSON *body, cJSON *details, authbody_fields *f);

/* dst gets src in lower case, cut to len - 1 bytes. */
void authbody_lower(char *dst, size_t len, const char *src);

#endif
