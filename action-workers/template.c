#include "template.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "fmt.h"
#include "jsonstr.h"

static char *dup_str(const char *s)
{
    return s ? strdup(s) : NULL;
}

static char *number_str(double v)
{
    char tmp[64];

    if (isfinite(v) && v == floor(v) && fabs(v) < 9.007199254740992e15)
        fmt_i64(tmp, (long long)v);
    else
        snprintf(tmp, sizeof(tmp), "%.17g", v);
    return strdup(tmp);
}

static const cJSON *event_field(const template_ctx *ctx, const char *name)
{
    if (!ctx->event || !cJSON_IsObject(ctx->event))
        return NULL;
    return cJSON_GetObjectItemCaseSensitive(ctx->event, name);
}

char *template_value(const char *name, const template_ctx *ctx)
{
    const cJSON *v;

    if (!strcmp(name, "trigger.name") || !strcmp(name, "trigger_name"))
        return dup_str(ctx->trigger_name);
    if (!strcmp(name, "trigger.id"))
        return dup_str(ctx->trigger_id);
    if (!strcmp(name, "job.id"))
        return dup_str(ctx->job_id);
    if (!strncmp(name, "event.", 6))
        name += 6;
    if (!strcmp(name, "event_id") && !event_field(ctx, "event_id")) {
        v = event_field(ctx, "id");
    } else {
        v = event_field(ctx, name);
    }
    if (!v && !strcmp(name, "trigger_id"))
        return dup_str(ctx->trigger_id);
    if (!v || cJSON_IsNull(v))
        return NULL;
    if (cJSON_IsString(v))
        return dup_str(v->valuestring);
    if (cJSON_IsNumber(v))
        return number_str(v->valuedouble);
    if (cJSON_IsBool(v))
        return strdup(cJSON_IsTrue(v) ? "true" : "false");
    return cJSON_PrintUnformatted(v);
}

/* Where the next byte of a template stands, as the renderer follows its
 * literal text (the values written in it never change this). */
enum {
    AT_TEXT = 0, /* outside any markup */
    AT_BOLD,     /* legacy Markdown entities, closed by their opening mark */
    AT_ITALIC,
    AT_CODE,
    AT_PRE,
    AT_LINKTEXT, /* [ ... ] */
    AT_LINKURL,  /* ]( ... ) */
    AT_JSTRING   /* inside a JSON string */
};

typedef struct {
    int at;
    int esc; /* the previous byte was a backslash that escapes this one */
} scan;

/* Follows n bytes of the template's own text from state *st. */
static void follow(scan *st, template_mode mode, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int three = i + 2 < n && c == '`' && s[i + 1] == '`' && s[i + 2] == '`';

        if (st->esc) {
            st->esc = 0;
            continue;
        }
        if (mode == TEMPLATE_JSON) {
            if (st->at == AT_JSTRING && c == '\\')
                st->esc = 1;
            else if (c == '"')
                st->at = st->at == AT_JSTRING ? AT_TEXT : AT_JSTRING;
            continue;
        }
        if (mode == TEMPLATE_MARKDOWN_V2 && c == '\\') {
            st->esc = 1; /* any character may be escaped anywhere */
            continue;
        }
        switch (st->at) {
        case AT_TEXT:
            if (mode == TEMPLATE_MARKDOWN && c == '\\' && i + 1 < n && strchr("_*`[", s[i + 1]))
                st->esc = 1;
            else if (three) {
                st->at = AT_PRE;
                i += 2;
            } else if (c == '`')
                st->at = AT_CODE;
            else if (c == '[')
                st->at = AT_LINKTEXT;
            else if (mode == TEMPLATE_MARKDOWN && c == '*')
                st->at = AT_BOLD;
            else if (mode == TEMPLATE_MARKDOWN && c == '_')
                st->at = AT_ITALIC;
            break;
        case AT_BOLD:
            st->at = c == '*' ? AT_TEXT : AT_BOLD;
            break;
        case AT_ITALIC:
            st->at = c == '_' ? AT_TEXT : AT_ITALIC;
            break;
        case AT_CODE:
            st->at = c == '`' ? AT_TEXT : AT_CODE;
            break;
        case AT_PRE:
            if (three) {
                st->at = AT_TEXT;
                i += 2;
            }
            break;
        case AT_LINKTEXT:
            if (c == ']') {
                st->at = i + 1 < n && s[i + 1] == '(' ? AT_LINKURL : AT_TEXT;
                i += st->at == AT_LINKURL;
            }
            break;
        case AT_LINKURL:
            if (c == ')')
                st->at = AT_TEXT;
            break;
        default:
            break;
        }
    }
}

