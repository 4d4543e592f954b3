/* trigger_model: parsing, validation and evaluation of triggers. See the
 * header for the model; this file keeps the two halves (validation of
 * bodies, evaluation of stored rows) on the same tables of names. */
#include "trigger_model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "event_model.h"
#include "fmt.h"
#include "jget.h"
#include "log.h"

#define TM_STR_(x) #x
#define TM_STR(x) TM_STR_(x)

static const char *const cond_names[] = {"unknown",     "agent_id_equals", "event_type_equals", "score_threshold",
                                         "tag_equals",  "ema_threshold",   "rate_limit"};
static const char *const action_names[] = {"unknown", "telegram", "rest", "mcp"};

const char *trigger_model_condition_type_name(trigger_model_cond_type t)
{
    return (t >= 0 && (size_t)t < sizeof(cond_names) / sizeof(cond_names[0])) ? cond_names[t] : "unknown";
}

const char *trigger_model_action_type_name(trigger_model_action_type t)
{
    return (t >= 0 && (size_t)t < sizeof(action_names) / sizeof(action_names[0])) ? action_names[t] : "unknown";
}

trigger_model_cond_type trigger_model_condition_type_parse(const char *s)
{
    if (!s)
        return TRIGGER_COND_UNKNOWN;
    for (size_t i = 1; i < sizeof(cond_names) / sizeof(cond_names[0]); i++)
        if (!strcmp(s, cond_names[i]))
            return (trigger_model_cond_type)i;
    return TRIGGER_COND_UNKNOWN;
}

trigger_model_action_type trigger_model_action_type_parse(const char *s)
{
    if (!s)
        return TRIGGER_ACTION_UNKNOWN;
    for (size_t i = 1; i < sizeof(action_names) / sizeof(action_names[0]); i++)
        if (!strcmp(s, action_names[i]))
            return (trigger_model_action_type)i;
    return TRIGGER_ACTION_UNKNOWN;
}

trigger_model_op trigger_model_op_parse(const char *s)
{
    if (!s)
        return TRIGGER_OP_NONE;
    if (!strcmp(s, "<"))
        return TRIGGER_OP_LT;
    if (!strcmp(s, ">"))
        return TRIGGER_OP_GT;
    if (!strcmp(s, "=") || !strcmp(s, "=="))
        return TRIGGER_OP_EQ;
    if (!strcmp(s, "<="))
        return TRIGGER_OP_LE;
    if (!strcmp(s, ">="))
        return TRIGGER_OP_GE;
    if (!strcmp(s, "!=") || !strcmp(s, "<>"))
        return TRIGGER_OP_NE;
    return TRIGGER_OP_NONE;
}

int trigger_model_compare(double a, trigger_model_op op, double b)
{
    switch (op) {
    case TRIGGER_OP_LT:
        return a < b;
    case TRIGGER_OP_GT:
        return a > b;
    case TRIGGER_OP_EQ:
        return a == b;
    case TRIGGER_OP_LE:
        return a <= b;
    case TRIGGER_OP_GE:
        return a >= b;
    case TRIGGER_OP_NE:
        return a != b;
    default:
        return 0;
    }
}

int trigger_model_parse_window(const char *s, int64_t *seconds)
{
    char *end;
    long long n, mult;
    size_t len;

    if (!s || !(len = strlen(s)) || len > 16 || s[0] < '0' || s[0] > '9')
        return -1;
    errno = 0;
    n = strtoll(s, &end, 10);
    if (errno || end == s || n <= 0 || end[0] == '\0' || end[1] != '\0')
        return -1;
    switch (end[0]) {
    case 's':
        mult = 1;
        break;
    case 'm':
        mult = 60;
        break;
    case 'h':
        mult = 3600;
        break;
    case 'd':
        mult = 86400;
        break;
    default:
        return -1;
    }
    if (n > 365LL * 86400 / mult)
        return -1;
    *seconds = n * mult;
    return 0;
}

/* A number from a JSON number or a numeric string (the stored form is
 * text). Returns 0 or -1. */
static int num_of(const cJSON *v, double *out)
{
    char *end;
    double d;

    if (cJSON_IsNumber(v)) {
        d = v->valuedouble;
    } else if (cJSON_IsString(v) && v->valuestring[0]) {
        const char *s = v->valuestring;

        if (s[0] == ' ' || s[0] == '\t')
            return -1;
        errno = 0;
        d = strtod(s, &end);
        if (errno || *end || end == s)
            return -1;
    } else {
        return -1;
    }
    if (!isfinite(d))
        return -1;
    *out = d;
    return 0;
}

/* An int64 from an integral JSON number or a decimal string. */
static int int_of(const cJSON *v, int64_t *out)
{
    if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;

        if (!isfinite(d) || d != floor(d) || fabs(d) > 9007199254740992.0)
            return -1;
        *out = (int64_t)d;
        return 0;
    }
    if (cJSON_IsString(v))
        return event_model_parse_i64(v->valuestring, out);
    return -1;
}

static int is_http_url(const char *s)
{
    const char *host;
    size_t len = strlen(s);

    if (len > 2048)
        return 0;
    if (!strncmp(s, "http://", 7))
        host = s + 7;
    else if (!strncmp(s, "https://", 8))
        host = s + 8;
    else
        return 0;
    if (!*host || *host == '/' || *host == '?' || *host == '#')
        return 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= ' ' || *p == 0x7f)
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ */
/* Validation.                                                          */

typedef struct {
    cJSON *doc;         /* deep copy of the body; strings point into it */
    char (*vals)[48];   /* formatted numeric condition values */
} def_priv;

static void problem(cJSON *details, const char *prefix, const char *name, const char *msg)
{
    char key[256];

    snprintf(key, sizeof(key), "%s%s", prefix ? prefix : "", name);
    if (!cJSON_HasObjectItem(details, key))
        cJSON_AddStringToObject(details, key, msg);
}

