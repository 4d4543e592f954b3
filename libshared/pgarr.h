/* pgarr: elements of a PostgreSQL array literal ('{"a","b\"c",NULL}'), the
 * form in which one statement takes a whole batch of values
 * (unnest($1::text[]) or = ANY($1::text[])). */
#ifndef AE_PGARR_H
#define AE_PGARR_H

/* Declared in buf.h; not included here, so that a file using only this
 * header keeps the name `buf` free for its own variables. */
struct buf;

/* Repair ill-formed UTF-8 (U+FFFD) in the value: text from peers, which
 * PostgreSQL would refuse (22021) together with the whole batch. */
#define PGARR_UTF8 1u

/* Appends s to the array literal that b holds (the caller writes the '{'
 * first and the '}' last): a comma unless b is empty or ends in '{', then
 * NULL for a NULL s, else the value in double quotes with '"' and '\\'
 * escaped. flags: 0 or PGARR_UTF8. Returns 0, or -1 on OOM; past b's
 * maximum bytes are dropped as buf_append drops them (b->truncated). */
int pgarr_add(struct buf *b, const char *s, unsigned flags);

#endif
