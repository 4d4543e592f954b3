/* redact: the secret-bearing parts of a URL or conninfo masked, for logs
 * and error messages. One function, used wherever a DATABASE_URL,
 * REDIS_URL, AMQP_URL or any other configured URL is shown. */
#ifndef AE_REDACT_H
#define AE_REDACT_H

#include <stddef.h>

/* Writes `url` into dst (len bytes, always NUL-terminated, cut to fit) with
 * every secret replaced by three asterisks:
 *   - the password of the userinfo ("postgres" "://user:***@host/db"); a
 *     lone userinfo of redis and rediss URLs too (a password there);
 *   - the value of every query or fragment parameter whose name looks like
 *     a secret (contains, in any case, pass, pwd, secret, token, key, auth,
 *     sig, credential or session): "?password=***", "#access_token=***";
 *   - in a key=value conninfo ("host=h password='x y'"), the values of such
 *     keys.
 * Returns dst. */
char *redact_url(char *dst, size_t len, const char *url);

#endif
