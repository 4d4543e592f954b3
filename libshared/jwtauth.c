/* jwtauth: HS256 JWT signing (libjwt) and verification (done here).
 *
 * Verification does not go through libjwt's jwt_decode(): in libjwt 1.10 it
 * accepts any algorithm the key fits (HS384/HS512 with an HS256 secret), maps
 * "alg" case-insensitively ("None", "hs256"), accepts alg "none" whenever the
 * key is NULL or empty, compares signatures with strcmp (not constant time),
 * refuses any typ other than "JWT", checks neither exp nor nbf, and decodes
 * base64 into alloca() buffers sized by the token, which a huge token turns
 * into a stack overflow. Here the token is split and bounded first, the
 * header must say exactly "HS256", the signature is recomputed with OpenSSL
 * and compared in constant time, and only then is the payload parsed and its
 * time and issuer/audience claims checked. */
#include "jwtauth.h"

#include <errno.h>
#include <jwt.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "fmt.h"

/* The claims a token may carry are bounded so that the encoded token stays
 * within JWTAUTH_MAX_TOKEN (base64 grows by 4/3, plus header and signature). */
#define JWTAUTH_MAX_CLAIMS_JSON ((JWTAUTH_MAX_TOKEN - 128) / 4 * 3)

/* HMAC-SHA256 is 32 bytes, 43 base64url characters without padding. */
#define HS256_LEN 32
#define HS256_B64_LEN 43

struct jwtauth {
    unsigned char *secret;
    size_t secret_len;
    char *issuer;
    char *audience;
    long leeway_s;
};

static char *dup_opt(const char *s, int *oom)
{
    char *d;

    if (s == NULL)
        return NULL;
    d = strdup(s);
    if (d == NULL)
        *oom = 1;
    return d;
}

jwtauth *jwtauth_new(const char *secret, const char *issuer, const char *audience, long leeway_s)
{
    jwtauth *j;
    int oom = 0;

    if (secret == NULL || secret[0] == '\0' || strlen(secret) > INT_MAX)
        return NULL;
    j = calloc(1, sizeof(*j));
    if (j == NULL)
        return NULL;
    j->secret_len = strlen(secret);
    j->secret = malloc(j->secret_len);
    if (j->secret == NULL)
        goto fail;
    memcpy(j->secret, secret, j->secret_len);
    j->issuer = dup_opt(issuer, &oom);
    j->audience = dup_opt(audience, &oom);
    if (oom)
        goto fail;
    j->leeway_s = leeway_s < 0 ? 0 : leeway_s;
    return j;

fail:
    jwtauth_free(j);
    return NULL;
}

void jwtauth_free(jwtauth *j)
{
    if (j == NULL)
        return;
    if (j->secret != NULL) {
        OPENSSL_cleanse(j->secret, j->secret_len);
        free(j->secret);
    }
    free(j->issuer);
    free(j->audience);
    free(j);
}

/* ---- signing ---- */

static int add_jti(cJSON *o)
{
    unsigned char rnd[16];
    char hex[33];

    if (RAND_bytes(rnd, sizeof(rnd)) != 1)
        return -1;
    fmt_hex(hex, rnd, sizeof(rnd));
    return cJSON_AddStringToObject(o, "jti", hex) ? 0 : -1;
}

/* cJSON_HasObjectItem() ignores case, so "EXP" would hide a missing exp. */
static int has(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name) != NULL;
}

/* Adds the registered claims the caller did not set. Returns 0 or -1 (OOM). */
static int add_defaults(const jwtauth *j, cJSON *o, long ttl_s)
{
    time_t now = time(NULL);

    if (!has(o, "iat") && !cJSON_AddNumberToObject(o, "iat", (double)now))
        return -1;
    if (!has(o, "exp") && !cJSON_AddNumberToObject(o, "exp", (double)now + (double)ttl_s))
        return -1;
    if (!has(o, "jti") && add_jti(o) < 0)
        return -1;
    if (j->issuer && !has(o, "iss") && !cJSON_AddStringToObject(o, "iss", j->issuer))
        return -1;
    if (j->audience && !has(o, "aud") && !cJSON_AddStringToObject(o, "aud", j->audience))
        return -1;
    return 0;
}

