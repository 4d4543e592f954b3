/* fmt: number formatting for hot paths (snprintf's format parsing and
 * locale handling cost more than the digits when a value is written per
 * job or per row). */
#ifndef AE_FMT_H
#define AE_FMT_H

#include <stddef.h>

/* Longest output of fmt_i64, NUL included. */
#define FMT_I64_MAX 21

/* Writes v in decimal into out (at least FMT_I64_MAX bytes) with a
 * terminating NUL; returns the number of characters before it. */
size_t fmt_i64(char *out, long long v);

#endif
