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

/* How values are written into the template's text. The template's own
 * text is copied as it is (its markup stays); in the JSON and Telegram
 * modes the renderer follows that text to know where each placeholder
 * stands, and writes the value so that it cannot change the structure
 * around it. */
typedef enum {
    TEMPLATE_RAW = 0,      /* values copied as they are */
    /* JSON text: inside a string, the value is escaped string content;
     * outside, it is a JSON value: numbers and booleans as they are,
     * objects and arrays as compact JSON, anything else (text, a missing
     * field) a quoted, escaped string. */
    TEMPLATE_JSON = 1,
    /* Telegram's legacy Markdown: outside an entity _ * ` [ are
     * backslash-escaped; inside one (where Telegram allows no escape), the
     * entity's closing mark is written as close, escaped mark, reopen
     * (*2*\**2* for "2*2"); "]" in a link text becomes U+FF3D, ")" and
     * spaces in a link URL are percent-encoded. */
    TEMPLATE_MARKDOWN = 2,
    /* MarkdownV2: every special (_*[]()~`>#+-=|{}.!\) backslash-escaped;
     * inside code and pre only ` and \, inside a link URL only ) and \. */
    TEMPLATE_MARKDOWN_V2 = 3,
    /* Telegram HTML: < > & " ' as entities (text and attribute values). */
    TEMPLATE_HTML = 4
} template_mode;

/* Renders `tpl` (NULL renders as "") with values from `ctx`. The result is
 * at most `max` bytes (0: 1 MiB); longer output is cut. Returns a malloc'd
 * string the caller frees with free(), or NULL on OOM. */
char *template_render(const char *tpl, const template_ctx *ctx, template_mode mode, size_t max);

/* Where template_escape writes. */
typedef enum {
    TEMPLATE_AT_TEXT = 0, /* outside any markup */
    TEMPLATE_AT_BOLD,     /* inside a bold entity */
    TEMPLATE_AT_URL       /* in a link's URL */
} template_place;

/* Appends `s` as a value placed `at` in a text of `mode` is written.
 * Returns 0 or -1. For composing Telegram texts. */
int template_escape(buf *b, const char *s, template_mode mode, template_place at);

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
