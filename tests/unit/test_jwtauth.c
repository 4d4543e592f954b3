/* Unit tests for jwtauth: round trips, every rejection reason, algorithm
 * confusion (none, HS512, case games), garbage and tampering, tokens made by
 * an independent implementation, and the Bearer header parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include <jwt.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "jwtauth.h"

#define SECRET "unit-test-secret-0123456789"

/* Tokens computed at authoring time with Python's hmac/hashlib/base64 (not
 * libjwt, not this module), secret EXT_SECRET, payload
 * {"sub":"42","user_id":42,"name":"Zoë","iat":1700000000,"exp":4102444800}. */
#define EXT_SECRET "independent-secret-123"
/* Header {"alg":"HS256","typ":"JWT"}, as node's jsonwebtoken writes it. */
static const char ext_typ_jwt[] =
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiI0MiIsInVzZXJfaWQiOjQyLCJuYW1lIjoiWm_DqyIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjo0MTAyNDQ0ODAwfQ."
    "ps0ykOjoE-45Uu2g7xfNblK1t6fZcL2UY-_WsoEkxTc";
/* Header {"alg":"HS256"}: no typ at all. */
static const char ext_no_typ[] =
    "eyJhbGciOiJIUzI1NiJ9."
    "eyJzdWIiOiI0MiIsInVzZXJfaWQiOjQyLCJuYW1lIjoiWm_DqyIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjo0MTAyNDQ0ODAwfQ."
    "eKuEbreQ-olG6WRC-VMFVeCAcBnLfu8YfXiV6_t51nI";
/* Header {"typ":"at+jwt","alg":"HS256","kid":"k1"} (libjwt 1.10 itself
 * refuses any typ but "JWT"). */
static const char ext_typ_at[] =
    "eyJ0eXAiOiJhdCtqd3QiLCJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0."
    "eyJzdWIiOiI0MiIsInVzZXJfaWQiOjQyLCJuYW1lIjoiWm_DqyIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjo0MTAyNDQ0ODAwfQ."
    "6kLvA6e3Dcxh6Ptu4462SM7AmPhYK7QhPqn2798_f8k";
/* Header {"alg":"HS512","typ":"JWT"}, correctly signed with HMAC-SHA512. */
static const char ext_hs512[] =
    "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiI0MiIsInVzZXJfaWQiOjQyLCJuYW1lIjoiWm_DqyIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjo0MTAyNDQ0ODAwfQ."
    "X6HHP4hshjrEt5_4PlhI5Wr6YpjYAjvv6A7OU2NfefexOApTPokihCf3xw5TDGhdilGSUWKw0Sn60QRVCJtNag";

/* ---- helpers: an independent token builder for hand-made headers ---- */

static void b64url(const unsigned char *src, size_t n, char *dst, size_t dstlen)
{
    int len = EVP_EncodeBlock((unsigned char *)dst, src, (int)n);
    assert_true(len >= 0 && (size_t)len < dstlen);
    while (len > 0 && dst[len - 1] == '=')
        len--;
    dst[len] = '\0';
    for (char *p = dst; *p; p++) {
        if (*p == '+')
            *p = '-';
        else if (*p == '/')
            *p = '_';
    }
}

/* header.payload.signature with the given JSON texts; `md` NULL leaves the
 * signature part empty, else HMAC with `md` and `secret`. */
static char *make_token(const char *hdr, const char *payload, const EVP_MD *md, const char *secret)
{
    char h[1024], p[4096], s[256];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    char *tok = malloc(8192);

    assert_non_null(tok);
    b64url((const unsigned char *)hdr, strlen(hdr), h, sizeof(h));
    b64url((const unsigned char *)payload, strlen(payload), p, sizeof(p));
    snprintf(tok, 8192, "%s.%s", h, p);
    s[0] = '\0';
    if (md) {
        assert_non_null(HMAC(md, secret, (int)strlen(secret), (unsigned char *)tok, strlen(tok), mac, &maclen));
        b64url(mac, maclen, s, sizeof(s));
    }
    size_t n = strlen(tok);
    snprintf(tok + n, 8192 - n, ".%s", s);
    return tok;
}

