#include "event_model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const event_column event_model_columns[EVENT_MODEL_NCOLS] = {
    {"id", EVENT_COL_TEXT, 1, 1},
    {"chain_id", EVENT_COL_BIGINT, 1, 1},
    {"block_number", EVENT_COL_BIGINT, 0, 1},
    {"block_hash", EVENT_COL_TEXT, 0, 1},
    {"transaction_hash", EVENT_COL_TEXT, 0, 1},
    {"log_index", EVENT_COL_INT, 0, 1},
    {"registry", EVENT_COL_TEXT, 1, 1},
    {"event_type", EVENT_COL_TEXT, 1, 1},
    {"agent_id", EVENT_COL_BIGINT, 0, 1},
    {"timestamp", EVENT_COL_BIGINT, 0, 1},
    {"owner", EVENT_COL_TEXT, 0, 1},
    {"token_uri", EVENT_COL_TEXT, 0, 1},
    {"metadata_key", EVENT_COL_TEXT, 0, 1},
    {"metadata_value", EVENT_COL_TEXT, 0, 1},
    {"client_address", EVENT_COL_TEXT, 0, 1},
    {"feedback_index", EVENT_COL_BIGINT, 0, 1},
    {"score", EVENT_COL_INT, 0, 1},
    {"tag1", EVENT_COL_TEXT, 0, 1},
    {"tag2", EVENT_COL_TEXT, 0, 1},
    {"file_uri", EVENT_COL_TEXT, 0, 1},
    {"file_hash", EVENT_COL_TEXT, 0, 1},
    {"validator_address", EVENT_COL_TEXT, 0, 1},
    {"request_hash", EVENT_COL_TEXT, 0, 1},
    {"response", EVENT_COL_INT, 0, 1},
    {"response_uri", EVENT_COL_TEXT, 0, 1},
    {"response_hash", EVENT_COL_TEXT, 0, 1},
    {"tag", EVENT_COL_TEXT, 0, 1},
    {"created_at", EVENT_COL_TIME, 0, 0},
};

const char *const event_model_types[EVENT_MODEL_NTYPES] = {
    "AgentRegistered",  "MetadataSet",       "NewFeedback",        "FeedbackRevoked",
    "ResponseAppended", "ValidationRequest", "ValidationResponse",
};

static const char *const type_registry[EVENT_MODEL_NTYPES] = {
    "identity", "identity", "reputation", "reputation", "reputation", "validation", "validation",
};

/* 2^53: the largest magnitude a double carries exactly. */
#define EM_EXACT_LIMIT 9007199254740992.0

const event_column *event_model_column(const char *name)
{
    if (!name)
        return NULL;
    for (int i = 0; i < EVENT_MODEL_NCOLS; i++)
        if (strcmp(event_model_columns[i].name, name) == 0)
            return &event_model_columns[i];
    return NULL;
}

int event_model_type_valid(const char *s)
{
    return event_model_registry_of(s) != NULL;
}

int event_model_registry_valid(const char *s)
{
    return s && (strcmp(s, "identity") == 0 || strcmp(s, "reputation") == 0 || strcmp(s, "validation") == 0);
}

const char *event_model_registry_of(const char *event_type)
{
    if (!event_type)
        return NULL;
    for (int i = 0; i < EVENT_MODEL_NTYPES; i++)
        if (strcmp(event_model_types[i], event_type) == 0)
            return type_registry[i];
    return NULL;
}

int event_model_parse_i64(const char *s, int64_t *out)
{
    const char *p = s;
    char *end;
    long long v;

    if (!s || !*s)
        return -1;
    if (*p == '-')
        p++;
    if (!*p)
        return -1;
    for (; *p; p++)
        if (*p < '0' || *p > '9')
            return -1;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || *end)
        return -1;
    *out = (int64_t)v;
    return 0;
}

/* Reads an integer from a JSON number (integral, exact) or decimal string. */
static int em_json_i64(const cJSON *it, int64_t *out)
{
    if (cJSON_IsNumber(it)) {
        double d = it->valuedouble;

        if (!isfinite(d) || d != floor(d) || fabs(d) > EM_EXACT_LIMIT)
            return -1;
        *out = (int64_t)d;
        return 0;
    }
    if (cJSON_IsString(it) || cJSON_IsRaw(it))
        return event_model_parse_i64(it->valuestring, out);
    return -1;
}

int event_model_get_i64(const cJSON *obj, const char *name, int64_t *out)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (!it || cJSON_IsNull(it))
        return -1;
    return em_json_i64(it, out);
}

static void em_problem(cJSON *details, const char *prefix, const char *name, const char *reason)
{
    char key[160];

    snprintf(key, sizeof(key), "%s%s", prefix ? prefix : "", name);
    if (!cJSON_GetObjectItemCaseSensitive(details, key))
        cJSON_AddStringToObject(details, key, reason);
}

