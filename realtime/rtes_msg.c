#include "rtes_msg.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <openssl/sha.h>

#include "buf.h"
#include "jget.h"
#include "canonjson.h"
#include "fmt.h"
#include "jsonstr.h"

static const char *const queues[RTES_NKINDS] = {
    "workflow.node.status", "workflow.completion", "workflow.worker.initiated", "execution.token"};

const char *rtes_kind_queue(rtes_kind k)
{
    return (unsigned)k < RTES_NKINDS ? queues[k] : "?";
}

void rtes_msg_clear(rtes_msg *m)
{
    if (!m)
        return;
    free(m->body);
    free(m->member);
    free(m->frame);
    memset(m, 0, sizeof(*m));
}

/* A required (or, with `optional`, possibly absent or null) string member
 * copied into out. Returns 0 or -1 with err. */
static int get_id(const cJSON *o, const char *name, char *out, int optional, char *err, size_t errlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    size_t n;

    out[0] = '\0';
    if (!v || cJSON_IsNull(v)) {
        if (optional)
            return 0;
        snprintf(err, errlen, "missing %s", name);
        return -1;
    }
    if (!cJSON_IsString(v)) {
        snprintf(err, errlen, "%s is not a string", name);
        return -1;
    }
    n = strlen(v->valuestring);
    if (n == 0 && !optional) {
        snprintf(err, errlen, "%s is empty", name);
        return -1;
    }
    if (n >= RTES_ID_MAX) {
        snprintf(err, errlen, "%s is longer than %d bytes", name, RTES_ID_MAX - 1);
        return -1;
    }
    memcpy(out, v->valuestring, n + 1);
    return 0;
}

static int need(const cJSON *o, const char *name, char *err, size_t errlen)
{
    if (cJSON_GetObjectItemCaseSensitive(o, name))
        return 0;
    snprintf(err, errlen, "missing %s", name);
    return -1;
}

/* A required number within +-lim (so that PostgreSQL's bigint takes it). */
static int need_number(const cJSON *o, const char *name, double lim, double *out, char *err, size_t errlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    if (!v) {
        snprintf(err, errlen, "missing %s", name);
        return -1;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || fabs(v->valuedouble) > lim) {
        snprintf(err, errlen, "%s is not a number within +-%g", name, lim);
        return -1;
    }
    if (out)
        *out = v->valuedouble;
    return 0;
}

static int one_of(const cJSON *o, const char *name, const char *const *allowed, char *err, size_t errlen)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    if (!v) {
        snprintf(err, errlen, "missing %s", name);
        return -1;
    }
    if (cJSON_IsString(v))
        for (; *allowed; allowed++)
            if (strcmp(v->valuestring, *allowed) == 0)
                return 0;
    snprintf(err, errlen, "%s is not one of the allowed values", name);
    return -1;
}

static int frame_int(const cJSON *f, const char *name, long long *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(f, name);

    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < -2147483648.0 ||
        v->valuedouble > 2147483647.0)
        return -1;
    *out = (long long)v->valuedouble;
    return 0;
}

/* RFC 4122's OID namespace, 6ba7b812-9dad-11d1-80b4-00c04fd430c8. */
static const unsigned char oid_ns[16] = {0x6b, 0xa7, 0xb8, 0x12, 0x9d, 0xad, 0x11, 0xd1,
                                         0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8};

/* UUIDv5 of `len` bytes that start with the namespace. */
static void uuid5(const char *ns_and_name, size_t len, char out[37])
{
    unsigned char md[SHA_DIGEST_LENGTH];

    SHA1((const unsigned char *)ns_and_name, len, md);
    md[6] = (unsigned char)((md[6] & 0x0f) | 0x50);
    md[8] = (unsigned char)((md[8] & 0x3f) | 0x80);
    fmt_uuid(out, md);
}

