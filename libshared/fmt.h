/* fmt: number and byte formatting for hot paths (snprintf's format parsing
 * and locale handling cost more than the digits when a value is written per
 * job or per row). */
#ifndef AE_FMT_H
#define AE_FMT_H

#include <stddef.h>

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

#endif
