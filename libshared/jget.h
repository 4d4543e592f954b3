/* jget: members of parsed JSON (cJSON) read with their type checked, the
 * lookups every service makes of bodies, frames, configs and events. */
#ifndef AE_JGET_H
#define AE_JGET_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* The string value of member `name` of object o (case-sensitive), or NULL
 * when o is NULL or not an object, the member is missing or not a string.
 * Borrowed from o. */
const char *jget_str(const cJSON *o, const char *name);

/* Parses the n bytes at s as one JSON text as RFC 8259 has it: UTF-8, no
 * raw control character inside a string, nothing but whitespace after the
 * value. cJSON alone takes any bytes >= 0x80, raw control characters and
 * trailing bytes, and what it took went on to PostgreSQL (which refuses
 * the statement over one bad byte) or out to clients verbatim. Returns the
 * value (the caller's: cJSON_Delete), or NULL with *at set to the offset
 * of the first bad byte and *why (static text) to "invalid UTF-8", "a
 * control character", "malformed JSON" or "trailing bytes" (either out
 * argument may be NULL). */
cJSON *jget_parse(const char *s, size_t n, size_t *at, const char **why);

#endif