static const cJSON *member(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    return cJSON_IsNull(v) ? NULL : v;
}

/* Formats a number as the text stored in trigger_conditions.value. */
static void fmt_num(double d, char out[48])
{
    if (d == floor(d) && fabs(d) < 1e15)
        snprintf(out, 48, "%.0f", d);
    else
        snprintf(out, 48, "%.17g", d);
}

static void check_op(trigger_model_condition *c, const cJSON *cond, const char *pfx, cJSON *d, int required)
{
    const cJSON *op = member(cond, "operator");

    if (!op) {
        if (required)
            problem(d, pfx, "operator", "required: one of < > = == <= >= != <>");
        return;
    }
    if (!cJSON_IsString(op) || trigger_model_op_parse(op->valuestring) == TRIGGER_OP_NONE) {
        problem(d, pfx, "operator", "must be one of < > = == <= >= != <>");
        return;
    }
    c->op_text = op->valuestring;
    c->op = trigger_model_op_parse(op->valuestring);
    if (!required && c->op != TRIGGER_OP_EQ)
        problem(d, pfx, "operator", "this condition type only compares for equality (= or ==)");
}

static void check_numeric_value(trigger_model_condition *c, const cJSON *cond, const char *pfx, cJSON *d,
                                char vbuf[48], double min, double max)
{
    const cJSON *v = member(cond, "value");
    double x;

    if (!v) {
        problem(d, pfx, "value", "required: a number");
        return;
    }
    if (num_of(v, &x) < 0) {
        problem(d, pfx, "value", "must be a number");
        return;
    }
    if (x < min || x > max) {
        char msg[96];

        snprintf(msg, sizeof(msg), "must be between %.0f and %.0f", min, max);
        problem(d, pfx, "value", msg);
        return;
    }
    if (cJSON_IsString(v)) {
        c->value = v->valuestring;
    } else {
        fmt_num(x, vbuf);
        c->value = vbuf;
    }
}

static void check_condition(trigger_model_condition *c, const cJSON *cond, int i, cJSON *d, char vbuf[48])
{
    char pfx[48];
    const cJSON *t, *v, *f, *cfg;

    snprintf(pfx, sizeof(pfx), "conditions[%d].", i);
    if (!cJSON_IsObject(cond)) {
        char key[48];

        snprintf(key, sizeof(key), "conditions[%d]", i);
        problem(d, NULL, key, "must be an object");
        return;
    }
    t = member(cond, "condition_type");
    if (!t) {
        problem(d, pfx, "condition_type", "required");
        return;
    }
    c->type = cJSON_IsString(t) ? trigger_model_condition_type_parse(t->valuestring) : TRIGGER_COND_UNKNOWN;
    if (c->type == TRIGGER_COND_UNKNOWN) {
        problem(d, pfx, "condition_type",
                "must be one of agent_id_equals, event_type_equals, score_threshold, tag_equals, "
                "ema_threshold, rate_limit");
        return;
    }
    f = member(cond, "field");
    if (f && !cJSON_IsString(f))
        problem(d, pfx, "field", "must be a string");
    else if (f)
        c->field = f->valuestring;
    cfg = member(cond, "config");
    if (cfg && !cJSON_IsObject(cfg))
        problem(d, pfx, "config", "must be an object");
    else if (cfg)
        c->config = (cJSON *)cfg;
    v = member(cond, "value");

    switch (c->type) {
    case TRIGGER_COND_AGENT_ID_EQUALS: {
        int64_t id;

        check_op(c, cond, pfx, d, 0);
        if (!v)
            problem(d, pfx, "value", "required: an agent id (integer)");
        else if (int_of(v, &id) < 0 || id < 0)
            problem(d, pfx, "value", "must be a non-negative integer");
        else if (cJSON_IsString(v))
            c->value = v->valuestring;
        else {
            snprintf(vbuf, 48, "%lld", (long long)id);
            c->value = vbuf;
        }
        break;
    }
    case TRIGGER_COND_EVENT_TYPE_EQUALS:
        check_op(c, cond, pfx, d, 0);
        if (!v)
            problem(d, pfx, "value", "required: an event type");
        else if (!cJSON_IsString(v) || !event_model_type_valid(v->valuestring))
            problem(d, pfx, "value",
                    "must be one of AgentRegistered, MetadataSet, NewFeedback, FeedbackRevoked, "
                    "ResponseAppended, ValidationRequest, ValidationResponse");
        else
            c->value = v->valuestring;
        break;
    case TRIGGER_COND_TAG_EQUALS:
        check_op(c, cond, pfx, d, 0);
        if (!f)
            problem(d, pfx, "field", "required: tag1 or tag2");
        else if (!cJSON_IsString(f) || (strcmp(f->valuestring, "tag1") && strcmp(f->valuestring, "tag2")))
            problem(d, pfx, "field", "must be tag1 or tag2");
        if (!v)
            problem(d, pfx, "value", "required: a string");
        else if (!cJSON_IsString(v))
            problem(d, pfx, "value", "must be a string");
        else if (strlen(v->valuestring) > 1024)
            problem(d, pfx, "value", "must be at most 1024 bytes");
        else
            c->value = v->valuestring;
        break;
    case TRIGGER_COND_SCORE_THRESHOLD:
        check_op(c, cond, pfx, d, 1);
        check_numeric_value(c, cond, pfx, d, vbuf, -1e15, 1e15);
        break;
    case TRIGGER_COND_EMA_THRESHOLD: {
        const cJSON *ws = cfg && cJSON_IsObject(cfg) ? member(cfg, "window_size") : NULL;
        int64_t n;

        check_op(c, cond, pfx, d, 1);
        check_numeric_value(c, cond, pfx, d, vbuf, -1e15, 1e15);
        if (!cfg)
            problem(d, pfx, "config", "required: {window_size}");
        else if (cJSON_IsObject(cfg) && !ws)
            problem(d, pfx, "config.window_size", "required: an integer > 0");
        else if (ws && (int_of(ws, &n) < 0 || n < 1 || n > TRIGGER_MODEL_MAX_WINDOW_SIZE))
            problem(d, pfx, "config.window_size", "must be an integer between 1 and 100000");
        break;
    }
    case TRIGGER_COND_RATE_LIMIT: {
        const cJSON *tw = cfg && cJSON_IsObject(cfg) ? member(cfg, "time_window") : NULL;
        const cJSON *rr = cfg && cJSON_IsObject(cfg) ? member(cfg, "reset_on_trigger") : NULL;
        int64_t secs;

        check_op(c, cond, pfx, d, 1);
        check_numeric_value(c, cond, pfx, d, vbuf, 0, TRIGGER_MODEL_MAX_RATE);
        if (!cfg)
            problem(d, pfx, "config", "required: {time_window}");
        else if (cJSON_IsObject(cfg) && !tw)
            problem(d, pfx, "config.time_window", "required: \"<n>s|m|h|d\"");
        else if (tw && (!cJSON_IsString(tw) || trigger_model_parse_window(tw->valuestring, &secs) < 0))
            problem(d, pfx, "config.time_window",
                    "must be \"<n>s\", \"<n>m\", \"<n>h\" or \"<n>d\" (n > 0, at most 365 days)");
        if (rr && !cJSON_IsBool(rr))
            problem(d, pfx, "config.reset_on_trigger", "must be a boolean");
        break;
    }
    default:
        break;
    }
}