/* Legacy Markdown allows no escape inside an entity: its closing mark is
 * written as close, escaped mark, reopen. */
static int md_value(buf *b, const char *s, int at)
{
    for (; *s; s++) {
        const char *rep = NULL;
        char c = *s;

        switch (at) {
        case AT_TEXT:
            if (strchr("_*`[", c) && buf_append(b, "\\", 1) < 0)
                return -1;
            break;
        case AT_BOLD:
            rep = c == '*' ? "*\\**" : NULL;
            break;
        case AT_ITALIC:
            rep = c == '_' ? "_\\__" : NULL;
            break;
        case AT_CODE:
            rep = c == '`' ? "`\\``" : NULL;
            break;
        case AT_PRE:
            /* A zero-width space after each backtick: three never meet. */
            rep = c == '`' ? "`\xe2\x80\x8b" : NULL;
            break;
        case AT_LINKTEXT:
            rep = c == ']' ? "\xef\xbc\xbd" : NULL; /* U+FF3D, fullwidth ] */
            break;
        case AT_LINKURL:
            rep = c == ')' ? "%29" : c == ' ' ? "%20" : c == '\n' ? "%0A" : NULL;
            break;
        default:
            break;
        }
        if (rep ? buf_puts(b, rep) < 0 : buf_append(b, s, 1) < 0)
            return -1;
    }
    return 0;
}

static int v2_value(buf *b, const char *s, int at)
{
    const char *special = at == AT_CODE || at == AT_PRE ? "`\\" : at == AT_LINKURL ? ")\\" : "_*[]()~`>#+-=|{}.!\\";

    for (; *s; s++) {
        if (strchr(special, *s) && buf_append(b, "\\", 1) < 0)
            return -1;
        if (buf_append(b, s, 1) < 0)
            return -1;
    }
    return 0;
}

static int html_value(buf *b, const char *s)
{
    for (; *s; s++) {
        const char *rep = *s == '<' ? "&lt;" : *s == '>' ? "&gt;" : *s == '&' ? "&amp;" : *s == '"' ? "&quot;"
                        : *s == '\'' ? "&#39;" : NULL;

        if (rep ? buf_puts(b, rep) < 0 : buf_append(b, s, 1) < 0)
            return -1;
    }
    return 0;
}

/* The event's own node for a placeholder, when it names an event field. */
static const cJSON *field_node(const char *name, const template_ctx *ctx)
{
    if (!strncmp(name, "trigger.", 8) || !strcmp(name, "trigger_name") || !strcmp(name, "job.id"))
        return NULL;
    if (!strncmp(name, "event.", 6))
        name += 6;
    if (!strcmp(name, "event_id") && !event_field(ctx, "event_id"))
        return event_field(ctx, "id");
    return event_field(ctx, name);
}

/* A placeholder outside a JSON string: a JSON value of its own. */
static int json_value(buf *b, const char *name, const char *v, const template_ctx *ctx)
{
    const cJSON *n = field_node(name, ctx);

    if (v && n && (cJSON_IsNumber(n) || cJSON_IsBool(n) || cJSON_IsObject(n) || cJSON_IsArray(n)) &&
        (!cJSON_IsNumber(n) || isfinite(n->valuedouble)))
        return buf_puts(b, v);
    return buf_append(b, "\"", 1) < 0 || jsonstr_puts(b, v ? v : "") < 0 || buf_append(b, "\"", 1) < 0 ? -1 : 0;
}

static int put_value(buf *b, const char *name, const char *v, template_mode mode, const scan *st,
                     const template_ctx *ctx)
{
    switch (mode) {
    case TEMPLATE_JSON:
        return st->at == AT_JSTRING ? (v ? jsonstr_puts(b, v) : 0) : json_value(b, name, v, ctx);
    case TEMPLATE_MARKDOWN:
        return v ? md_value(b, v, st->at) : 0;
    case TEMPLATE_MARKDOWN_V2:
        return v ? v2_value(b, v, st->at) : 0;
    case TEMPLATE_HTML:
        return v ? html_value(b, v) : 0;
    default:
        return v ? buf_puts(b, v) : 0;
    }
}

