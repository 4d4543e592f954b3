/* The gateway's auth bodies (POST /api/v1/auth/{register,login,refresh,
 * logout}): JSON parsed as httpd_req_json does, then the field checks of
 * api-gateway/authbody.c. An accepted register body has a username of 3 to
 * 64 letters, digits, '_', '-', '.', one '@' in an email without blanks and
 * a password of 8 to 256 bytes; a refused one names each bad field with a
 * string. (Trigger, chain-event and SSE bodies have their own targets.) */
#include <ctype.h>

#include <cjson/cJSON.h>

#include "authbody.h"
#include "fuzz.h"
#include "jget.h"

static void refused(const cJSON *details)
{
    const cJSON *it;

    if (!cJSON_GetArraySize(details))
        abort();
    cJSON_ArrayForEach(it, details) if (!cJSON_IsString(it) || !it->string) abort();
}

static void lower_ok(const authbody_fields *f)
{
    const char *e = f->email ? f->email : "";
    size_t i;

    for (i = 0; e[i] && i < sizeof(f->email_lower) - 1; i++)
        if (f->email_lower[i] != (char)tolower((unsigned char)e[i]))
            abort();
    if (f->email_lower[i])
        abort();
}

static void register_ok(const authbody_fields *f)
{
    size_t un = strlen(f->username), pn = strlen(f->password);
    const char *at = strchr(f->email, '@');

    if (un < 3 || un > 64 ||
        strspn(f->username, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") != un)
        abort();
    if (!at || at == f->email || strchr(at + 1, '@') || strlen(f->email) > 254 || strpbrk(f->email, " \t\r\n"))
        abort();
    if (pn < AUTHBODY_MIN_PASSWORD || pn > AUTHBODY_MAX_PASSWORD)
        abort();
    lower_ok(f);
}

static void login_ok(const authbody_fields *f)
{
    if ((!f->username && !f->email) || !f->password || strlen(f->password) > AUTHBODY_MAX_PASSWORD)
        abort();
    lower_ok(f);
}

static void refresh_ok(const authbody_fields *f)
{
    if (!f->refresh_token || !f->refresh_token[0] || strlen(f->refresh_token) > 512)
        abort();
}

static void check(int (*parse)(const cJSON *, cJSON *, authbody_fields *), void (*ok)(const authbody_fields *),
                  const cJSON *body)
{
    cJSON *d = cJSON_CreateObject();
    authbody_fields f;

    if (!d)
        return;
    if (parse(body, d, &f) == 0)
        ok(&f);
    else
        refused(d);
    cJSON_Delete(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *body = jget_parse((const char *)data, size, NULL, NULL);

    if (!body)
        return 0;
    check(authbody_register, register_ok, body);
    check(authbody_login, login_ok, body);
    check(authbody_refresh, refresh_ok, body);
    cJSON_Delete(body);
    return 0;
}