int jwtauth_sign(jwtauth *j, const cJSON *claims, long ttl_s, char **out)
{
    cJSON *body = NULL;
    char *json = NULL;
    jwt_t *t = NULL;
    int rc = JWTAUTH_ENOMEM, err;

    if (out == NULL)
        return JWTAUTH_EMALFORMED;
    *out = NULL;
    if (j == NULL || ttl_s <= 0 || (claims != NULL && !cJSON_IsObject(claims)))
        return JWTAUTH_EMALFORMED;

    body = claims ? cJSON_Duplicate(claims, 1) : cJSON_CreateObject();
    if (body == NULL || add_defaults(j, body, ttl_s) < 0)
        goto fail;
    json = cJSON_PrintUnformatted(body);
    if (json == NULL)
        goto fail;
    if (strlen(json) > JWTAUTH_MAX_CLAIMS_JSON) {
        rc = JWTAUTH_EMALFORMED;
        goto fail;
    }

    if (jwt_new(&t) != 0)
        goto fail;
    err = jwt_add_grants_json(t, json);
    if (err != 0) {
        /* libjwt parses with jansson and refuses duplicate keys, which a
         * cJSON object built by hand can hold. */
        rc = err == ENOMEM ? JWTAUTH_ENOMEM : JWTAUTH_EMALFORMED;
        goto fail;
    }
    if (jwt_set_alg(t, JWT_ALG_HS256, j->secret, (int)j->secret_len) != 0)
        goto fail;
    *out = jwt_encode_str(t);
    if (*out == NULL)
        goto fail;
    rc = JWTAUTH_OK;

fail:
    jwt_free(t);
    free(json);
    cJSON_Delete(body);
    return rc;
}

/* ---- verification ---- */

static int b64url_val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Decodes unpadded base64url `src[0..n)` into a malloc'd NUL-terminated
 * buffer (the caller frees it). Returns NULL on a bad character or length
 * (*oom stays 0) or on OOM (*oom = 1). */
static char *b64url_decode(const char *src, size_t n, size_t *outlen, int *oom)
{
    char *dst;
    size_t o = 0;
    unsigned int acc = 0;
    int bits = 0;

    if (n % 4 == 1)
        return NULL;
    dst = malloc(n / 4 * 3 + 3);
    if (dst == NULL) {
        *oom = 1;
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        int v = b64url_val((unsigned char)src[i]);
        if (v < 0) {
            free(dst);
            return NULL;
        }
        acc = (acc << 6) | (unsigned int)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            dst[o++] = (char)((acc >> bits) & 0xff);
        }
    }
    dst[o] = '\0';
    *outlen = o;
    return dst;
}

static void b64url_encode(const unsigned char *src, size_t n, char *dst)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0, i = 0;

    for (; i + 2 < n; i += 3) {
        unsigned int v = (unsigned int)src[i] << 16 | (unsigned int)src[i + 1] << 8 | src[i + 2];
        dst[o++] = tab[v >> 18 & 63];
        dst[o++] = tab[v >> 12 & 63];
        dst[o++] = tab[v >> 6 & 63];
        dst[o++] = tab[v & 63];
    }
    if (n - i == 1) {
        unsigned int v = (unsigned int)src[i] << 16;
        dst[o++] = tab[v >> 18 & 63];
        dst[o++] = tab[v >> 12 & 63];
    } else if (n - i == 2) {
        unsigned int v = (unsigned int)src[i] << 16 | (unsigned int)src[i + 1] << 8;
        dst[o++] = tab[v >> 18 & 63];
        dst[o++] = tab[v >> 12 & 63];
        dst[o++] = tab[v >> 6 & 63];
    }
    dst[o] = '\0';
}

/* Decodes one base64url part into a JSON object. Returns JWTAUTH_OK with
 * *obj set, JWTAUTH_EMALFORMED or JWTAUTH_ENOMEM. */