/* The key of a parsed lineage_stack array; see rtes_lineage_uuid. */
static int stack_uuid(const cJSON *stack, char out[37], char *err, size_t errlen)
{
    const cJSON *f;
    buf b;
    int rc = -1;

    buf_init(&b, RTES_BODY_MAX);
    if (!cJSON_IsArray(stack)) {
        snprintf(err, errlen, "lineage_stack is not an array");
        goto out;
    }
    if (buf_append(&b, oid_ns, sizeof(oid_ns)) < 0 || buf_puts(&b, "[") < 0)
        goto oom;
    cJSON_ArrayForEach(f, stack)
    {
        const cJSON *split = cJSON_GetObjectItemCaseSensitive(f, "split_node_id");
        const cJSON *branch = cJSON_GetObjectItemCaseSensitive(f, "branch_id");
        long long idx, total;
        char num[FMT_I64_MAX];

        if (!cJSON_IsObject(f) || !cJSON_IsString(split) || !cJSON_IsString(branch) ||
            frame_int(f, "item_index", &idx) < 0 || frame_int(f, "total_items", &total) < 0) {
            snprintf(err, errlen,
                     "lineage_stack entries need split_node_id, branch_id (strings), item_index and total_items (integers)");
            goto out;
        }
        if ((f != stack->child && buf_puts(&b, ",") < 0) || buf_puts(&b, "{\"split_node_id\":") < 0 ||
            canonjson_string(&b, split->valuestring) < 0 || buf_puts(&b, ",\"branch_id\":") < 0 ||
            canonjson_string(&b, branch->valuestring) < 0 || buf_puts(&b, ",\"item_index\":") < 0)
            goto oom;
        if (buf_append(&b, num, fmt_i64(num, idx)) < 0 || buf_puts(&b, ",\"total_items\":") < 0 ||
            buf_append(&b, num, fmt_i64(num, total)) < 0 || buf_puts(&b, "}") < 0)
            goto oom;
    }
    if (buf_puts(&b, "]") < 0)
        goto oom;
    if (b.truncated) {
        snprintf(err, errlen, "lineage_stack is too large");
        goto out;
    }
    uuid5(b.p, b.len, out);
    rc = 0;
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
out:
    buf_free(&b);
    return rc;
}

int rtes_lineage_uuid(const char *stack_json, char out[37], char *err, size_t errlen)
{
    cJSON *j = stack_json ? cJSON_Parse(stack_json) : NULL;
    int rc;

    if (!j) {
        snprintf(err, errlen, "lineage_stack is not JSON");
        return -1;
    }
    rc = stack_uuid(j, out, err, errlen);
    cJSON_Delete(j);
    return rc;
}

static int node_status(const cJSON *o, rtes_msg *m, char *err, size_t errlen)
{
    static const char *const st[] = {"running", "success", "failed", "waiting", NULL};
    const cJSON *stack = cJSON_GetObjectItemCaseSensitive(o, "lineage_stack");
    char node_name[RTES_ID_MAX], when[RTES_ID_MAX];

    if (get_id(o, "workflow_id", m->workflow_id, 0, err, errlen) < 0 ||
        get_id(o, "execution_id", m->execution_id, 0, err, errlen) < 0 ||
        get_id(o, "node_id", m->node_id, 0, err, errlen) < 0 ||
        need(o, "node_name", err, errlen) < 0 || get_id(o, "node_name", node_name, 1, err, errlen) < 0 ||
        one_of(o, "status", st, err, errlen) < 0 || get_id(o, "executed_at", when, 0, err, errlen) < 0 ||
        need_number(o, "duration_ms", 9e15, NULL, err, errlen) < 0 ||
        get_id(o, "lineage_hash", m->lineage_key, 1, err, errlen) < 0)
        return -1;
    if (m->lineage_key[0])
        return 0;
    if (stack && !cJSON_IsNull(stack) && cJSON_GetArraySize(stack) > 0) {
        char key[37];

        if (stack_uuid(stack, key, err, errlen) < 0)
            return -1;
        memcpy(m->lineage_key, key, sizeof(key));
        return 0;
    }
    if (stack && !cJSON_IsNull(stack) && !cJSON_IsArray(stack)) {
        snprintf(err, errlen, "lineage_stack is not an array");
        return -1;
    }
    memcpy(m->lineage_key, "default", sizeof("default"));
    return 0;
}

