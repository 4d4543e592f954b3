/* randid: random identifiers (run and worker ids, message ids, instance
 * ids) from the kernel's generator, getrandom(2). They must not repeat; they
 * are not secrets (tokens and keys come from OpenSSL's RAND_bytes where
 * they are made). */
#ifndef AE_RANDID_H
#define AE_RANDID_H

#include <stddef.h>

/* Length of a UUID's text (8-4-4-4-12 hex digits), NUL not included. */
#define RANDID_UUID_LEN 36

/* Fills buf with n random bytes. Without the kernel's generator (an early
 * boot without entropy, a seccomp sandbox) the bytes come from the clock,
 * the process id and a per-process counter: unpredictable no more, but
 * never repeated within the process, which is what an id needs. */
void randid_fill(void *buf, size_t n);

/* Writes prefix (may be "") followed by a random version-4 UUID in
 * lowercase into out (size bytes), cut to fit, with a terminating NUL;
 * size >= strlen(prefix) + RANDID_UUID_LEN + 1 holds it whole. Returns the
 * number of characters written. */
size_t randid_uuid(char *out, size_t size, const char *prefix);

#endif