static void check_str_member(const cJSON *cfg, const char *name, const char *pfx, cJSON *d, size_t max)
{
    const cJSON *v = member(cfg, name);
    char msg[64];

    if (!v)
        return;
    if (!cJSON_IsString(v))
        problem(d, pfx, name, "must be a string");
    else if (strlen(v->valuestring) > max) {
        snprintf(msg, sizeof(msg), "must be at most %zu bytes", max);
        problem(d, pfx, name, msg);
    }
}

static void check_url(const cJSON *cfg, const char *name, const char *pfx, cJSON *d)
{
    const cJSON *v = member(cfg, name);

    if (!v)
        problem(d, pfx, name, "required: an http(s) URL");
    else if (!cJSON_IsString(v) || !is_http_url(v->valuestring))
        problem(d, pfx, name, "must be an http:// or https:// URL");
}

static void check_action(trigger_model_action *a, const cJSON *act, int i, cJSON *d)
{
    char pfx[48], cpfx[64];
    const cJSON *t, *p, *cfg, *v;

    snprintf(pfx, sizeof(pfx), "actions[%d].", i);
    snprintf(cpfx, sizeof(cpfx), "actions[%d].config.", i);
    a->priority = 1;
    if (!cJSON_IsObject(act)) {
        char key[48];

        snprintf(key, sizeof(key), "actions[%d]", i);
        problem(d, NULL, key, "must be an object");
        return;
    }
    p = member(act, "priority");
    if (p) {
        int64_t n;

        if (int_of(p, &n) < 0 || !cJSON_IsNumber(p) || n < 1 || n > TRIGGER_MODEL_MAX_PRIORITY)
            problem(d, pfx, "priority", "must be an integer between 1 and 100");
        else
            a->priority = (int)n;
    }
    t = member(act, "action_type");
    a->type = cJSON_IsString(t) ? trigger_model_action_type_parse(t->valuestring) : TRIGGER_ACTION_UNKNOWN;
    if (!t)
        problem(d, pfx, "action_type", "required: telegram, rest or mcp");
    else if (a->type == TRIGGER_ACTION_UNKNOWN)
        problem(d, pfx, "action_type", "must be one of telegram, rest, mcp");
    cfg = member(act, "config");
    if (!cfg) {
        problem(d, pfx, "config", "required: an object");
        return;
    }
    if (!cJSON_IsObject(cfg)) {
        problem(d, pfx, "config", "must be an object");
        return;
    }
    a->config = (cJSON *)cfg;
    switch (a->type) {
    case TRIGGER_ACTION_TELEGRAM: {
        int64_t id;

        v = member(cfg, "chat_id");
        if (!v)
            problem(d, cpfx, "chat_id", "required: a chat id (string or integer)");
        else if (cJSON_IsString(v) ? (!v->valuestring[0] || strlen(v->valuestring) > 128)
                                   : (!cJSON_IsNumber(v) || int_of(v, &id) < 0))
            problem(d, cpfx, "chat_id", "must be a non-empty string or an integer");
        check_str_member(cfg, "message_template", cpfx, d, 4096);
        v = member(cfg, "parse_mode");
        if (v && (!cJSON_IsString(v) || (strcmp(v->valuestring, "Markdown") &&
                                         strcmp(v->valuestring, "MarkdownV2") && strcmp(v->valuestring, "HTML"))))
            problem(d, cpfx, "parse_mode", "must be one of Markdown, MarkdownV2, HTML");
        break;
    }
    case TRIGGER_ACTION_REST: {
        const cJSON *h;

        v = member(cfg, "method");
        if (v && (!cJSON_IsString(v) ||
                  (strcmp(v->valuestring, "GET") && strcmp(v->valuestring, "POST") && strcmp(v->valuestring, "PUT") &&
                   strcmp(v->valuestring, "PATCH") && strcmp(v->valuestring, "DELETE"))))
            problem(d, cpfx, "method", "must be one of GET, POST, PUT, PATCH, DELETE");
        check_url(cfg, "url", cpfx, d);
        v = member(cfg, "headers");
        if (v && !cJSON_IsObject(v))
            problem(d, cpfx, "headers", "must be an object of strings");
        else if (v) {
            cJSON_ArrayForEach(h, v)
            {
                if (!cJSON_IsString(h) || !h->string[0] || strpbrk(h->string, ":\r\n") ||
                    strpbrk(h->valuestring, "\r\n")) {
                    char key[160];

                    snprintf(key, sizeof(key), "headers.%.100s", h->string);
                    problem(d, cpfx, key, "must be a string header value (no line breaks) under a valid name");
                }
            }
        }
        v = member(cfg, "body_template");
        if (v && !cJSON_IsString(v) && !cJSON_IsObject(v) && !cJSON_IsArray(v))
            problem(d, cpfx, "body_template", "must be a string or a JSON object");
        v = member(cfg, "timeout_ms");
        if (v) {
            int64_t n;

            if (!cJSON_IsNumber(v) || int_of(v, &n) < 0 || n < 1 || n > TRIGGER_MODEL_MAX_TIMEOUT_MS)
                problem(d, cpfx, "timeout_ms", "must be an integer between 1 and 300000");
        }
        break;
    }
    case TRIGGER_ACTION_MCP:
        check_url(cfg, "server_url", cpfx, d);
        v = member(cfg, "tool");
        if (!v)
            problem(d, cpfx, "tool", "required: a tool name");
        else if (!cJSON_IsString(v) || !v->valuestring[0] || strlen(v->valuestring) > 256)
            problem(d, cpfx, "tool", "must be a non-empty string");
        v = member(cfg, "arguments_template");
        if (v && !cJSON_IsObject(v) && !cJSON_IsString(v))
            problem(d, cpfx, "arguments_template", "must be an object or a string");
        break;
    default:
        break;
    }
}

