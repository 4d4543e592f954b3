/* jsonstr: text escaped as the inside of a JSON string, the one escaper of
 * every service (log lines, job documents, events, rendered templates).
 *
 * Escaped: '"', '\\', every control byte below 0x20 and DEL (0x7f); the
 * short forms \b \f \n \r \t where JSON has them, \u00XX otherwise. Bytes
 * from 0x80 up pass as they are: callers that take text from peers repair
 * UTF-8 first (buf_append_utf8). No quotes are added. */
#ifndef AE_JSONSTR_H
#define AE_JSONSTR_H

#include <stddef.h>

/* Declared in buf.h; not included here, so that a file using only this
 * header keeps the name `buf` free for its own variables. */
struct buf;

/* The longest escape of one byte ("\u001f"). */
#define JSONSTR_ESC_MAX 6

/* Appends the n bytes at s, escaped, to b. Returns 0, or -1 on OOM. Past
 * b's maximum bytes are dropped as buf_append drops them (b->truncated
 * says so); callers that need the whole text check it. */
int jsonstr_append(struct buf *b, const char *s, size_t n);

/* The same for a NUL-terminated string (NULL counts as ""). */
int jsonstr_puts(struct buf *b, const char *s);

/* An escaped copy of s (NULL counts as ""), malloc'd: the caller frees it
 * with free(). NULL on OOM. */
char *jsonstr_dup(const char *s);

/* Writes s escaped into dst (dstlen bytes, NUL-terminated), cut at the last
 * whole escape that fits, so the result is always valid string content.
 * Returns dst. */
char *jsonstr_into(char *dst, size_t dstlen, const char *s);

#endif
