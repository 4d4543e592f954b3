/* buf: a growable byte buffer with a stated maximum (in the manner of curl's
 * dynbuf), used for HTTP bodies, rendered templates and JSON text.
 *
 * The contents are always NUL-terminated once anything was appended. Bytes
 * past `max` are dropped and counted in `truncated`, so a caller that only
 * wants a prefix (a response kept for the results table) keeps reading
 * without failing. */
#ifndef AE_BUF_H
#define AE_BUF_H

#include <stddef.h>
#include <string.h>

typedef struct buf {
    char *p;          /* heap; freed by buf_free */
    size_t len, cap;
    size_t max;       /* 0 means 1 MiB */
    size_t truncated; /* bytes dropped past max */
} buf;

/* Initialises an empty buffer that holds at most `max` bytes. */
void buf_init(buf *b, size_t max);

/* Appends `n` bytes. Returns 0, or -1 on OOM (the buffer is unchanged). */
int buf_append(buf *b, const void *data, size_t n);

/* Appends a NUL-terminated string. */
int buf_puts(buf *b, const char *s);

/* Appends all `n` bytes or none: -1, with the buffer unchanged, on OOM or
 * when they would pass `max` (where buf_append would drop the rest). For
 * text that must never be cut short (job documents, array literals). The
 * common case, room already there, is inline: it runs per field on the
 * event-processor's hot path. */
int buf_append_all_grow(buf *b, const void *data, size_t n);
static inline int buf_append_all(buf *b, const void *data, size_t n)
{
    if (n < b->cap - b->len && b->len + n <= b->max) {
        memcpy(b->p + b->len, data, n);
        b->len += n;
        b->p[b->len] = '\0';
        return 0;
    }
    return buf_append_all_grow(b, data, n);
}

/* Makes room for `n` more bytes past the contents and hands them to the
 * caller to write: the length grows by n at once (the bytes are not
 * initialised; the NUL after them is set). Returns where they start, or
 * NULL (buffer unchanged) on OOM or when they would pass `max`. The
 * pointer is valid until the next change. */
char *buf_extend(buf *b, size_t n);

/* Appends `n` bytes that should be UTF-8, each ill-formed sequence (its
 * longest invalid prefix) replaced by U+FFFD, as Unicode recommends and
 * Python's "replace" does: text from peers goes into PostgreSQL text and
 * jsonb, which refuse the whole statement over one bad byte. Returns 0 or
 * -1 (OOM). */
int buf_append_utf8(buf *b, const char *s, size_t n);

/* The length of the longest well-formed UTF-8 prefix of the `n` bytes at s
 * (n when they are all UTF-8; the same rules as buf_append_utf8: no
 * overlong forms, surrogates or code points past U+10FFFF). */
size_t buf_utf8_valid(const char *s, size_t n);

/* Empties the buffer and keeps its memory. */
void buf_reset(buf *b);
/* Makes room for at least `n` bytes (and the NUL) in all, so that the
 * appends that follow do not reallocate; the capacity at least doubles
 * when it grows, so reserving before each append stays linear. Returns 0
 * or -1 (OOM). */
int buf_reserve(buf *b, size_t n);

/* Releases the memory and empties the buffer. */
void buf_free(buf *b);

/* Takes the contents (malloc'd, NUL-terminated, freed by the caller with
 * free()); the buffer is left empty. Returns NULL on OOM. */
char *buf_take(buf *b);

/* The contents as a string ("" when empty); valid until the next change. */
const char *buf_str(const buf *b);

#endif