void trigger_model_def_free(trigger_model_def *def)
{
    def_priv *p;

    if (!def)
        return;
    p = def->priv_;
    if (p) {
        cJSON_Delete(p->doc);
        free(p->vals);
        free(p);
    }
    free(def->conds);
    free(def->actions);
    free(def);
}

static int blank(const char *s)
{
    for (; *s; s++)
        if (*s != ' ' && *s != '\t' && *s != '\r' && *s != '\n')
            return 0;
    return 1;
}

trigger_model_def *trigger_model_parse(const cJSON *body, cJSON *details)
{
    trigger_model_def *def = NULL;
    def_priv *p = NULL;
    const cJSON *v, *conds, *acts;
    int before = cJSON_GetArraySize(details);

    if (!cJSON_IsObject(body)) {
        problem(details, NULL, "body", "must be a JSON object");
        return NULL;
    }
    if (!(def = calloc(1, sizeof(*def))) || !(p = calloc(1, sizeof(*p))))
        goto fail;
    def->priv_ = p;
    if (!(p->doc = cJSON_Duplicate(body, 1)))
        goto fail;
    body = p->doc;

    v = member(body, "name");
    if (!v)
        problem(details, NULL, "name", "required");
    else if (!cJSON_IsString(v) || blank(v->valuestring))
        problem(details, NULL, "name", "must be a non-empty string");
    else if (strlen(v->valuestring) > TRIGGER_MODEL_MAX_NAME)
        problem(details, NULL, "name", "must be at most 200 bytes");
    else
        def->name = v->valuestring;

    v = member(body, "description");
    if (v && !cJSON_IsString(v))
        problem(details, NULL, "description", "must be a string");
    else if (v && strlen(v->valuestring) > TRIGGER_MODEL_MAX_DESCRIPTION)
        problem(details, NULL, "description", "must be at most 2000 bytes");
    else if (v)
        def->description = v->valuestring;

    v = member(body, "chain_id");
    if (!v)
        problem(details, NULL, "chain_id", "required");
    else if (!cJSON_IsNumber(v) || int_of(v, &def->chain_id) < 0 || def->chain_id < 1 || def->chain_id > 9007199254740991LL)
        problem(details, NULL, "chain_id", "must be a positive integer");

    v = member(body, "registry");
    if (!v)
        problem(details, NULL, "registry", "required");
    else if (!cJSON_IsString(v) || !event_model_registry_valid(v->valuestring))
        problem(details, NULL, "registry", "must be one of identity, reputation, validation");
    else
        def->registry = v->valuestring;

    def->enabled = 1;
    v = member(body, "enabled");
    if (v && !cJSON_IsBool(v))
        problem(details, NULL, "enabled", "must be a boolean");
    else if (v)
        def->enabled = cJSON_IsTrue(v);

    conds = member(body, "conditions");
    if (!conds)
        problem(details, NULL, "conditions", "required: an array (may be empty)");
    else if (!cJSON_IsArray(conds))
        problem(details, NULL, "conditions", "must be an array");
    else if (cJSON_GetArraySize(conds) > TRIGGER_MODEL_MAX_CONDITIONS)
        problem(details, NULL, "conditions", "must have at most 32 conditions");
    else if ((def->ncond = cJSON_GetArraySize(conds)) > 0) {
        const cJSON *c;
        int i = 0;

        if (!(def->conds = calloc((size_t)def->ncond, sizeof(*def->conds))) ||
            !(p->vals = calloc((size_t)def->ncond, sizeof(*p->vals))))
            goto fail;
        cJSON_ArrayForEach(c, conds)
        {
            check_condition(&def->conds[i], c, i, details, p->vals[i]);
            i++;
        }
        if (trigger_model_def_stateful_count(def) > TRIGGER_MODEL_MAX_STATEFUL)
            problem(details, NULL, "conditions",
                    "must have at most " TM_STR(TRIGGER_MODEL_MAX_STATEFUL) " stateful conditions (ema_threshold, "
                    "rate_limit)");
    }

    acts = member(body, "actions");
    if (!acts)
        problem(details, NULL, "actions", "required: an array with at least one action");
    else if (!cJSON_IsArray(acts))
        problem(details, NULL, "actions", "must be an array");
    else if (cJSON_GetArraySize(acts) < 1)
        problem(details, NULL, "actions", "must have at least one action");
    else if (cJSON_GetArraySize(acts) > TRIGGER_MODEL_MAX_ACTIONS)
        problem(details, NULL, "actions", "must have at most 16 actions");
    else {
        const cJSON *a;
        int i = 0;

        def->naction = cJSON_GetArraySize(acts);
        if (!(def->actions = calloc((size_t)def->naction, sizeof(*def->actions))))
            goto fail;
        cJSON_ArrayForEach(a, acts)
        {
            check_action(&def->actions[i], a, i, details);
            i++;
        }
    }
    if (cJSON_GetArraySize(details) != before)
        goto fail;
    return def;
fail:
    if (!def || !p)
        free(p);
    trigger_model_def_free(def);
    return NULL;
}

