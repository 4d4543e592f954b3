/* sig: HMAC-SHA256 of webhook bodies with a key prepared once.
 *
 * The one-shot HMAC() of OpenSSL 3 looks up the MAC and digest
 * implementations and derives the padded key on every call; a webhook
 * worker signs every body with the same WEBHOOK_SECRET, so the inner and
 * outer digest states after the key blocks are computed once here and
 * copied for each message (RFC 2104). */
#ifndef AW_SIG_H
#define AW_SIG_H

#include <stddef.h>

typedef struct sig_key sig_key;

/* Prepares `secret` (len bytes). NULL on failure. Free with sig_key_free.
 * The key is read-only afterwards and may be used by several threads. */
sig_key *sig_key_new(const char *secret, size_t len);
void sig_key_free(sig_key *k);

/* Writes the lowercase hex HMAC-SHA256 of data[0..len) and a NUL into
 * hex (65 bytes). Returns 0 or -1. */
int sig_hex(const sig_key *k, const char *data, size_t len, char hex[65]);

#endif
