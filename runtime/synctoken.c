/* synctoken: see synctoken.h. */
#include "synctoken.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "fmt.h"
#include "jwtauth.h"

struct synctoken {
    jwtauth *jwt;
    long max_age_s;
    int require_jti;
    char *revoked; /* ",a,b," so a lookup is one strstr */
};

synctoken *synctoken_new(const synctoken_opts *o)
{
    synctoken *s = calloc(1, sizeof(*s));
    const char *r = o->revoked_jtis ? o->revoked_jtis : "";
    size_t n = strlen(r), i, j = 0;

    if (!s)
        return NULL;
    s->jwt = jwtauth_new(o->signing_key, o->issuer, o->audience, 0);
    s->revoked = malloc(n + 3);
    if (!s->jwt || !s->revoked) {
        synctoken_free(s);
        return NULL;
    }
    /* Blanks around the commas are not part of an id. */
    s->revoked[j++] = ',';
    for (i = 0; i < n; i++)
        if (r[i] != ' ' && r[i] != '\t')
            s->revoked[j++] = r[i];
    s->revoked[j++] = ',';
    s->revoked[j] = '\0';
    s->max_age_s = o->max_age_s > 0 ? o->max_age_s : 1;
    s->require_jti = o->require_jti;
    return s;
}

void synctoken_free(synctoken *s)
{
    if (!s)
        return;
    jwtauth_free(s->jwt);
    free(s->revoked);
    free(s);
}

static int refuse(synctoken_refusal *why, int status, const char *reason, const char *message)
{
    why->status = status;
    why->error = status == 401 ? "unauthorized" : "forbidden_topic";
    why->reason_code = reason;
    why->message = message;
    return -1;
}

static void copy_claim(const cJSON *claims, const char *name, char *out, size_t outlen)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(claims, name);

    out[0] = '\0';
    if (cJSON_IsString(it))
        fmt_copy(out, outlen, it->valuestring);
}

static int is_revoked(const synctoken *s, const char *jti)
{
    const char *p = s->revoked;
    size_t n = strlen(jti);

    while ((p = strstr(p, jti)) != NULL) {
        if (p[-1] == ',' && p[n] == ',')
            return 1;
        p++;
    }
    return 0;
}

static void fill_principal(const cJSON *claims, synctoken_principal *p)
{
    const cJSON *uid = cJSON_GetObjectItemCaseSensitive(claims, "oa_user_id");
    const cJSON *scopes = cJSON_GetObjectItemCaseSensitive(claims, "oa_sync_scopes"), *it;

    memset(p, 0, sizeof(*p));
    copy_claim(claims, "sub", p->sub, sizeof(p->sub));
    copy_claim(claims, "oa_org_id", p->org_id, sizeof(p->org_id));
    copy_claim(claims, "oa_device_id", p->device_id, sizeof(p->device_id));
    copy_claim(claims, "oa_client_surface", p->client_surface, sizeof(p->client_surface));
    if (cJSON_IsNumber(uid) && uid->valuedouble >= 0 && uid->valuedouble < 9007199254740992.0 &&
        uid->valuedouble == floor(uid->valuedouble)) {
        p->has_user_id = 1;
        p->user_id = (long long)uid->valuedouble;
    }
    cJSON_ArrayForEach(it, scopes) {
        if (p->nscopes < SYNCTOKEN_MAX_SCOPES && cJSON_IsString(it) && strlen(it->valuestring) < sizeof(p->scopes[0]))
            fmt_copy(p->scopes[p->nscopes++], sizeof(p->scopes[0]), it->valuestring);
    }
}

