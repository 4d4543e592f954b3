#include "authbody.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

/* A string member; adds a problem to `details` and returns NULL when it is
 * missing (and required), not a string, or outside [minlen, maxlen]. */
static const char *auth_str(const cJSON *body, const char *name, int required, size_t minlen, size_t maxlen,
                            cJSON *details)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(body, name);
    char msg[96];
    size_t len;

    if (!it || cJSON_IsNull(it)) {
        if (required)
            cJSON_AddStringToObject(details, name, "required");
        return NULL;
    }
    if (!cJSON_IsString(it)) {
        cJSON_AddStringToObject(details, name, "must be a string");
        return NULL;
    }
    len = strlen(it->valuestring);
    if (len < minlen || len > maxlen) {
        snprintf(msg, sizeof(msg), "length must be %zu to %zu bytes", minlen, maxlen);
        cJSON_AddStringToObject(details, name, msg);
        return NULL;
    }
    return it->valuestring;
}

static int auth_username_ok(const char *s)
{
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-' && *s != '.')
            return 0;
    return 1;
}

/* A deliberately loose check: one '@' with text on both sides, a dot in
 * the domain, no spaces or control characters. Deliverability is not ours
 * to judge. */
static int auth_email_ok(const char *s)
{
    const char *at = strchr(s, '@');

    if (!at || at == s || strchr(at + 1, '@') || !strchr(at + 1, '.') || at[1] == '.' ||
        s[strlen(s) - 1] == '.')
        return 0;
    for (; *s; s++)
        if ((unsigned char)*s <= ' ' || *s == 0x7f)
            return 0;
    return 1;
}

void authbody_lower(char *dst, size_t len, const char *src)
{
    size_t i = 0;

    for (; src[i] && i + 1 < len; i++)
        dst[i] = (char)tolower((unsigned char)src[i]);
    dst[i] = '\0';
}

static int verdict(const cJSON *details, authbody_fields *f)
{
    if (cJSON_GetArraySize(details))
        return -1;
    authbody_lower(f->email_lower, sizeof(f->email_lower), f->email ? f->email : "");
    return 0;
}

int authbody_register(const cJSON *body, cJSON *details, authbody_fields *f)
{
    memset(f, 0, sizeof(*f));
    f->username = auth_str(body, "username", 1, 3, 64, details);
    f->email = auth_str(body, "email", 1, 3, 254, details);
    f->password = auth_str(body, "password", 1, AUTHBODY_MIN_PASSWORD, AUTHBODY_MAX_PASSWORD, details);
    if (f->username && !auth_username_ok(f->username))
        cJSON_AddStringToObject(details, "username", "only letters, digits, '_', '-' and '.'");
    if (f->email && !auth_email_ok(f->email))
        cJSON_AddStringToObject(details, "email", "not an email address");
    return verdict(details, f);
}

int authbody_login(const cJSON *body, cJSON *details, authbody_fields *f)
{
    memset(f, 0, sizeof(*f));
    f->username = auth_str(body, "username", 0, 1, 254, details);
    f->email = auth_str(body, "email", 0, 1, 254, details);
    f->password = auth_str(body, "password", 1, 1, AUTHBODY_MAX_PASSWORD, details);
    if (!f->username && !f->email && !cJSON_GetObjectItemCaseSensitive(details, "username") &&
        !cJSON_GetObjectItemCaseSensitive(details, "email"))
        cJSON_AddStringToObject(details, "username", "username or email is required");
    return verdict(details, f);
}

int authbody_refresh(const cJSON *body, cJSON *details, authbody_fields *f)
{
    memset(f, 0, sizeof(*f));
    f->refresh_token = auth_str(body, "refresh_token", 1, 1, 512, details);
    return verdict(details, f);
}
