/* cfg: typed configuration from the environment, with a `.env` file read
 * first (the real environment wins).
 *
 * Getters never exit: a bad value is recorded (variable, value and what was
 * expected) and the default is returned, so a program reads everything, then
 * calls cfg_failed() once and stops with every problem listed. */
#ifndef AE_CFG_H
#define AE_CFG_H

#include <stddef.h>
#include <stdio.h>

typedef struct cfg cfg;

/* Creates a reader for `service` (used in messages). Returns NULL on OOM.
 * Free with cfg_free(). */
cfg *cfg_new(const char *service);
void cfg_free(cfg *c);

/* Loads KEY=VALUE lines from `path` into the process environment without
 * overriding variables that are already set. Accepts `export KEY=...`,
 * '#' comments, blank lines, and single- or double-quoted values (double
 * quotes understand \n, \" and \\). A missing file is not an error.
 * Returns 0, or -1 with the reason (file and line) in `err`. */
int cfg_load_dotenv(const char *path, char *err, size_t errlen);

/* The parsing half of cfg_load_dotenv: the lines of an open stream (`path`
 * names it in errors), same rules and result; the caller closes `f`. */
int cfg_read_dotenv(FILE *f, const char *path, char *err, size_t errlen);

/* The raw value, or `def` when unset or empty. */
const char *cfg_str(cfg *c, const char *name, const char *def);

/* An integer in [min, max]. */
long cfg_int(cfg *c, const char *name, long def, long min, long max);

/* true/false, 1/0, yes/no, on/off (any case). */
int cfg_bool(cfg *c, const char *name, int def);

/* One of the NULL-terminated `allowed` names (any case); returns the
 * canonical spelling from `allowed`, or `def` on error. */
const char *cfg_enum(cfg *c, const char *name, const char *def, const char *const *allowed);

/* A duration like "250ms", "30s", "5m", "2h" or a bare number of
 * `bare_unit_ms` milliseconds; returns milliseconds. */
long cfg_duration_ms(cfg *c, const char *name, long def_ms, long bare_unit_ms);

/* A secret with a development default. Using the default logs a warning.
 * With APP_ENV=production the default, a value shorter than 32 bytes and a
 * placeholder (containing "change-me", "changeme" or "change_me", any case)
 * are errors; outside production the latter two log a warning. The value is
 * never written to a log or error message. */
const char *cfg_secret(cfg *c, const char *name, const char *dev_default);

/* Nonzero for APP_ENV=production. */
int cfg_production(cfg *c);

/* Records a problem found by the caller's own checks. A value that looks
 * like a URL or a key=value list is shown with its secrets masked
 * (redact_url). */
void cfg_error(cfg *c, const char *name, const char *value, const char *expected);

/* Nonzero when any getter recorded a problem. */
int cfg_failed(const cfg *c);

/* All recorded problems, one per line ("" when none). */
const char *cfg_errstr(const cfg *c);

/* The usual start-up: load ./.env, read LOG_LEVEL and LOG_FORMAT into the
 * logger. Returns a reader or NULL (after logging why). */
cfg *cfg_boot(const char *service);

/* Logs every recorded problem and returns -1 when there were any. Programs
 * call it after reading their configuration and exit(2) on -1. */
int cfg_finish(cfg *c);

#endif