static char *payload_exp(long delta_exp, const char *extra)
{
    char *p = malloc(512);
    long now = (long)time(NULL);

    assert_non_null(p);
    snprintf(p, 512, "{\"sub\":\"u1\",\"iat\":%ld,\"exp\":%ld%s%s}", now, now + delta_exp, extra ? "," : "",
             extra ? extra : "");
    return p;
}

static jwtauth *fresh(const char *iss, const char *aud, long leeway)
{
    jwtauth *j = jwtauth_new(SECRET, iss, aud, leeway);
    assert_non_null(j);
    return j;
}

/* Signs `claims_json` with `signer` and returns the verify code of `verifier`. */
static int sign_verify(jwtauth *signer, jwtauth *verifier, const char *claims_json, cJSON **out)
{
    cJSON *c = cJSON_Parse(claims_json);
    char *tok = NULL;
    int rc;

    assert_non_null(c);
    assert_int_equal(jwtauth_sign(signer, c, 60, &tok), JWTAUTH_OK);
    assert_non_null(tok);
    cJSON_Delete(c);
    rc = jwtauth_verify(verifier, tok, out);
    free(tok);
    return rc;
}

/* ---- tests ---- */

static void test_new_free(void **state)
{
    (void)state;
    assert_null(jwtauth_new(NULL, NULL, NULL, 0));
    assert_null(jwtauth_new("", NULL, NULL, 0));
    jwtauth_free(NULL);
    jwtauth_free(fresh("iss", "aud", -5));
}

static void test_round_trip(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    cJSON *in = cJSON_Parse("{\"sub\":\"user-1\",\"user_id\":7,\"roles\":[\"a\",\"b\"]}");
    cJSON *out = NULL;
    char *t1 = NULL, *t2 = NULL;
    long now = (long)time(NULL);

    (void)state;
    assert_int_equal(jwtauth_sign(j, in, 3600, &t1), JWTAUTH_OK);
    assert_int_equal(jwtauth_sign(j, in, 3600, &t2), JWTAUTH_OK);
    /* The input is not modified. */
    assert_null(cJSON_GetObjectItem(in, "exp"));
    assert_null(cJSON_GetObjectItem(in, "jti"));
    assert_string_not_equal(t1, t2);

    assert_int_equal(jwtauth_verify(j, t1, &out), JWTAUTH_OK);
    assert_non_null(out);
    assert_string_equal(cJSON_GetObjectItem(out, "sub")->valuestring, "user-1");
    assert_int_equal(cJSON_GetObjectItem(out, "user_id")->valueint, 7);
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItem(out, "roles")), 2);
    double iat = cJSON_GetObjectItem(out, "iat")->valuedouble;
    double exp = cJSON_GetObjectItem(out, "exp")->valuedouble;
    assert_true(iat >= now - 1 && iat <= now + 5);
    assert_true(exp == iat + 3600);
    const cJSON *jti = cJSON_GetObjectItem(out, "jti");
    assert_true(cJSON_IsString(jti));
    assert_int_equal(strlen(jti->valuestring), 32);
    assert_int_equal(strspn(jti->valuestring, "0123456789abcdef"), 32);
    assert_null(cJSON_GetObjectItem(out, "iss"));
    cJSON_Delete(out);

    assert_int_equal(jwtauth_verify(j, t2, NULL), JWTAUTH_OK);

    /* claims_out may be NULL. */
    assert_int_equal(jwtauth_verify(j, t1, NULL), JWTAUTH_OK);

    /* NULL claims sign an otherwise empty token. */
    free(t2);
    assert_int_equal(jwtauth_sign(j, NULL, 10, &t2), JWTAUTH_OK);
    assert_int_equal(jwtauth_verify(j, t2, NULL), JWTAUTH_OK);

    free(t1);
    free(t2);
    cJSON_Delete(in);
    jwtauth_free(j);
}

static void test_jti_unique(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    char *a = NULL, *b = NULL;
    cJSON *ca = NULL, *cb = NULL;

    (void)state;
    assert_int_equal(jwtauth_sign(j, NULL, 10, &a), JWTAUTH_OK);
    assert_int_equal(jwtauth_sign(j, NULL, 10, &b), JWTAUTH_OK);
    assert_int_equal(jwtauth_verify(j, a, &ca), JWTAUTH_OK);
    assert_int_equal(jwtauth_verify(j, b, &cb), JWTAUTH_OK);
    assert_string_not_equal(cJSON_GetObjectItem(ca, "jti")->valuestring, cJSON_GetObjectItem(cb, "jti")->valuestring);
    cJSON_Delete(ca);
    cJSON_Delete(cb);
    free(a);
    free(b);
    jwtauth_free(j);
}