int template_escape(buf *b, const char *s, template_mode mode, template_place at)
{
    scan st = {mode == TEMPLATE_JSON            ? AT_JSTRING
               : at == TEMPLATE_AT_URL          ? AT_LINKURL
               : at == TEMPLATE_AT_BOLD && mode == TEMPLATE_MARKDOWN ? AT_BOLD
                                                : AT_TEXT,
               0};

    return put_value(b, "", s ? s : "", mode, &st, NULL);
}

/* Copies the trimmed placeholder name between `s` and `e` into `name`;
 * returns -1 when it is empty or too long. */
static int placeholder_name(const char *s, const char *e, char *name, size_t len)
{
    while (s < e && isspace((unsigned char)*s))
        s++;
    while (e > s && isspace((unsigned char)e[-1]))
        e--;
    if (e == s || (size_t)(e - s) >= len)
        return -1;
    for (const char *c = s; c < e; c++)
        if (!isalnum((unsigned char)*c) && *c != '_' && *c != '.')
            return -1;
    memcpy(name, s, (size_t)(e - s));
    name[e - s] = '\0';
    return 0;
}

char *template_render(const char *tpl, const template_ctx *ctx, template_mode mode, size_t max)
{
    buf b;
    const char *p = tpl ? tpl : "";
    scan st = {AT_TEXT, 0};

    buf_init(&b, max);
    while (*p) {
        const char *open = strstr(p, "{{"), *close;
        char name[128];

        if (!open) {
            if (buf_puts(&b, p) < 0)
                goto fail;
            break;
        }
        if (buf_append(&b, p, (size_t)(open - p)) < 0)
            goto fail;
        follow(&st, mode, p, (size_t)(open - p));
        close = strstr(open + 2, "}}");
        if (!close) {
            if (buf_puts(&b, open) < 0)
                goto fail;
            break;
        }
        if (placeholder_name(open + 2, close, name, sizeof(name)) == 0) {
            char *v = template_value(name, ctx);
            int rc = put_value(&b, name, v, mode, &st, ctx);

            free(v);
            if (rc < 0)
                goto fail;
            st.esc = 0;
            p = close + 2;
        } else {
            /* Not a placeholder: keep the braces and look further on. */
            if (buf_append(&b, open, 2) < 0)
                goto fail;
            follow(&st, mode, open, 2);
            p = open + 2;
        }
    }
    return buf_take(&b);
fail:
    buf_free(&b);
    return NULL;
}

/* A string that is one placeholder and nothing else, naming a number or a
 * boolean, keeps that type in JSON arguments. */
static cJSON *typed_value(const char *s, const template_ctx *ctx)
{
    size_t n = strlen(s);
    char name[128];
    const cJSON *v;

    if (n < 5 || strncmp(s, "{{", 2) || strcmp(s + n - 2, "}}") || strstr(s + 2, "{{"))
        return NULL;
    if (placeholder_name(s + 2, s + n - 2, name, sizeof(name)) < 0)
        return NULL;
    v = event_field(ctx, strncmp(name, "event.", 6) ? name : name + 6);
    if (v && (cJSON_IsNumber(v) || cJSON_IsBool(v)))
        return cJSON_Duplicate(v, 1);
    return NULL;
}

cJSON *template_render_json(const cJSON *tpl, const template_ctx *ctx)
{
    cJSON *out, *child;

    if (!tpl)
        return cJSON_CreateObject();
    if (cJSON_IsString(tpl)) {
        char *s;

        out = typed_value(tpl->valuestring, ctx);
        if (out)
            return out;
        s = template_render(tpl->valuestring, ctx, TEMPLATE_RAW, 0);
        if (!s)
            return NULL;
        out = cJSON_CreateString(s);
        free(s);
        return out;
    }
    if (!cJSON_IsObject(tpl) && !cJSON_IsArray(tpl))
        return cJSON_Duplicate(tpl, 1);
    out = cJSON_IsObject(tpl) ? cJSON_CreateObject() : cJSON_CreateArray();
    if (!out)
        return NULL;
    cJSON_ArrayForEach(child, tpl) {
        cJSON *r = template_render_json(child, ctx);

        if (!r) {
            cJSON_Delete(out);
            return NULL;
        }
        if (cJSON_IsObject(tpl))
            cJSON_AddItemToObject(out, child->string, r);
        else
            cJSON_AddItemToArray(out, r);
    }
    return out;
}