int synctoken_authenticate(const synctoken *s, const char *authorization, synctoken_principal *p,
                           synctoken_refusal *why)
{
    const char *token;
    cJSON *claims = NULL;
    const cJSON *iat, *jti, *sub;
    int rc;

    if (!authorization || !*authorization)
        return refuse(why, 401, "missing_authorization", "missing authorization header");
    token = jwtauth_bearer(authorization);
    if (!token)
        return refuse(why, 401, "invalid_authorization_scheme", "invalid authorization scheme");
    rc = jwtauth_verify(s->jwt, token, &claims);
    if (rc == JWTAUTH_EEXPIRED)
        return refuse(why, 401, "token_expired", "sync token expired");
    if (rc != JWTAUTH_OK)
        return refuse(why, 401, "invalid_token", "invalid sync token");
    rc = -1;
    sub = cJSON_GetObjectItemCaseSensitive(claims, "sub");
    iat = cJSON_GetObjectItemCaseSensitive(claims, "iat");
    jti = cJSON_GetObjectItemCaseSensitive(claims, "jti");
    if (!cJSON_IsString(sub)) {
        refuse(why, 401, "invalid_token", "invalid sync token");
    } else if (!cJSON_IsNumber(iat) || iat->valuedouble <= 0) {
        refuse(why, 401, "missing_iat", "sync token missing iat");
    } else if ((double)time(NULL) - iat->valuedouble > (double)s->max_age_s) {
        refuse(why, 401, "token_too_old", "sync token too old");
    } else if (s->require_jti && (!cJSON_IsString(jti) || !jti->valuestring[strspn(jti->valuestring, " \t")])) {
        refuse(why, 401, "missing_jti", "sync token missing jti");
    } else if (cJSON_IsString(jti) && jti->valuestring[0] && !strchr(jti->valuestring, ',') &&
               is_revoked(s, jti->valuestring)) {
        refuse(why, 401, "token_revoked", "sync token revoked");
    } else {
        fill_principal(claims, p);
        rc = 0;
    }
    cJSON_Delete(claims);
    return rc;
}

static int has_scope(const synctoken_principal *p, const char *scope)
{
    int i;

    for (i = 0; i < p->nscopes; i++)
        if (strcmp(p->scopes[i], scope) == 0)
            return 1;
    return 0;
}

static int take_id(const char *start, size_t len, char *id, size_t idlen)
{
    size_t i;

    if (len == 0 || len >= idlen)
        return -1;
    for (i = 0; i < len; i++)
        if (start[i] != ' ')
            break;
    if (i == len)
        return -1;
    memcpy(id, start, len);
    id[len] = '\0';
    return 0;
}

int synctoken_parse_topic(const char *topic, char *id, size_t idlen)
{
    size_t n = strlen(topic);

    if (n > 4 + 7 && strncmp(topic, "run:", 4) == 0 && strcmp(topic + n - 7, ":events") == 0)
        return take_id(topic + 4, n - 11, id, idlen) == 0 ? SYNCTOKEN_TOPIC_RUN : 0;
    if (n > 7 + 10 && strncmp(topic, "worker:", 7) == 0 && strcmp(topic + n - 10, ":lifecycle") == 0)
        return take_id(topic + 7, n - 17, id, idlen) == 0 ? SYNCTOKEN_TOPIC_WORKER : 0;
    return 0;
}

int synctoken_authorize_topic(const synctoken_principal *p, const char *topic, char *id, size_t idlen,
                              synctoken_refusal *why)
{
    int kind = synctoken_parse_topic(topic, id, idlen);

    if (kind == 0)
        return refuse(why, 403, "forbidden_topic", "forbidden topic");
    if (kind == SYNCTOKEN_TOPIC_RUN && !has_scope(p, "runtime.run_events"))
        return refuse(why, 403, "missing_scope", "missing scope for topic (runtime.run_events)");
    if (kind == SYNCTOKEN_TOPIC_WORKER && !has_scope(p, "runtime.worker_lifecycle_events") &&
        !has_scope(p, "runtime.codex_worker_events"))
        return refuse(why, 403, "missing_scope",
                      "missing scope for topic (runtime.worker_lifecycle_events or runtime.codex_worker_events)");
    return kind;
}

void synctoken_owner_mismatch(synctoken_refusal *why)
{
    refuse(why, 403, "owner_mismatch", "worker topic of another owner");
}
