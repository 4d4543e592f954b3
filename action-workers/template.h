/* template: {{field}} substitution for action messages, bodies and MCP
 * arguments.
 *
 * A placeholder names any column of the event ({{agent_id}}, {{score}},
 * {{tag1}}; "event." in front is accepted too), {{trigger.name}},
 * {{trigger.id}}, {{job.id}} or {{event_id}}. Whitespace inside the braces is
 * ignored. A missing or null field renders as the empty string; an unclosed
 * "{{" is copied as is. Numbers print as integers when they are integral,
 * objects and arrays as compact JSON. */
#ifndef AW_TEMPLATE_H
#define AW_TEMPLATE_H

#include <stddef.h>

#include <cjson/cJSON.h>

#include "buf.h"

/* What placeholders may refer to. Every member may be NULL. */
typedef struct {
    const cJSON *event;       /* the event object carried by the job */
    const char *trigger_name;
    const char *trigger_id;
    const char *job_id;
} template_ctx;

typedef enum {
    TEMPLATE_RAW = 0,      /* values copied as they are */
    TEMPLATE_JSON = 1,     /* values escaped as the inside of a JSON string */
    TEMPLATE_MARKDOWN = 2  /* Telegram (legacy) Markdown specials escaped */
} template_mode;

/* Renders `tpl` (NULL renders as "") with values from `ctx`. The result is
 * at most `max` bytes (0: 1 MiB); longer output is cut. Returns a malloc'd
 * string the caller frees with free(), or NULL on OOM. */
char *template_render(const char *tpl, const template_ctx *ctx, template_mode mode, size_t max);

/* The value a placeholder `name` (without braces) renders to, in RAW mode,
 * as a malloc'd string the caller frees with free(); NULL when the field is
 * missing or null (or on OOM). */
char *template_value(const char *name, const template_ctx *ctx);

/* Renders every string inside `tpl` (a JSON value; objects and arrays are
 * walked) in RAW mode, returning a new cJSON tree owned by the caller
 * (cJSON_Delete), or NULL on OOM. Keys are not rendered. A string that is
 * exactly one placeholder naming a number keeps its type, so
 * {"agent":"{{agent_id}}"} gives {"agent":42}. */
cJSON *template_render_json(const cJSON *tpl, const template_ctx *ctx);


#endif
