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

static int put_markdown_escaped(buf *b, const char *s)
{
    for (; *s; s++) {
        if (strchr("_*`[", *s) && buf_append(b, "\\", 1) < 0)
            return -1;
        if (buf_append(b, s, 1) < 0)
            return -1;
    }
    return 0;
}

static int put_value(buf *b, const char *v, template_mode mode)
{
    if (mode == TEMPLATE_JSON)
        return jsonstr_puts(b, v);
    if (mode == TEMPLATE_MARKDOWN)
        return put_markdown_escaped(b, v);
    return buf_puts(b, v);
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
        close = strstr(open + 2, "}}");
        if (!close) {
            if (buf_puts(&b, open) < 0)
                goto fail;
            break;
        }
        if (placeholder_name(open + 2, close, name, sizeof(name)) == 0) {
            char *v = template_value(name, ctx);
            int rc = v ? put_value(&b, v, mode) : 0;

            free(v);
            if (rc < 0)
                goto fail;
            p = close + 2;
        } else {
            /* Not a placeholder: keep the braces and look further on. */
            if (buf_append(&b, open, 2) < 0)
                goto fail;
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