static int completion(const cJSON *o, rtes_msg *m, char *err, size_t errlen)
{
    static const char *const st[] = {"completed", "failed", "halted", NULL};
    char when[RTES_ID_MAX];
    const cJSON *why = cJSON_GetObjectItemCaseSensitive(o, "failure_reason");

    if (get_id(o, "workflow_id", m->workflow_id, 0, err, errlen) < 0 ||
        get_id(o, "execution_id", m->execution_id, 0, err, errlen) < 0 ||
        one_of(o, "status", st, err, errlen) < 0 || need(o, "final_context", err, errlen) < 0 ||
        get_id(o, "completed_at", when, 0, err, errlen) < 0 ||
        need_number(o, "total_duration_ms", 9e15, NULL, err, errlen) < 0)
        return -1;
    if (why && !cJSON_IsNull(why) && !cJSON_IsString(why)) {
        snprintf(err, errlen, "failure_reason is not a string");
        return -1;
    }
    return 0;
}

static int initiated(const cJSON *o, rtes_msg *m, char *err, size_t errlen)
{
    if (get_id(o, "workflow_id", m->workflow_id, 0, err, errlen) < 0 ||
        get_id(o, "execution_id", m->execution_id, 0, err, errlen) < 0 ||
        get_id(o, "current_node", m->node_id, 0, err, errlen) < 0 ||
        need(o, "workflow_definition", err, errlen) < 0 || need(o, "accumulated_context", err, errlen) < 0)
        return -1;
    return 0;
}

static int token(const cJSON *o, rtes_msg *m, char *err, size_t errlen)
{
    double iat, exp;
    cJSON *t = NULL;

    if (get_id(o, "workflow_id", m->workflow_id, 0, err, errlen) < 0 ||
        get_id(o, "execution_id", m->execution_id, 1, err, errlen) < 0 ||
        get_id(o, "user_id", m->user_id, 0, err, errlen) < 0 ||
        need_number(o, "iat", 9e15, &iat, err, errlen) < 0 || need_number(o, "exp", 9e15, &exp, err, errlen) < 0)
        return -1;
    m->exp = (long long)exp;
    /* The member as the original wrote it (serde's field order), so that
     * one token given twice is one member. */
    t = cJSON_CreateObject();
    if (!t || !(m->execution_id[0] ? cJSON_AddStringToObject(t, "execution_id", m->execution_id)
                                   : cJSON_AddNullToObject(t, "execution_id")) ||
        !cJSON_AddStringToObject(t, "workflow_id", m->workflow_id) ||
        !cJSON_AddNumberToObject(t, "iat", (double)(long long)iat) ||
        !cJSON_AddNumberToObject(t, "exp", (double)m->exp) || !cJSON_AddStringToObject(t, "user_id", m->user_id) ||
        !(m->member = cJSON_PrintUnformatted(t))) {
        cJSON_Delete(t);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    cJSON_Delete(t);
    return 0;
}

/* What jsonb refuses and cJSON takes: \u0000 in a string (checked on the
 * text, since cJSON ends the string there) and numbers beyond a double's
 * range (PostgreSQL's numeric ends at an exponent of 131072; a double's
 * range is the stricter, simpler bound). Stored messages are cast to jsonb
 * when read, so one such value would break its execution's document. */
static int storable(const char *body, size_t len, char *err, size_t errlen)
{
    for (const char *p = body, *end = body + len; (p = memchr(p, '\\', (size_t)(end - p))) != NULL;) {
        const char *q = p;

        while (q < end && *q == '\\')
            q++;
        if (((q - p) & 1) && end - q >= 5 && memcmp(q, "u0000", 5) == 0) {
            snprintf(err, errlen, "a string holds \\u0000, which PostgreSQL cannot store");
            return -1;
        }
        p = q;
    }
    return 0;
}

static int finite_numbers(const cJSON *o, char *err, size_t errlen)
{
    for (const cJSON *c = o; c; c = c->next) {
        if (cJSON_IsNumber(c) && !isfinite(c->valuedouble)) {
            snprintf(err, errlen, "a number is out of range");
            return -1;
        }
        if (c->child && finite_numbers(c->child, err, errlen) < 0)
            return -1;
    }
    return 0;
}

/* ---- frames, cut from the message text ---- */

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* Past the string that starts at the quote p. */
static const char *skip_string(const char *p, const char *end)
{
    for (p++; p < end; p++) {
        if (*p == '\\')
            p++;
        else if (*p == '"')
            return p + 1;
    }
    return NULL;
}

/* Past the JSON value at p (text already known to be valid JSON). */
static const char *skip_value(const char *p, const char *end)
{
    int depth = 0;

    if (p >= end)
        return NULL;
    if (*p == '"')
        return skip_string(p, end);
    if (*p != '{' && *p != '[') {
        while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' && *p != '\n' &&
               *p != '\r')
            p++;
        return p;
    }
    for (; p < end; p++) {
        if (*p == '"') {
            p = skip_string(p, end);
            if (!p)
                return NULL;
            p--;
        } else if (*p == '{' || *p == '[') {
            depth++;
        } else if (*p == '}' || *p == ']') {
            if (--depth == 0)
                return p + 1;
        }
    }
    return NULL;
}

