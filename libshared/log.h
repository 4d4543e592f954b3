/* log: one line per record, JSON (default) or text, to stderr.
 *
 * Records are written with a single write(2) so lines from several threads
 * never interleave. Secrets must never be passed in; callers log ids, not
 * tokens. */
#ifndef AE_LOG_H
#define AE_LOG_H

#include <stddef.h>

typedef enum {
    LOG_ERROR = 0,
    LOG_WARN = 1,
    LOG_INFO = 2,
    LOG_DEBUG = 3
} log_level;

/* Sets the service name stamped on every line and the output options.
 * `level` is one of error|warn|info|debug and `format` json|text; NULL keeps
 * the current value. Returns 0, or -1 when a value is not recognised (the
 * configuration stays unchanged). Not thread-safe: call once at start. */
int log_init(const char *service, const char *level, const char *format);

/* Parses a level name; returns -1 when unknown. */
int log_level_parse(const char *name);

/* Nonzero when records at `lvl` are written; lets callers skip building
 * expensive fields. */
int log_enabled(log_level lvl);

/* Writes a record with message `msg` (escaped here) and extra JSON members
 * rendered from `fields_fmt` (printf-style, no surrounding braces, e.g.
 * "\"status\":%d"). String values in fields must be escaped by the caller
 * with log_escape. `fields_fmt` may be NULL. */
void log_event(log_level lvl, const char *msg, const char *fields_fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* printf-style message without extra fields. */
void log_msgf(log_level lvl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msgf(LOG_ERROR, __VA_ARGS__)
#define log_warn(...) log_msgf(LOG_WARN, __VA_ARGS__)
#define log_info(...) log_msgf(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msgf(LOG_DEBUG, __VA_ARGS__)

/* Escapes `src` as the inside of a JSON string into `dst` (always
 * NUL-terminated, truncated to fit). Returns `dst` for use in arguments. */
char *log_escape(char *dst, size_t dstlen, const char *src);

#endif