static void test_sign_keeps_callers_claims(void **state)
{
    jwtauth *j = fresh("issuer-a", "aud-a", 0);
    cJSON *out = NULL;

    (void)state;
    assert_int_equal(sign_verify(j, j, "{\"jti\":\"fixed\",\"exp\":4102444800}", &out), JWTAUTH_OK);
    assert_string_equal(cJSON_GetObjectItem(out, "jti")->valuestring, "fixed");
    assert_true(cJSON_GetObjectItem(out, "exp")->valuedouble == 4102444800.0);
    /* iss/aud come from the configuration. */
    assert_string_equal(cJSON_GetObjectItem(out, "iss")->valuestring, "issuer-a");
    assert_string_equal(cJSON_GetObjectItem(out, "aud")->valuestring, "aud-a");
    cJSON_Delete(out);

    /* Claim names are case-sensitive: "EXP" does not stand in for exp. */
    assert_int_equal(sign_verify(j, j, "{\"EXP\":1}", &out), JWTAUTH_OK);
    assert_true(cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(out, "exp")));
    cJSON_Delete(out);
    jwtauth_free(j);
}

static void test_sign_bad_args(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    cJSON *arr = cJSON_CreateArray(), *big = cJSON_CreateObject();
    char *tok = (char *)"sentinel";
    char *huge = malloc(JWTAUTH_MAX_TOKEN + 1);

    (void)state;
    assert_int_equal(jwtauth_sign(j, NULL, 0, &tok), JWTAUTH_EMALFORMED);
    assert_null(tok);
    assert_int_equal(jwtauth_sign(j, NULL, -5, &tok), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_sign(j, arr, 60, &tok), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_sign(NULL, NULL, 60, &tok), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_sign(j, NULL, 60, NULL), JWTAUTH_EMALFORMED);
    /* Claims too big for a token the verifier would accept. */
    assert_non_null(huge);
    memset(huge, 'x', JWTAUTH_MAX_TOKEN);
    huge[JWTAUTH_MAX_TOKEN] = '\0';
    cJSON_AddStringToObject(big, "blob", huge);
    assert_int_equal(jwtauth_sign(j, big, 60, &tok), JWTAUTH_EMALFORMED);
    assert_null(tok);
    /* Just under the limit still round-trips. */
    huge[JWTAUTH_MAX_TOKEN / 2] = '\0';
    cJSON_Delete(big);
    big = cJSON_CreateObject();
    cJSON_AddStringToObject(big, "blob", huge);
    assert_int_equal(jwtauth_sign(j, big, 60, &tok), JWTAUTH_OK);
    assert_true(strlen(tok) <= JWTAUTH_MAX_TOKEN);
    assert_int_equal(jwtauth_verify(j, tok, NULL), JWTAUTH_OK);
    free(tok);
    free(huge);
    cJSON_Delete(arr);
    cJSON_Delete(big);
    jwtauth_free(j);
}

static void test_expired(void **state)
{
    jwtauth *strict = fresh(NULL, NULL, 0), *lenient = fresh(NULL, NULL, 30);
    char claims[128];
    long now = (long)time(NULL);
    cJSON *out = (cJSON *)1;

    (void)state;
    snprintf(claims, sizeof(claims), "{\"exp\":%ld}", now - 100);
    assert_int_equal(sign_verify(strict, strict, claims, &out), JWTAUTH_EEXPIRED);
    assert_null(out);
    assert_int_equal(sign_verify(strict, lenient, claims, NULL), JWTAUTH_EEXPIRED);
    /* Within the leeway. */
    snprintf(claims, sizeof(claims), "{\"exp\":%ld}", now - 10);
    assert_int_equal(sign_verify(strict, strict, claims, NULL), JWTAUTH_EEXPIRED);
    assert_int_equal(sign_verify(strict, lenient, claims, NULL), JWTAUTH_OK);
    /* exp == now is already expired (RFC 7519: "on or after"). */
    snprintf(claims, sizeof(claims), "{\"exp\":%ld}", now);
    assert_int_equal(sign_verify(strict, strict, claims, NULL), JWTAUTH_EEXPIRED);
    /* exp must be a number. */
    assert_int_equal(sign_verify(strict, strict, "{\"exp\":\"4102444800\"}", NULL), JWTAUTH_EMALFORMED);
    jwtauth_free(strict);
    jwtauth_free(lenient);
}

