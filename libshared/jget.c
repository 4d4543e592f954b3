/* jget: see jget.h. */
#include "jget.h"

#include "buf.h"

const char *jget_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* The offset of the first control character JSON does not allow (inside
 * a string any below 0x20; outside one any but the four whitespaces), or n. */
static size_t jget_bad_control(const char *s, size_t n)
{
    int in_str = 0;

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];

        if (in_str) {
            if (c < 0x20)
                return i;
            if (c == '\\')
                i++;
            else if (c == '"')
                in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c < 0x20 && c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            return i;
        }
    }
    return n;
}

static cJSON *jget_fail(cJSON *j, size_t off, const char *what, size_t *at, const char **why)
{
    cJSON_Delete(j);
    if (at)
        *at = off;
    if (why)
        *why = what;
    return NULL;
}

cJSON *jget_parse(const char *s, size_t n, size_t *at, const char **why)
{
    const char *end = NULL;
    size_t off;
    cJSON *j;

    if ((off = buf_utf8_valid(s, n)) < n)
        return jget_fail(NULL, off, "invalid UTF-8", at, why);
    if ((off = jget_bad_control(s, n)) < n)
        return jget_fail(NULL, off, "a control character", at, why);
    if (!(j = cJSON_ParseWithLengthOpts(s, n, &end, 0))) {
        off = end && end >= s && end <= s + n ? (size_t)(end - s) : 0;
        return jget_fail(NULL, off, "malformed JSON", at, why);
    }
    while (end < s + n && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r'))
        end++;
    if (end != s + n)
        return jget_fail(j, (size_t)(end - s), "trailing bytes", at, why);
    return j;
}