enum { F_NODE_ID, F_INPUT, F_PARAMETERS, F_OUTPUT, F_STATUS, F_LINEAGE_STACK, F_SPLIT_NODE_ID, F_BRANCH_ID,
       F_ITEM_INDEX, F_TOTAL_ITEMS, F_PROCESSED_COUNT, F_AGGREGATOR_STATE, F_USED_INPUTS, F_COUNT };

static const char *const field_names[F_COUNT] = {
    "node_id", "input", "parameters", "output", "status", "lineage_stack", "split_node_id", "branch_id",
    "item_index", "total_items", "processed_count", "aggregator_state", "used_inputs"};

typedef struct {
    const char *p;
    size_t n;
} span;

/* The top-level members of the object text that frames use (the first of
 * a repeated name, as cJSON takes it). */
static int members(const char *body, size_t len, span *v)
{
    const char *p = body, *end = body + len;

    memset(v, 0, sizeof(*v) * F_COUNT);
    p = skip_ws(p, end);
    if (p >= end || *p != '{')
        return -1;
    p = skip_ws(p + 1, end);
    while (p < end && *p == '"') {
        const char *k = p + 1, *ke = skip_string(p, end), *ve;
        size_t kn;

        if (!ke)
            return -1;
        kn = (size_t)(ke - 1 - k);
        p = skip_ws(ke, end);
        if (p >= end || *p != ':')
            return -1;
        p = skip_ws(p + 1, end);
        ve = skip_value(p, end);
        if (!ve)
            return -1;
        for (int f = 0; f < F_COUNT; f++)
            if (!v[f].p && strlen(field_names[f]) == kn && memcmp(field_names[f], k, kn) == 0) {
                v[f].p = p;
                v[f].n = (size_t)(ve - p);
            }
        p = skip_ws(ve, end);
        if (p < end && *p == ',')
            p = skip_ws(p + 1, end);
    }
    return 0;
}

static int put_span(buf *b, const char *name, const span *s)
{
    if (buf_puts(b, name) < 0)
        return -1;
    return s->p ? buf_append(b, s->p, s->n) : buf_puts(b, "null");
}

int rtes_msg_frame(int node, const char *body, size_t len, const char *key, buf *out)
{
    span v[F_COUNT];

    if (members(body, len, v) < 0)
        return -1;
    if (!node) {
        static const span none = {NULL, 0};

        return buf_puts(out, "{\"node_id\":null,\"input\":null,\"params\":null,\"output\":null") < 0 ||
                       put_span(out, ",\"status\":", v[F_STATUS].p ? &v[F_STATUS] : &none) < 0 ||
                       buf_puts(out, ",\"lineage_hash\":null,\"lineage_stack\":null,\"split_node_id\":null,"
                                     "\"branch_id\":null,\"item_index\":null,\"total_items\":null,"
                                     "\"processed_count\":null,\"aggregator_state\":null,\"used_inputs\":null}") < 0
                   ? -1
                   : 0;
    }
    if (put_span(out, "{\"node_id\":", &v[F_NODE_ID]) < 0 || put_span(out, ",\"input\":", &v[F_INPUT]) < 0 ||
        put_span(out, ",\"params\":", &v[F_PARAMETERS]) < 0 || buf_puts(out, ",\"output\":") < 0)
        return -1;
    if (!v[F_OUTPUT].p || (v[F_OUTPUT].n == 4 && memcmp(v[F_OUTPUT].p, "null", 4) == 0)) {
        if (buf_puts(out, "null") < 0)
            return -1;
    } else if (buf_puts(out, "\"") < 0 || jsonstr_append(out, v[F_OUTPUT].p, v[F_OUTPUT].n) < 0 ||
               buf_puts(out, "\"") < 0) {
        return -1;
    }
    if (put_span(out, ",\"status\":", &v[F_STATUS]) < 0 || buf_puts(out, ",\"lineage_hash\":") < 0)
        return -1;
    if (!key || !*key || strcmp(key, "default") == 0) {
        if (buf_puts(out, "null") < 0)
            return -1;
    } else if (buf_puts(out, "\"") < 0 || jsonstr_puts(out, key) < 0 || buf_puts(out, "\"") < 0) {
        return -1;
    }
    if (put_span(out, ",\"lineage_stack\":", &v[F_LINEAGE_STACK]) < 0 ||
        put_span(out, ",\"split_node_id\":", &v[F_SPLIT_NODE_ID]) < 0 ||
        put_span(out, ",\"branch_id\":", &v[F_BRANCH_ID]) < 0 ||
        put_span(out, ",\"item_index\":", &v[F_ITEM_INDEX]) < 0 ||
        put_span(out, ",\"total_items\":", &v[F_TOTAL_ITEMS]) < 0 ||
        put_span(out, ",\"processed_count\":", &v[F_PROCESSED_COUNT]) < 0 ||
        put_span(out, ",\"aggregator_state\":", &v[F_AGGREGATOR_STATE]) < 0 ||
        put_span(out, ",\"used_inputs\":", &v[F_USED_INPUTS]) < 0 || buf_puts(out, "}") < 0)
        return -1;
    return 0;
}