int trigger_model_validate(const cJSON *body, cJSON **details_out)
{
    cJSON *d = cJSON_CreateObject();
    trigger_model_def *def;

    *details_out = NULL;
    if (!d)
        return -1;
    def = trigger_model_parse(body, d);
    if (def) {
        trigger_model_def_free(def);
        cJSON_Delete(d);
        return 0;
    }
    if (!cJSON_GetArraySize(d))
        cJSON_AddStringToObject(d, "body", "could not be validated (out of memory)");
    *details_out = d;
    return -1;
}

int trigger_model_def_stateful_count(const trigger_model_def *def)
{
    int n = 0;

    for (int i = 0; def && i < def->ncond; i++)
        if (def->conds[i].type == TRIGGER_COND_EMA_THRESHOLD || def->conds[i].type == TRIGGER_COND_RATE_LIMIT)
            n++;
    return n;
}

int trigger_model_def_is_stateful(const trigger_model_def *def)
{
    return trigger_model_def_stateful_count(def) > 0;
}

int trigger_model_check_user_limits(long long others, long long others_stateful, const trigger_model_def *def,
                                    int creating, cJSON *details)
{
    char msg[160];
    int rc = 0, mine = trigger_model_def_stateful_count(def);

    if (creating && others >= TRIGGER_MODEL_MAX_TRIGGERS_PER_USER) {
        snprintf(msg, sizeof(msg), "a user may have at most %d triggers (this one would be number %lld)",
                 TRIGGER_MODEL_MAX_TRIGGERS_PER_USER, others + 1);
        problem(details, NULL, "triggers", msg);
        rc = -1;
    }
    if (mine && others_stateful + mine > TRIGGER_MODEL_MAX_STATEFUL_PER_USER) {
        snprintf(msg, sizeof(msg),
                 "a user's triggers may have at most %d stateful conditions (ema_threshold, rate_limit) in all; "
                 "the others have %lld, this one %d",
                 TRIGGER_MODEL_MAX_STATEFUL_PER_USER, others_stateful, mine);
        problem(details, NULL, "conditions", msg);
        rc = -1;
    }
    return rc;
}

int trigger_model_is_stateful(const cJSON *conditions)
{
    const cJSON *c;

    cJSON_ArrayForEach(c, conditions)
    {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(c, "condition_type");
        trigger_model_cond_type ty = cJSON_IsString(t) ? trigger_model_condition_type_parse(t->valuestring)
                                                       : TRIGGER_COND_UNKNOWN;

        if (ty == TRIGGER_COND_EMA_THRESHOLD || ty == TRIGGER_COND_RATE_LIMIT)
            return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Evaluation.                                                          */

typedef struct {
    trigger_model_cond_type type;
    trigger_model_op op;
    int never;        /* bad stored row: never matches */
    int tag2;         /* tag_equals: field is tag2 */
    int64_t agent;    /* agent_id_equals */
    char *str;        /* event_type_equals / tag_equals value */
    double num;       /* threshold */
    int64_t window;   /* ema window_size, rate_limit seconds */
    double alpha;     /* ema */
    int reset;        /* rate_limit reset_on_trigger */
    int64_t bucket_s; /* rate_limit: seconds per time bucket */
    int nb;           /* rate_limit: buckets in the window */
    int idx;          /* index in the array (state key) */
} mcond;

struct trigger_model_matcher {
    int n;
    mcond *c;
    int stateful;
    int never;
    const char *etype;
    int has_agent;
    int64_t agent;
};

void trigger_model_matcher_free(trigger_model_matcher *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n; i++)
        free(m->c[i].str);
    free(m->c);
    free(m);
}

static void compile_bad(mcond *c, const char *trigger_id, int idx, const char *why, const char *type)
{
    char a[128], b[128], t[64];

    c->never = 1;
    log_event(LOG_WARN, "trigger condition never matches", "\"trigger_id\":\"%s\",\"index\":%d,"
              "\"condition_type\":\"%s\",\"reason\":\"%s\"",
              log_escape(a, sizeof(a), trigger_id ? trigger_id : ""), idx, log_escape(t, sizeof(t), type),
              log_escape(b, sizeof(b), why));
}

static void compile_one(mcond *c, const cJSON *cond, int idx, const char *tid)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(cond, "condition_type");
    const cJSON *op = cJSON_GetObjectItemCaseSensitive(cond, "operator");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cond, "value");
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(cond, "field");
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(cond, "config");
    const char *tname = cJSON_IsString(t) ? t->valuestring : "";

    c->idx = idx;
    c->type = trigger_model_condition_type_parse(cJSON_IsString(t) ? t->valuestring : NULL);
    c->op = cJSON_IsString(op) ? trigger_model_op_parse(op->valuestring) : TRIGGER_OP_NONE;
    switch (c->type) {
    case TRIGGER_COND_UNKNOWN:
        compile_bad(c, tid, idx, "unknown condition type", tname);
        break;
    case TRIGGER_COND_AGENT_ID_EQUALS:
        if (int_of(v, &c->agent) < 0)
            compile_bad(c, tid, idx, "value is not an integer", tname);
        break;
    case TRIGGER_COND_EVENT_TYPE_EQUALS:
    case TRIGGER_COND_TAG_EQUALS:
        if (!cJSON_IsString(v) || !(c->str = strdup(v->valuestring))) {
            compile_bad(c, tid, idx, "value is not a string", tname);
            break;
        }
        if (c->type == TRIGGER_COND_TAG_EQUALS) {
            if (cJSON_IsString(f) && !strcmp(f->valuestring, "tag2"))
                c->tag2 = 1;
            else if (!cJSON_IsString(f) || strcmp(f->valuestring, "tag1"))
                compile_bad(c, tid, idx, "field is not tag1 or tag2", tname);
        }
        break;
    case TRIGGER_COND_SCORE_THRESHOLD:
    case TRIGGER_COND_EMA_THRESHOLD:
    case TRIGGER_COND_RATE_LIMIT:
        if (c->op == TRIGGER_OP_NONE) {
            compile_bad(c, tid, idx, "bad operator", tname);
            break;
        }
        if (num_of(v, &c->num) < 0) {
            compile_bad(c, tid, idx, "value is not a number", tname);
            break;
        }
        if (c->type == TRIGGER_COND_EMA_THRESHOLD) {
            if (int_of(cJSON_GetObjectItemCaseSensitive(cfg, "window_size"), &c->window) < 0 || c->window < 1 ||
                c->window > TRIGGER_MODEL_MAX_WINDOW_SIZE) {
                compile_bad(c, tid, idx, "bad config.window_size", tname);
                break;
            }
            c->alpha = 2.0 / ((double)c->window + 1.0);
        } else if (c->type == TRIGGER_COND_RATE_LIMIT) {
            const cJSON *tw = cJSON_GetObjectItemCaseSensitive(cfg, "time_window");

            if (!cJSON_IsString(tw) || trigger_model_parse_window(tw->valuestring, &c->window) < 0 || c->num < 0 ||
                c->num > TRIGGER_MODEL_MAX_RATE) {
                compile_bad(c, tid, idx, "bad config.time_window or value", tname);
                break;
            }
            c->reset = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(cfg, "reset_on_trigger"));
            c->bucket_s = (c->window + TRIGGER_MODEL_RATE_BUCKETS - 1) / TRIGGER_MODEL_RATE_BUCKETS;
            c->nb = (int)((c->window + c->bucket_s - 1) / c->bucket_s);
        }
        break;
    default:
        break;
    }
}