static void test_not_yet_valid(void **state)
{
    jwtauth *strict = fresh(NULL, NULL, 0), *lenient = fresh(NULL, NULL, 30);
    char claims[128];
    long now = (long)time(NULL);

    (void)state;
    snprintf(claims, sizeof(claims), "{\"nbf\":%ld}", now + 100);
    assert_int_equal(sign_verify(strict, strict, claims, NULL), JWTAUTH_ENOTYET);
    assert_int_equal(sign_verify(strict, lenient, claims, NULL), JWTAUTH_ENOTYET);
    snprintf(claims, sizeof(claims), "{\"nbf\":%ld}", now + 10);
    assert_int_equal(sign_verify(strict, strict, claims, NULL), JWTAUTH_ENOTYET);
    assert_int_equal(sign_verify(strict, lenient, claims, NULL), JWTAUTH_OK);
    snprintf(claims, sizeof(claims), "{\"nbf\":%ld}", now - 1);
    assert_int_equal(sign_verify(strict, strict, claims, NULL), JWTAUTH_OK);
    assert_int_equal(sign_verify(strict, strict, "{\"nbf\":null}", NULL), JWTAUTH_EMALFORMED);
    jwtauth_free(strict);
    jwtauth_free(lenient);
}

static void test_wrong_key(void **state)
{
    jwtauth *a = fresh(NULL, NULL, 0);
    jwtauth *b = jwtauth_new(SECRET "x", NULL, NULL, 0);
    jwtauth *c = jwtauth_new("unit-test-secret-012345678", NULL, NULL, 0); /* a prefix */

    (void)state;
    assert_non_null(b);
    assert_non_null(c);
    assert_int_equal(sign_verify(a, b, "{\"sub\":\"1\"}", NULL), JWTAUTH_ESIG);
    assert_int_equal(sign_verify(b, a, "{\"sub\":\"1\"}", NULL), JWTAUTH_ESIG);
    assert_int_equal(sign_verify(a, c, "{\"sub\":\"1\"}", NULL), JWTAUTH_ESIG);
    jwtauth_free(a);
    jwtauth_free(b);
    jwtauth_free(c);
}

static void test_issuer_audience(void **state)
{
    jwtauth *plain = fresh(NULL, NULL, 0);
    jwtauth *v = fresh("auth.example", "gateway", 0);
    jwtauth *other_iss = fresh("evil.example", "gateway", 0);
    jwtauth *other_aud = fresh("auth.example", "realtime", 0);

    (void)state;
    /* Configured issuer and audience, set by the signer's configuration. */
    assert_int_equal(sign_verify(v, v, "{}", NULL), JWTAUTH_OK);
    assert_int_equal(sign_verify(other_iss, v, "{}", NULL), JWTAUTH_EISS);
    assert_int_equal(sign_verify(other_aud, v, "{}", NULL), JWTAUTH_EAUD);
    /* Absent when required. */
    assert_int_equal(sign_verify(plain, v, "{}", NULL), JWTAUTH_EISS);
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example\"}", NULL), JWTAUTH_EAUD);
    /* Wrong types. */
    assert_int_equal(sign_verify(plain, v, "{\"iss\":1,\"aud\":\"gateway\"}", NULL), JWTAUTH_EISS);
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example\",\"aud\":{\"x\":\"gateway\"}}", NULL),
                     JWTAUTH_EAUD);
    /* Audience as an array. */
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example\",\"aud\":[\"realtime\",\"gateway\"]}", NULL),
                     JWTAUTH_OK);
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example\",\"aud\":[\"realtime\",\"x\"]}", NULL),
                     JWTAUTH_EAUD);
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example\",\"aud\":[]}", NULL), JWTAUTH_EAUD);
    /* Not configured: not checked. */
    assert_int_equal(sign_verify(v, plain, "{}", NULL), JWTAUTH_OK);
    /* Exact match only. */
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example \",\"aud\":\"gateway\"}", NULL), JWTAUTH_EISS);
    assert_int_equal(sign_verify(plain, v, "{\"iss\":\"auth.example\",\"aud\":\"Gateway\"}", NULL), JWTAUTH_EAUD);
    jwtauth_free(plain);
    jwtauth_free(v);
    jwtauth_free(other_iss);
    jwtauth_free(other_aud);
}

