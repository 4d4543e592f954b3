/* jget: members of parsed JSON (cJSON) read with their type checked, the
 * lookups every service makes of bodies, frames, configs and events. */
#ifndef AE_JGET_H
#define AE_JGET_H

#include <cjson/cJSON.h>

/* The string value of member `name` of object o (case-sensitive), or NULL
 * when o is NULL or not an object, the member is missing or not a string.
 * Borrowed from o. */
const char *jget_str(const cJSON *o, const char *name);

#endif
