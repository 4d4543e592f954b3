/* synctoken: the Khala sync tokens of SPEC 6 (HS256 Bearer tokens) and the
 * topic policy: which principal may read which topic.
 *
 * Signature, exp, nbf, iss and aud are checked by libshared's jwtauth (one
 * truth for JWT checks); this module adds the sync policy on top: sub
 * present, iat present and not older than the maximum age, jti present
 * (when required) and not revoked, and maps every refusal to the
 * reason_code the original runtime answered with. A synctoken is
 * read-only after synctoken_new and may be shared by threads. */
#ifndef RT_SYNCTOKEN_H
#define RT_SYNCTOKEN_H

#include <stddef.h>

typedef struct synctoken synctoken;

typedef struct {
    const char *signing_key;  /* HS256 key */
    const char *issuer;       /* required iss */
    const char *audience;     /* required aud */
    long max_age_s;           /* iat may be at most this old */
    int require_jti;
    const char *revoked_jtis; /* comma list, may be NULL */
} synctoken_opts;

#define SYNCTOKEN_MAX_SCOPES 16

/* Who a valid token speaks for. Strings are "" when the claim is absent. */
typedef struct {
    char sub[128];
    int has_user_id;
    long long user_id;
    char org_id[128];
    char device_id[128];
    char client_surface[64];
    int nscopes;
    char scopes[SYNCTOKEN_MAX_SCOPES][64];
} synctoken_principal;

/* A refusal: HTTP status (401 or 403), the error code of the body
 * ("unauthorized" or "forbidden_topic"), reason_code and message. Static
 * strings. */
typedef struct {
    int status;
    const char *error;
    const char *reason_code;
    const char *message;
} synctoken_refusal;

/* Copies every option. Returns NULL on OOM or an empty key. Free with
 * synctoken_free. */
synctoken *synctoken_new(const synctoken_opts *o);
void synctoken_free(synctoken *s);

/* Checks an Authorization header value (NULL when absent). Returns 0 with
 * *p filled, or -1 with *why set (status 401). */
int synctoken_authenticate(const synctoken *s, const char *authorization, synctoken_principal *p,
                           synctoken_refusal *why);

/* Topic kinds of SPEC 6. */
typedef enum { SYNCTOKEN_TOPIC_RUN = 1, SYNCTOKEN_TOPIC_WORKER = 2 } synctoken_topic_kind;

/* Parses "run:{id}:events" or "worker:{id}:lifecycle"; the id (up to
 * idlen-1 bytes) goes to id. Returns the kind, or 0 for any other topic. */
int synctoken_parse_topic(const char *topic, char *id, size_t idlen);

/* Checks that `p` may read `topic` (scopes). Returns the topic kind with
 * the id in `id`, or -1 with *why set (403 forbidden_topic or
 * missing_scope). The worker owner check needs the database and is the
 * caller's (synctoken_owner_mismatch gives its refusal). */
int synctoken_authorize_topic(const synctoken_principal *p, const char *topic, char *id, size_t idlen,
                              synctoken_refusal *why);

/* The refusal for a worker topic of another owner or an unknown worker. */
void synctoken_owner_mismatch(synctoken_refusal *why);

#endif