static int decode_json_part(const char *src, size_t n, cJSON **obj)
{
    size_t len = 0;
    int oom = 0;
    char *buf = b64url_decode(src, n, &len, &oom);
    const char *end = NULL;

    *obj = NULL;
    if (buf == NULL)
        return oom ? JWTAUTH_ENOMEM : JWTAUTH_EMALFORMED;
    /* An embedded NUL would end parsing early and hide the rest. */
    if (memchr(buf, '\0', len) == NULL)
        *obj = cJSON_ParseWithOpts(buf, &end, 1);
    free(buf);
    if (*obj == NULL)
        return JWTAUTH_EMALFORMED;
    if (!cJSON_IsObject(*obj)) {
        cJSON_Delete(*obj);
        *obj = NULL;
        return JWTAUTH_EMALFORMED;
    }
    return JWTAUTH_OK;
}

/* Only the exact spelling "HS256" is accepted: RFC 7518 names are case
 * sensitive, and anything looser is how "None" slips through elsewhere. */
static int check_header(const cJSON *hdr)
{
    const cJSON *alg = cJSON_GetObjectItemCaseSensitive(hdr, "alg");

    if (!cJSON_IsString(alg) || strcmp(alg->valuestring, "HS256") != 0)
        return JWTAUTH_EALG;
    /* RFC 7515 4.1.11: extensions listed in crit must be understood; none
     * are. */
    if (has(hdr, "crit"))
        return JWTAUTH_EMALFORMED;
    return JWTAUTH_OK;
}

static int check_signature(const jwtauth *j, const char *token, size_t signed_len, const char *sig,
                           size_t sig_len)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    char expect[HS256_B64_LEN + 4];

    /* Comparing the canonical encoding (rather than decoded bytes) also
     * refuses non-canonical spellings of a valid signature. */
    if (sig_len != HS256_B64_LEN)
        return JWTAUTH_ESIG;
    if (HMAC(EVP_sha256(), j->secret, (int)j->secret_len, (const unsigned char *)token, signed_len, mac,
             &mac_len) == NULL ||
        mac_len != HS256_LEN)
        return JWTAUTH_ENOMEM;
    b64url_encode(mac, mac_len, expect);
    OPENSSL_cleanse(mac, sizeof(mac));
    if (CRYPTO_memcmp(expect, sig, HS256_B64_LEN) != 0)
        return JWTAUTH_ESIG;
    return JWTAUTH_OK;
}

/* A numeric date claim: JWTAUTH_OK with *v set, JWTAUTH_EMISSING when
 * absent, JWTAUTH_EMALFORMED when not a number. */
static int get_date(const cJSON *payload, const char *name, double *v)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(payload, name);

    if (it == NULL)
        return JWTAUTH_EMISSING;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
        return JWTAUTH_EMALFORMED;
    *v = it->valuedouble;
    return JWTAUTH_OK;
}

static int check_audience(const cJSON *aud, const char *want)
{
    const cJSON *it;

    if (cJSON_IsString(aud))
        return strcmp(aud->valuestring, want) == 0 ? JWTAUTH_OK : JWTAUTH_EAUD;
    if (cJSON_IsArray(aud)) {
        cJSON_ArrayForEach(it, aud) {
            if (cJSON_IsString(it) && strcmp(it->valuestring, want) == 0)
                return JWTAUTH_OK;
        }
    }
    return JWTAUTH_EAUD;
}

static int check_claims(const jwtauth *j, const cJSON *payload)
{
    double now = (double)time(NULL), exp = 0, nbf = 0;
    int rc;

    rc = get_date(payload, "exp", &exp);
    if (rc != JWTAUTH_OK)
        return rc;
    if (now >= exp + (double)j->leeway_s)
        return JWTAUTH_EEXPIRED;
    rc = get_date(payload, "nbf", &nbf);
    if (rc == JWTAUTH_EMALFORMED)
        return rc;
    if (rc == JWTAUTH_OK && now + (double)j->leeway_s < nbf)
        return JWTAUTH_ENOTYET;
    if (j->issuer) {
        const cJSON *iss = cJSON_GetObjectItemCaseSensitive(payload, "iss");
        if (!cJSON_IsString(iss) || strcmp(iss->valuestring, j->issuer) != 0)
            return JWTAUTH_EISS;
    }
    if (j->audience)
        return check_audience(cJSON_GetObjectItemCaseSensitive(payload, "aud"), j->audience);
    return JWTAUTH_OK;
}