int rtes_msg_parse(rtes_kind k, const char *data, size_t len, rtes_msg *m, char *err, size_t errlen)
{
    size_t at;
    const char *why;
    cJSON *o = NULL;
    buf b;
    int rc = -1;

    memset(m, 0, sizeof(*m));
    m->kind = k;
    if ((unsigned)k >= RTES_NKINDS) {
        snprintf(err, errlen, "unknown queue");
        return -1;
    }
    if (len > RTES_BODY_MAX) {
        snprintf(err, errlen, "body of %zu bytes is over the limit of %u", len, RTES_BODY_MAX);
        return -1;
    }
    buf_init(&b, RTES_BODY_MAX + RTES_BODY_MAX / 2);
    if (buf_append_utf8(&b, data ? data : "", len) < 0 || buf_reserve(&b, 1) < 0) {
        buf_free(&b);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    m->body_len = b.len;
    m->body = b.len ? buf_take(&b) : strdup("");
    buf_free(&b);
    if (!m->body) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (!(o = jget_parse(m->body, m->body_len, &at, &why))) {
        snprintf(err, errlen, "not JSON (%s at byte %zu)", why, at);
        return -1;
    }
    if (!cJSON_IsObject(o)) {
        snprintf(err, errlen, "not a JSON object");
        goto out;
    }
    if (storable(m->body, m->body_len, err, errlen) < 0 || finite_numbers(o->child, err, errlen) < 0)
        goto out;
    switch (k) {
    case RTES_NODE_STATUS: rc = node_status(o, m, err, errlen); break;
    case RTES_COMPLETION: rc = completion(o, m, err, errlen); break;
    case RTES_INITIATED: rc = initiated(o, m, err, errlen); break;
    case RTES_TOKEN: rc = token(o, m, err, errlen); break;
    default: break;
    }
    if (rc == 0) {
        unsigned char md[SHA256_DIGEST_LENGTH];

        SHA256((const unsigned char *)m->body, m->body_len, md);
        memcpy(m->digest, md, RTES_DIGEST_LEN);
    }
    if (rc == 0 && (k == RTES_NODE_STATUS || k == RTES_COMPLETION)) {
        buf f;

        buf_init(&f, 4 * RTES_BODY_MAX);
        if (rtes_msg_frame(k == RTES_NODE_STATUS, m->body, m->body_len, m->lineage_key, &f) < 0 || f.truncated) {
            buf_free(&f);
            snprintf(err, errlen, "out of memory");
            rc = -1;
        } else {
            m->frame_len = f.len;
            m->frame = buf_take(&f);
            buf_free(&f);
            if (!m->frame) {
                snprintf(err, errlen, "out of memory");
                rc = -1;
            }
        }
    }
out:
    cJSON_Delete(o);
    return rc;
}