/* Checks one column's value; returns the reason or NULL when it is fine. */
static const char *em_check(const event_column *col, const cJSON *it)
{
    int64_t v;

    if (!it || cJSON_IsNull(it))
        return col->required ? "required" : NULL;
    if (col->type == EVENT_COL_TEXT) {
        size_t len;

        if (!cJSON_IsString(it))
            return "must be a string";
        len = strlen(it->valuestring);
        if (strcmp(col->name, "id") == 0) {
            if (len == 0)
                return "must not be empty";
            if (len > EVENT_MODEL_MAX_ID)
                return "too long (max 256 bytes)";
        } else if (len > EVENT_MODEL_MAX_TEXT) {
            return "too long (max 65536 bytes)";
        }
        if (strcmp(col->name, "registry") == 0 && !event_model_registry_valid(it->valuestring))
            return "must be one of identity, reputation, validation";
        if (strcmp(col->name, "event_type") == 0 && !event_model_type_valid(it->valuestring))
            return "must be one of AgentRegistered, MetadataSet, NewFeedback, FeedbackRevoked, "
                   "ResponseAppended, ValidationRequest, ValidationResponse";
        return NULL;
    }
    if (!cJSON_IsNumber(it) && !cJSON_IsString(it))
        return "must be an integer";
    if (em_json_i64(it, &v) < 0)
        return cJSON_IsNumber(it) && it->valuedouble == floor(it->valuedouble) && isfinite(it->valuedouble)
                   ? "out of range (send integers beyond 2^53 as decimal strings)"
                   : "must be an integer";
    if (col->type == EVENT_COL_INT && (v < INT32_MIN || v > INT32_MAX))
        return "out of range (32-bit integer)";
    return NULL;
}

int event_model_validate(const cJSON *ev, cJSON *details, const char *prefix)
{
    int n = 0;

    if (!cJSON_IsObject(ev)) {
        char key[128];

        snprintf(key, sizeof(key), "%s", prefix ? prefix : "event");
        /* "events[3]." names the element itself without the dot. */
        if (key[0] && key[strlen(key) - 1] == '.')
            key[strlen(key) - 1] = '\0';
        if (!cJSON_GetObjectItemCaseSensitive(details, key))
            cJSON_AddStringToObject(details, key, "must be an object");
        return 1;
    }
    for (int i = 0; i < EVENT_MODEL_NINSERT; i++) {
        const event_column *col = &event_model_columns[i];
        const char *why = em_check(col, cJSON_GetObjectItemCaseSensitive(ev, col->name));

        if (why) {
            em_problem(details, prefix, col->name, why);
            n++;
        }
    }
    return n;
}

int event_model_to_params(const cJSON *ev, event_model_params *out)
{
    if (!cJSON_IsObject(ev))
        return -1;
    for (int i = 0; i < EVENT_MODEL_NINSERT; i++) {
        const event_column *col = &event_model_columns[i];
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(ev, col->name);
        int64_t v;

        out->values[i] = NULL;
        if (em_check(col, it))
            return -1;
        if (!it || cJSON_IsNull(it))
            continue;
        if (col->type == EVENT_COL_TEXT) {
            out->values[i] = it->valuestring;
            continue;
        }
        if (em_json_i64(it, &v) < 0)
            return -1;
        snprintf(out->num[i], sizeof(out->num[i]), "%lld", (long long)v);
        out->values[i] = out->num[i];
    }
    return 0;
}

/* An integer column's text as a JSON number: exact doubles as numbers,
 * larger magnitudes as raw digits so nothing is rounded. */
static cJSON *em_int_json(const char *text)
{
    int64_t v;

    if (event_model_parse_i64(text, &v) < 0)
        return cJSON_CreateString(text);
    if (v >= -(int64_t)EM_EXACT_LIMIT && v <= (int64_t)EM_EXACT_LIMIT)
        return cJSON_CreateNumber((double)v);
    return cJSON_CreateRaw(text);
}

cJSON *event_model_from_row(const PGresult *res, int row)
{
    cJSON *o = cJSON_CreateObject();

    if (!o)
        return NULL;
    for (int i = 0; i < EVENT_MODEL_NCOLS; i++) {
        const event_column *col = &event_model_columns[i];
        int f = PQfnumber(res, col->name);
        cJSON *v;

        if (f < 0)
            continue;
        if (PQgetisnull(res, row, f))
            v = cJSON_CreateNull();
        else if (col->type == EVENT_COL_INT || col->type == EVENT_COL_BIGINT)
            v = em_int_json(PQgetvalue(res, row, f));
        else
            v = cJSON_CreateString(PQgetvalue(res, row, f));
        if (!v || !cJSON_AddItemToObject(o, col->name, v)) {
            cJSON_Delete(v);
            cJSON_Delete(o);
            return NULL;
        }
    }
    return o;
}