static int is_stateful_type(trigger_model_cond_type t)
{
    return t == TRIGGER_COND_EMA_THRESHOLD || t == TRIGGER_COND_RATE_LIMIT;
}

static int stateful_count_of(const trigger_model_matcher *m)
{
    int k = 0;

    for (int i = 0; i < m->n; i++)
        k += is_stateful_type(m->c[i].type);
    return k;
}

trigger_model_matcher *trigger_model_matcher_new(const cJSON *conditions, const char *trigger_id)
{
    trigger_model_matcher *m = calloc(1, sizeof(*m));
    const cJSON *cond;
    int n = cJSON_IsArray(conditions) ? cJSON_GetArraySize(conditions) : 0, i = 0;

    if (!m)
        return NULL;
    if (n > 0 && !(m->c = calloc((size_t)n, sizeof(*m->c)))) {
        free(m);
        return NULL;
    }
    m->n = n;
    if (n > 0) {
        cJSON_ArrayForEach(cond, conditions)
        {
            mcond *c = &m->c[i];

            compile_one(c, cond, i, trigger_id);
            if (c->never)
                m->never = 1;
            if (c->type == TRIGGER_COND_EMA_THRESHOLD || c->type == TRIGGER_COND_RATE_LIMIT)
                m->stateful = 1;
            if (!c->never && c->type == TRIGGER_COND_EVENT_TYPE_EQUALS && !m->etype)
                m->etype = c->str;
            if (!c->never && c->type == TRIGGER_COND_AGENT_ID_EQUALS && !m->has_agent) {
                m->has_agent = 1;
                m->agent = c->agent;
            }
            i++;
        }
    }
    if (stateful_count_of(m) > TRIGGER_MODEL_MAX_STATEFUL) {
        char a[128];

        /* The gateway refuses such a trigger; a stored one (written before
         * the limit, or by hand) must not cost every tenant's matching. */
        m->never = 1;
        log_event(LOG_WARN, "trigger never matches", "\"trigger_id\":\"%s\",\"reason\":\"more than %d stateful "
                  "conditions\"", log_escape(a, sizeof(a), trigger_id ? trigger_id : ""), TRIGGER_MODEL_MAX_STATEFUL);
    }
    return m;
}

int trigger_model_matcher_stateful(const trigger_model_matcher *m)
{
    return m && m->stateful;
}

int trigger_model_matcher_never(const trigger_model_matcher *m)
{
    return m && m->never;
}

const char *trigger_model_matcher_event_type(const trigger_model_matcher *m)
{
    return m ? m->etype : NULL;
}

int trigger_model_matcher_agent_id(const trigger_model_matcher *m, int64_t *agent_id)
{
    if (!m || !m->has_agent)
        return 0;
    *agent_id = m->agent;
    return 1;
}