static void test_alg_none(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    char *p = payload_exp(3600, NULL);
    char b[1024], tok[2048];
    char *t;

    (void)state;
    /* The classic hand-built unsigned token: header {"alg":"none"}. */
    b64url((const unsigned char *)p, strlen(p), b, sizeof(b));
    snprintf(tok, sizeof(tok), "eyJhbGciOiJub25lIn0.%s.", b);
    assert_int_equal(jwtauth_verify(j, tok, NULL), JWTAUTH_EALG);
    /* The same with a signature part: a valid HS256 MAC must not help. */
    t = make_token("{\"alg\":\"none\"}", p, EVP_sha256(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    t = make_token("{\"alg\":\"none\",\"typ\":\"JWT\"}", p, NULL, NULL);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    /* Spellings that case-insensitive parsers (libjwt 1.10) accept. */
    t = make_token("{\"alg\":\"None\"}", p, NULL, NULL);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    t = make_token("{\"alg\":\"NONE\"}", p, EVP_sha256(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    t = make_token("{\"alg\":\"hs256\"}", p, EVP_sha256(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    free(p);
    jwtauth_free(j);
}

static void test_other_algs(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0), *ext = jwtauth_new(EXT_SECRET, NULL, NULL, 0);
    char *p = payload_exp(3600, NULL);
    jwt_t *lj = NULL;
    char *t;
    static const char *const hdrs[] = {
        "{\"alg\":\"HS384\"}", "{\"alg\":\"HS512\"}", "{\"alg\":\"RS256\"}", "{\"alg\":\"ES256\"}",
        "{\"alg\":\"PS256\"}", "{\"alg\":\"\"}",      "{\"alg\":256}",       "{\"alg\":null}",
        "{\"alg\":[\"HS256\"]}", "{\"typ\":\"JWT\"}", "{}", "{\"alg\":\"HS256 \"}",
    };

    (void)state;
    assert_non_null(ext);
    /* Each signed with HS256 and the right key: only the header is wrong. */
    for (size_t i = 0; i < sizeof(hdrs) / sizeof(hdrs[0]); i++) {
        t = make_token(hdrs[i], p, EVP_sha256(), SECRET);
        assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
        free(t);
    }
    /* Correctly signed HS384/HS512 tokens with the same secret. */
    t = make_token("{\"alg\":\"HS384\"}", p, EVP_sha384(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    t = make_token("{\"alg\":\"HS512\"}", p, EVP_sha512(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    /* An HS512 token made by libjwt itself with our secret. */
    assert_int_equal(jwt_new(&lj), 0);
    assert_int_equal(jwt_add_grants_json(lj, p), 0);
    assert_int_equal(jwt_set_alg(lj, JWT_ALG_HS512, (const unsigned char *)SECRET, (int)strlen(SECRET)), 0);
    t = jwt_encode_str(lj);
    assert_non_null(t);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EALG);
    free(t);
    jwt_free(lj);
    /* And the independently made HS512 token. */
    assert_int_equal(jwtauth_verify(ext, ext_hs512, NULL), JWTAUTH_EALG);
    free(p);
    jwtauth_free(j);
    jwtauth_free(ext);
}

static void test_missing_exp(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    char *t = make_token("{\"alg\":\"HS256\",\"typ\":\"JWT\"}", "{\"sub\":\"u1\",\"iat\":1700000000}", EVP_sha256(),
                         SECRET);

    (void)state;
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EMISSING);
    free(t);
    /* "EXP" is not "exp". */
    t = make_token("{\"alg\":\"HS256\"}", "{\"EXP\":4102444800}", EVP_sha256(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EMISSING);
    free(t);
    /* A hand-made but valid token passes, so the builder is right. */
    t = make_token("{\"alg\":\"HS256\"}", "{\"exp\":4102444800}", EVP_sha256(), SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_OK);
    free(t);
    /* An unknown crit extension must be refused. */
    t = make_token("{\"alg\":\"HS256\",\"crit\":[\"b64\"],\"b64\":false}", "{\"exp\":4102444800}", EVP_sha256(),
                   SECRET);
    assert_int_equal(jwtauth_verify(j, t, NULL), JWTAUTH_EMALFORMED);
    free(t);
    jwtauth_free(j);
}

static void test_garbage(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    static const char *const bad[] = {
        "", ".", "..", "...", "....", "abc", "a.b", "a.b.c", "a.b.c.d", "eyJhbGciOiJIUzI1NiJ9..",
        "eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9.e30", "e30.e30.", "*.*.*", "eyJ.eyJ.eyJ",
        "eyJhbGciOiJIUzI1NiJ9=.e30.x", "eyJhbGciOiJIUzI1NiJ9.e30.x.", " eyJhbGciOiJIUzI1NiJ9.e30.x",
        "W10.e30.x" /* header is an array */, "bnVsbA.e30.x" /* null */, "eyJhIjox.e30.x" /* truncated JSON */,
        "eyJhbGciOiJIUzI1NiJ9fQ.e30.x" /* trailing junk after the object */,
        "A.e30.x" /* length 1 mod 4 */,
    };
    cJSON *out = (cJSON *)1;
    char *big;

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        int rc = jwtauth_verify(j, bad[i], &out);
        if (rc != JWTAUTH_EMALFORMED && rc != JWTAUTH_EALG && rc != JWTAUTH_ESIG)
            fail_msg("'%s' gave %d", bad[i], rc);
        assert_null(out);
    }
    assert_int_equal(jwtauth_verify(j, "", NULL), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_verify(j, "abc", NULL), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_verify(j, "W10.e30.x", NULL), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_verify(j, NULL, NULL), JWTAUTH_EMALFORMED);
    assert_int_equal(jwtauth_verify(NULL, "a.b.c", NULL), JWTAUTH_EMALFORMED);

    /* Huge: 4 MiB with dots, refused before decoding. */
    big = malloc(4u << 20);
    assert_non_null(big);
    memset(big, 'e', (4u << 20) - 1);
    big[(4u << 20) - 1] = '\0';
    big[100] = '.';
    big[200] = '.';
    assert_int_equal(jwtauth_verify(j, big, NULL), JWTAUTH_EMALFORMED);
    free(big);

    /* Random bytes, in and out of the base64 alphabet: no crash. */
    srand(12345);
    for (int n = 0; n < 2000; n++) {
        char buf[256];
        size_t len = (size_t)(rand() % 255);
        for (size_t i = 0; i < len; i++) {
            int r = rand() % 10;
            buf[i] = r == 0 ? '.' : r < 6 ? "eyJ0aGx9_-AZaz09"[rand() % 16] : (char)(1 + rand() % 255);
        }
        buf[len] = '\0';
        assert_int_not_equal(jwtauth_verify(j, buf, NULL), JWTAUTH_OK);
    }
    jwtauth_free(j);
}

static void test_tampered(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    char *tok = NULL, *forged;
    const char *dot1, *dot2;
    char b[512];
    static const char alt[] = {'A', 'B', 'Q', 'g', 'w', 'z', '0', '9', '-', '_', '=', '.', '+', '/', ' '};

    (void)state;
    assert_int_equal(sign_verify(j, j, "{}", NULL), JWTAUTH_OK);
    cJSON *c = cJSON_Parse("{\"sub\":\"alice\",\"admin\":false}");
    assert_int_equal(jwtauth_sign(j, c, 3600, &tok), JWTAUTH_OK);
    cJSON_Delete(c);

    /* Swap in another payload, keeping header and signature. */
    dot1 = strchr(tok, '.');
    dot2 = strchr(dot1 + 1, '.');
    b64url((const unsigned char *)"{\"sub\":\"alice\",\"admin\":true,\"exp\":4102444800}", 45, b, sizeof(b));
    forged = malloc(strlen(tok) + sizeof(b));
    assert_non_null(forged);
    snprintf(forged, strlen(tok) + sizeof(b), "%.*s.%s%s", (int)(dot1 - tok), tok, b, dot2);
    assert_int_equal(jwtauth_verify(j, forged, NULL), JWTAUTH_ESIG);
    free(forged);

    /* Every single-character change anywhere is refused, including the
     * last signature character whose low bits base64 does not carry. */
    forged = strdup(tok);
    assert_non_null(forged);
    for (size_t i = 0; tok[i]; i++) {
        for (size_t k = 0; k < sizeof(alt); k++) {
            if (alt[k] == tok[i])
                continue;
            forged[i] = alt[k];
            if (jwtauth_verify(j, forged, NULL) == JWTAUTH_OK)
                fail_msg("changing position %zu to '%c' still verified", i, alt[k]);
        }
        forged[i] = tok[i];
    }
    assert_int_equal(jwtauth_verify(j, forged, NULL), JWTAUTH_OK);
    /* Truncated or extended signature. */
    forged[strlen(forged) - 1] = '\0';
    assert_int_equal(jwtauth_verify(j, forged, NULL), JWTAUTH_ESIG);
    free(forged);
    forged = malloc(strlen(tok) + 3);
    assert_non_null(forged);
    snprintf(forged, strlen(tok) + 3, "%sAA", tok);
    assert_int_equal(jwtauth_verify(j, forged, NULL), JWTAUTH_ESIG);
    free(forged);
    free(tok);
    jwtauth_free(j);
}

static void test_independent_tokens(void **state)
{
    jwtauth *j = jwtauth_new(EXT_SECRET, NULL, NULL, 0);
    jwtauth *wrong = fresh(NULL, NULL, 0);
    const char *const toks[] = {ext_typ_jwt, ext_no_typ, ext_typ_at};
    cJSON *out = NULL;

    (void)state;
    assert_non_null(j);
    for (size_t i = 0; i < sizeof(toks) / sizeof(toks[0]); i++) {
        assert_int_equal(jwtauth_verify(j, toks[i], &out), JWTAUTH_OK);
        assert_string_equal(cJSON_GetObjectItem(out, "sub")->valuestring, "42");
        assert_int_equal(cJSON_GetObjectItem(out, "user_id")->valueint, 42);
        assert_string_equal(cJSON_GetObjectItem(out, "name")->valuestring, "Zo\xc3\xab");
        cJSON_Delete(out);
        assert_int_equal(jwtauth_verify(wrong, toks[i], NULL), JWTAUTH_ESIG);
    }
    jwtauth_free(j);
    jwtauth_free(wrong);
}

static void test_libjwt_reads_ours(void **state)
{
    jwtauth *j = fresh(NULL, NULL, 0);
    jwt_t *lj = NULL;
    char *tok = NULL;
    cJSON *c = cJSON_Parse("{\"sub\":\"u9\"}");

    (void)state;
    assert_int_equal(jwtauth_sign(j, c, 60, &tok), JWTAUTH_OK);
    assert_int_equal(jwt_decode(&lj, tok, (const unsigned char *)SECRET, (int)strlen(SECRET)), 0);
    assert_int_equal(jwt_get_alg(lj), JWT_ALG_HS256);
    assert_string_equal(jwt_get_grant(lj, "sub"), "u9");
    assert_string_equal(jwt_get_header(lj, "typ"), "JWT");
    jwt_free(lj);
    free(tok);
    cJSON_Delete(c);
    jwtauth_free(j);
}

static void test_reasons(void **state)
{
    static const int codes[] = {JWTAUTH_OK,      JWTAUTH_EMALFORMED, JWTAUTH_EALG, JWTAUTH_ESIG,
                                JWTAUTH_EEXPIRED, JWTAUTH_ENOTYET,   JWTAUTH_EISS, JWTAUTH_EAUD,
                                JWTAUTH_EMISSING, JWTAUTH_ENOMEM};
    size_t n = sizeof(codes) / sizeof(codes[0]);

    (void)state;
    assert_string_equal(jwtauth_reason(JWTAUTH_EEXPIRED), "token_expired");
    assert_string_equal(jwtauth_reason(JWTAUTH_ESIG), "invalid_signature");
    assert_string_equal(jwtauth_reason(JWTAUTH_EALG), "algorithm_not_allowed");
    assert_string_equal(jwtauth_reason(JWTAUTH_EMALFORMED), "malformed_token");
    assert_string_equal(jwtauth_reason(JWTAUTH_EMISSING), "missing_claim");
    assert_string_equal(jwtauth_reason(12345), "unknown_error");
    assert_non_null(jwtauth_message(-12345));
    for (size_t a = 0; a < n; a++) {
        const char *r = jwtauth_reason(codes[a]);
        assert_true(strlen(r) > 0);
        assert_int_equal(strspn(r, "abcdefghijklmnopqrstuvwxyz_"), strlen(r));
        assert_true(strlen(jwtauth_message(codes[a])) > 0);
        for (size_t b = a + 1; b < n; b++) {
            assert_string_not_equal(r, jwtauth_reason(codes[b]));
            assert_string_not_equal(jwtauth_message(codes[a]), jwtauth_message(codes[b]));
        }
    }
}

static void test_bearer(void **state)
{
    (void)state;
    assert_string_equal(jwtauth_bearer("Bearer abc.def.ghi"), "abc.def.ghi");
    assert_string_equal(jwtauth_bearer("bearer abc"), "abc");
    assert_string_equal(jwtauth_bearer("BEARER abc"), "abc");
    assert_string_equal(jwtauth_bearer("  Bearer \t  a-b_c.d~e+f/g=="), "a-b_c.d~e+f/g==");
    const char *h = "Bearer xyz";
    assert_ptr_equal(jwtauth_bearer(h), h + 7);
    assert_null(jwtauth_bearer(NULL));
    assert_null(jwtauth_bearer(""));
    assert_null(jwtauth_bearer("Bearer"));
    assert_null(jwtauth_bearer("Bearer "));
    assert_null(jwtauth_bearer("Bearer    "));
    assert_null(jwtauth_bearer("Bearerabc"));
    assert_null(jwtauth_bearer("Basic dXNlcjpwYXNz"));
    assert_null(jwtauth_bearer("Bearer a b"));
    assert_null(jwtauth_bearer("Bearer abc "));
    assert_null(jwtauth_bearer("Bearer =abc"));
    assert_null(jwtauth_bearer("Bearer ab=c"));
    assert_null(jwtauth_bearer("Bearer a\"b"));
    assert_null(jwtauth_bearer("Bearer abc\r\n"));
    assert_null(jwtauth_bearer("Token abc"));
}

struct sharer {
    jwtauth *j;
    int errors; /* cmocka's asserts must not run off the main thread */
};

static void *share_one(void *arg)
{
    struct sharer *s = arg;
    cJSON *c = cJSON_CreateObject(), *out = NULL;

    cJSON_AddStringToObject(c, "sub", "threaded");
    for (int i = 0; i < 500; i++) {
        char *tok = NULL;
        if (jwtauth_sign(s->j, c, 60, &tok) != JWTAUTH_OK || jwtauth_verify(s->j, tok, &out) != JWTAUTH_OK ||
            strcmp(cJSON_GetObjectItem(out, "sub")->valuestring, "threaded") != 0 ||
            jwtauth_verify(s->j, ext_typ_jwt, NULL) != JWTAUTH_ESIG)
            s->errors++;
        cJSON_Delete(out);
        out = NULL;
        free(tok);
    }
    cJSON_Delete(c);
    return NULL;
}

/* One jwtauth shared by several threads signing and verifying at once. */
static void test_shared_between_threads(void **state)
{
    jwtauth *j = fresh("iss", "aud", 5);
    pthread_t t[4];
    struct sharer s[4];

    (void)state;
    for (int i = 0; i < 4; i++) {
        s[i] = (struct sharer){j, 0};
        assert_int_equal(pthread_create(&t[i], NULL, share_one, &s[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(s[i].errors, 0);
    }
    jwtauth_free(j);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_free),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_jti_unique),
        cmocka_unit_test(test_sign_keeps_callers_claims),
        cmocka_unit_test(test_sign_bad_args),
        cmocka_unit_test(test_expired),
        cmocka_unit_test(test_not_yet_valid),
        cmocka_unit_test(test_wrong_key),
        cmocka_unit_test(test_issuer_audience),
        cmocka_unit_test(test_alg_none),
        cmocka_unit_test(test_other_algs),
        cmocka_unit_test(test_missing_exp),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_tampered),
        cmocka_unit_test(test_independent_tokens),
        cmocka_unit_test(test_libjwt_reads_ours),
        cmocka_unit_test(test_reasons),
        cmocka_unit_test(test_bearer),
        cmocka_unit_test(test_shared_between_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