int jwtauth_verify(jwtauth *j, const char *token, cJSON **claims_out)
{
    const char *dot1, *dot2;
    size_t len;
    cJSON *hdr = NULL, *payload = NULL;
    int rc;

    if (claims_out)
        *claims_out = NULL;
    if (j == NULL || token == NULL)
        return JWTAUTH_EMALFORMED;
    len = strnlen(token, JWTAUTH_MAX_TOKEN + 1);
    if (len == 0 || len > JWTAUTH_MAX_TOKEN)
        return JWTAUTH_EMALFORMED;
    dot1 = memchr(token, '.', len);
    if (dot1 == NULL)
        return JWTAUTH_EMALFORMED;
    dot2 = memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token));
    /* Exactly three parts: a fourth would be JWE or junk. */
    if (dot2 == NULL || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - token)) != NULL)
        return JWTAUTH_EMALFORMED;

    rc = decode_json_part(token, (size_t)(dot1 - token), &hdr);
    if (rc != JWTAUTH_OK)
        goto done;
    rc = check_header(hdr);
    if (rc != JWTAUTH_OK)
        goto done;
    rc = check_signature(j, token, (size_t)(dot2 - token), dot2 + 1, len - (size_t)(dot2 + 1 - token));
    if (rc != JWTAUTH_OK)
        goto done;
    rc = decode_json_part(dot1 + 1, (size_t)(dot2 - dot1 - 1), &payload);
    if (rc != JWTAUTH_OK)
        goto done;
    rc = check_claims(j, payload);
    if (rc != JWTAUTH_OK)
        goto done;
    if (claims_out) {
        *claims_out = payload;
        payload = NULL;
    }

done:
    cJSON_Delete(hdr);
    cJSON_Delete(payload);
    return rc;
}

/* ---- messages and headers ---- */

const char *jwtauth_reason(int rc)
{
    switch (rc) {
    case JWTAUTH_OK: return "ok";
    case JWTAUTH_EMALFORMED: return "malformed_token";
    case JWTAUTH_EALG: return "algorithm_not_allowed";
    case JWTAUTH_ESIG: return "invalid_signature";
    case JWTAUTH_EEXPIRED: return "token_expired";
    case JWTAUTH_ENOTYET: return "token_not_yet_valid";
    case JWTAUTH_EISS: return "invalid_issuer";
    case JWTAUTH_EAUD: return "invalid_audience";
    case JWTAUTH_EMISSING: return "missing_claim";
    case JWTAUTH_ENOMEM: return "out_of_memory";
    default: return "unknown_error";
    }
}

const char *jwtauth_message(int rc)
{
    switch (rc) {
    case JWTAUTH_OK: return "token is valid";
    case JWTAUTH_EMALFORMED: return "token is malformed";
    case JWTAUTH_EALG: return "token algorithm is not allowed (HS256 only)";
    case JWTAUTH_ESIG: return "token signature is invalid";
    case JWTAUTH_EEXPIRED: return "token has expired";
    case JWTAUTH_ENOTYET: return "token is not valid yet";
    case JWTAUTH_EISS: return "token issuer is not accepted";
    case JWTAUTH_EAUD: return "token audience is not accepted";
    case JWTAUTH_EMISSING: return "token lacks a required claim (exp)";
    case JWTAUTH_ENOMEM: return "out of memory while checking the token";
    default: return "unknown token error";
    }
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t';
}

const char *jwtauth_bearer(const char *header)
{
    const char *p, *t;

    if (header == NULL)
        return NULL;
    p = header;
    while (is_blank(*p))
        p++;
    if (strncasecmp(p, "bearer", 6) != 0 || !is_blank(p[6]))
        return NULL;
    p += 6;
    while (is_blank(*p))
        p++;
    if (*p == '\0')
        return NULL;
    /* RFC 6750 b64token: one or more of these, then any number of '='. */
    t = p;
    while ((*t >= 'A' && *t <= 'Z') || (*t >= 'a' && *t <= 'z') || (*t >= '0' && *t <= '9') || *t == '-' ||
           *t == '.' || *t == '_' || *t == '~' || *t == '+' || *t == '/')
        t++;
    if (t == p)
        return NULL;
    while (*t == '=')
        t++;
    return *t == '\0' ? p : NULL;
}