static int stateless_ok(const mcond *c, const cJSON *event)
{
    int64_t x;
    const char *s;

    switch (c->type) {
    case TRIGGER_COND_AGENT_ID_EQUALS:
        return event_model_get_i64(event, "agent_id", &x) == 0 && x == c->agent;
    case TRIGGER_COND_EVENT_TYPE_EQUALS:
        return (s = jget_str(event, "event_type")) && !strcmp(s, c->str);
    case TRIGGER_COND_TAG_EQUALS:
        return (s = jget_str(event, c->tag2 ? "tag2" : "tag1")) && !strcmp(s, c->str);
    case TRIGGER_COND_SCORE_THRESHOLD:
        return event_model_get_i64(event, "score", &x) == 0 && trigger_model_compare((double)x, c->op, c->num);
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------ */
/* State.                                                               */

/* The state of one condition; only the stateful ones use theirs. */
typedef struct {
    int fed;       /* an event reached the condition since the state began */
    double ema;    /* ema_threshold */
    int64_t count; /* ema_threshold: scores seen */
    /* rate_limit: events per time bucket (bucket index = time / bucket_s),
     * a ring of nb buckets whose newest is `head`; sum = the ring's total. */
    int64_t head, sum;
    int64_t *ring;
} cstate;

struct trigger_model_state {
    const trigger_model_matcher *m;
    cstate *c;
};

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;

    if (a % b && (a < 0) != (b < 0))
        q--;
    return q;
}

static int64_t *ring_at(const mcond *c, const cstate *s, int64_t bucket)
{
    int64_t k = bucket % c->nb;

    return &s->ring[k < 0 ? k + c->nb : k];
}

/* Counts an event of time `t` into a rate_limit state and returns the
 * events of its window that the state holds, this one included: the
 * buckets from the oldest kept up to the event's own. An event older than
 * every kept bucket counts alone and is not kept. O(1) for events in time
 * order (the ring advances by the buckets passed, at most nb), O(nb) for
 * an event that arrives after newer ones. */
static int64_t rate_add(const mcond *c, cstate *s, int64_t t)
{
    int64_t b = floor_div(t, c->bucket_s), n = 0;

    if (!s->fed) {
        s->fed = 1;
        s->head = b;
    }
    if (b > s->head) {
        if (b - s->head >= c->nb) {
            memset(s->ring, 0, (size_t)c->nb * sizeof(*s->ring));
            s->sum = 0;
        } else {
            for (int64_t k = s->head + 1; k <= b; k++) {
                int64_t *x = ring_at(c, s, k);

                s->sum -= *x;
                *x = 0;
            }
        }
        s->head = b;
    }
    if (b <= s->head - c->nb)
        return 1;
    (*ring_at(c, s, b))++;
    s->sum++;
    if (b == s->head)
        return s->sum;
    for (int64_t k = s->head - c->nb + 1; k <= b; k++)
        n += *ring_at(c, s, k);
    return n;
}

static const cJSON *entry_of(const cJSON *stored, const mcond *c)
{
    char key[16];
    const cJSON *e, *t, *p;
    const char *pname = c->type == TRIGGER_COND_EMA_THRESHOLD ? "window_size" : "window_s";

    snprintf(key, sizeof(key), "%d", c->idx);
    e = cJSON_GetObjectItemCaseSensitive(stored, key);
    t = cJSON_GetObjectItemCaseSensitive(e, "type");
    p = cJSON_GetObjectItemCaseSensitive(e, pname);
    /* An entry of another type or window (the trigger was edited) is
     * stale: the state restarts. */
    if (!cJSON_IsObject(e) || !cJSON_IsString(t) || strcmp(t->valuestring, trigger_model_condition_type_name(c->type)) ||
        !cJSON_IsNumber(p) || p->valuedouble != (double)c->window)
        return NULL;
    return e;
}

static void restore_ema(cstate *s, const cJSON *e)
{
    const cJSON *ema = cJSON_GetObjectItemCaseSensitive(e, "ema");
    const cJSON *cnt = cJSON_GetObjectItemCaseSensitive(e, "count");

    if (cJSON_IsNumber(ema) && isfinite(ema->valuedouble) && cJSON_IsNumber(cnt) && cnt->valuedouble >= 1) {
        s->fed = 1;
        s->ema = ema->valuedouble;
        s->count = (int64_t)cnt->valuedouble;
    }
}

static void restore_rate(const mcond *c, cstate *s, const cJSON *e)
{
    const cJSON *counts = cJSON_GetObjectItemCaseSensitive(e, "counts");
    const cJSON *head = cJSON_GetObjectItemCaseSensitive(e, "head");
    const cJSON *bs = cJSON_GetObjectItemCaseSensitive(e, "bucket_s");
    const cJSON *times = cJSON_GetObjectItemCaseSensitive(e, "times"), *it;

    if (cJSON_IsString(counts) && cJSON_IsNumber(head) && cJSON_IsNumber(bs) &&
        bs->valuedouble == (double)c->bucket_s) {
        const char *p = counts->valuestring;
        int64_t k, fields = 1;

        for (const char *q = p; *q; q++)
            fields += *q == ',';
        if (fields > c->nb)
            return; /* not this condition's: a fresh state */
        s->fed = 1;
        s->head = (int64_t)head->valuedouble;
        for (k = s->head - fields + 1; k <= s->head; k++) {
            char *end;
            long long v = 0;

            if (*p >= '0' && *p <= '9') {
                v = strtoll(p, &end, 10);
                p = end;
            }
            if (v > 0) {
                *ring_at(c, s, k) = v;
                s->sum += v;
            }
            if (*p == ',')
                p++;
            else if (*p)
                break; /* malformed: what was read stays */
        }
        return;
    }
    /* The layout before time buckets (a time per event counted, oldest
     * first): replayed into buckets, so a stored count survives. */
    cJSON_ArrayForEach(it, times)
    {
        if (cJSON_IsNumber(it) && it->valuedouble > 0)
            rate_add(c, s, (int64_t)it->valuedouble);
    }
}

trigger_model_state *trigger_model_state_new(const trigger_model_matcher *m, const cJSON *stored)
{
    trigger_model_state *st;

    if (!m || !(st = calloc(1, sizeof(*st))))
        return NULL;
    st->m = m;
    if (m->n && !(st->c = calloc((size_t)m->n, sizeof(*st->c))))
        goto fail;
    for (int i = 0; i < m->n; i++) {
        const mcond *c = &m->c[i];
        const cJSON *e;

        if (c->never || !is_stateful_type(c->type))
            continue;
        if (c->type == TRIGGER_COND_RATE_LIMIT && !(st->c[i].ring = calloc((size_t)c->nb, sizeof(int64_t))))
            goto fail;
        if (!cJSON_IsObject(stored) || !(e = entry_of(stored, c)))
            continue;
        if (c->type == TRIGGER_COND_EMA_THRESHOLD)
            restore_ema(&st->c[i], e);
        else
            restore_rate(c, &st->c[i], e);
    }
    return st;
fail:
    trigger_model_state_free(st);
    return NULL;
}

void trigger_model_state_free(trigger_model_state *st)
{
    if (!st)
        return;
    for (int i = 0; st->c && i < st->m->n; i++)
        free(st->c[i].ring);
    free(st->c);
    free(st);
}

static int put_i64(buf *out, int64_t v)
{
    char n[24];

    return buf_append(out, n, fmt_i64(n, (long long)v));
}

static int state_print(const trigger_model_state *st, buf *out)
{
    int first = 1, rc = 0;

    rc |= buf_append(out, "{", 1);
    for (int i = 0; i < st->m->n; i++) {
        const mcond *c = &st->m->c[i];
        const cstate *s = &st->c[i];

        if (c->never || !is_stateful_type(c->type) || !s->fed)
            continue;
        if (!first)
            rc |= buf_append(out, ",", 1);
        first = 0;
        rc |= buf_append(out, "\"", 1);
        rc |= put_i64(out, c->idx);
        if (c->type == TRIGGER_COND_EMA_THRESHOLD) {
            char d[40];
            int n = snprintf(d, sizeof(d), "%.17g", s->ema);

            rc |= buf_puts(out, "\":{\"type\":\"ema_threshold\",\"window_size\":");
            rc |= put_i64(out, c->window);
            rc |= buf_puts(out, ",\"ema\":");
            rc |= buf_append(out, d, (size_t)n);
            rc |= buf_puts(out, ",\"count\":");
            rc |= put_i64(out, s->count);
        } else {
            rc |= buf_puts(out, "\":{\"type\":\"rate_limit\",\"window_s\":");
            rc |= put_i64(out, c->window);
            rc |= buf_puts(out, ",\"bucket_s\":");
            rc |= put_i64(out, c->bucket_s);
            rc |= buf_puts(out, ",\"head\":");
            rc |= put_i64(out, s->head);
            /* One field per bucket, oldest first, up to the newest (h);
             * a zero is left empty and leading empty fields are left out:
             * a quiet trigger stores "1". */
            rc |= buf_puts(out, ",\"counts\":\"");
            {
                int64_t k = s->head - c->nb + 1;

                while (k < s->head && !*ring_at(c, s, k))
                    k++;
                for (; k <= s->head; k++) {
                    int64_t v = *ring_at(c, s, k);

                    if (v)
                        rc |= put_i64(out, v);
                    if (k < s->head)
                        rc |= buf_append(out, ",", 1);
                }
            }
            rc |= buf_append(out, "\"", 1);
        }
        rc |= buf_append(out, "}", 1);
    }
    rc |= buf_append(out, "}", 1);
    return rc || out->truncated ? -1 : 0;
}

char *trigger_model_state_text(const trigger_model_state *st, size_t *len)
{
    buf b;

    if (!st)
        return NULL;
    /* 8 conditions of 128 counters of up to 20 digits fit well below. */
    buf_init(&b, 64 * 1024);
    if (state_print(st, &b) < 0) {
        buf_free(&b);
        return NULL;
    }
    if (len)
        *len = b.len;
    return buf_take(&b);
}

/* ------------------------------------------------------------------ */
/* Matching.                                                            */

/* Advances an EMA; returns 1/0 for the comparison. */
static int eval_ema(const mcond *c, cstate *s, const cJSON *event)
{
    int64_t score;

    if (event_model_get_i64(event, "score", &score) < 0)
        return 0;
    if (!s->fed) {
        s->fed = 1;
        s->ema = (double)score;
        s->count = 0;
    } else {
        s->ema = c->alpha * (double)score + (1.0 - c->alpha) * s->ema;
    }
    s->count++;
    return trigger_model_compare(s->ema, c->op, c->num);
}

/* The event's time in seconds: the `timestamp` column (block time, Unix
 * seconds; values that look like milliseconds are scaled), else now. */
static int64_t event_time(const cJSON *event, int64_t now_s)
{
    int64_t t;

    if (event_model_get_i64(event, "timestamp", &t) < 0 || t <= 0)
        return now_s;
    if (t > 100000000000LL)
        t /= 1000;
    return t;
}

int trigger_model_match(const trigger_model_matcher *m, const cJSON *event, trigger_model_state *st, int *changed,
                        int64_t now_s)
{
    int ok = 1;

    if (changed)
        *changed = 0;
    if (!m || m->never)
        return 0;
    for (int i = 0; i < m->n; i++) {
        const mcond *c = &m->c[i];

        if (is_stateful_type(c->type))
            continue;
        if (!stateless_ok(c, event))
            return 0;
    }
    if (!m->stateful)
        return 1;
    if (!st || st->m != m)
        return -1;
    /* Every stateful condition sees every event that passed the stateless
     * ones, so each EMA or count is over the same stream of events. */
    for (int i = 0; i < m->n; i++) {
        const mcond *c = &m->c[i];
        int r;

        if (!is_stateful_type(c->type))
            continue;
        if (c->type == TRIGGER_COND_EMA_THRESHOLD)
            r = eval_ema(c, &st->c[i], event);
        else
            r = trigger_model_compare((double)rate_add(c, &st->c[i], event_time(event, now_s)), c->op, c->num);
        if (!r)
            ok = 0;
    }
    if (ok) {
        for (int i = 0; i < m->n; i++) {
            const mcond *c = &m->c[i];

            if (c->type == TRIGGER_COND_RATE_LIMIT && c->reset) {
                memset(st->c[i].ring, 0, (size_t)c->nb * sizeof(int64_t));
                st->c[i].sum = 0;
            }
        }
    }
    if (changed)
        *changed = 1;
    return ok;
}
