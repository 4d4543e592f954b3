/* fmt: number, byte and time formatting for hot paths (snprintf's format parsing
 * and locale handling cost more than the digits when a value is written per
 * job or per row). */
#ifndef AE_FMT_H
#define AE_FMT_H

#include <stddef.h>
#include <time.h>

/* Longest output of fmt_i64, NUL included. */
#define FMT_I64_MAX 21

/* Writes v in decimal into out (at least FMT_I64_MAX bytes) with a
 * terminating NUL; returns the number of characters before it. */
size_t fmt_i64(char *out, long long v);

/* Copies the string src into dst (size bytes, size > 0), cut to fit, with
 * a terminating NUL: what snprintf(dst, size, "%s", src) does, without
 * parsing a format. Returns the number of characters written. */
size_t fmt_copy(char *dst, size_t size, const char *src);

/* Writes the n bytes at in as 2n lowercase hex digits into out (at least
 * 2n + 1 bytes) with a terminating NUL; returns 2n. */
size_t fmt_hex(char *out, const void *in, size_t n);

/* Writes the 16 bytes at b as a UUID's text, 8-4-4-4-12 lowercase hex
 * digits, into out (at least 37 bytes) with a terminating NUL; returns 36.
 * The version and variant bits are the caller's to set in b. */
size_t fmt_uuid(char *out, const unsigned char b[16]);

/* Longest fmt_rfc3339 output for years 0 to 9999, NUL included
 * ("2026-12-01T20:41:53.123456789Z"). */
#define FMT_RFC3339_MAX 32

/* Writes the CLOCK_REALTIME time t (NULL: now) as RFC 3339 UTC with
 * `digits` (0 to 9) fraction digits, cut not rounded:
 * "2026-12-01T20:41:53.123Z" for 3. Into out (size bytes), cut to fit,
 * with a terminating NUL; returns the number of characters written. */
size_t fmt_rfc3339(char *out, size_t size, const struct timespec *t, int digits);

#endif
