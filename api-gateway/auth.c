/* auth: POST /api/v1/auth/{register,login,refresh,logout} and auth_require. */
#include "auth.h"

#include <crypt.h>
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "apiutil.h"
#include "authbody.h"
#include "log.h"
#include "loginguard.h"
#include "metrics.h"
#include "revocation.h"
#include "svc.h"

#define AUTH_BAD_LOGIN "invalid username/email or password"
#define AUTH_BAD_REFRESH "invalid, expired, used or revoked refresh token"
#define AUTH_VALID_AFTER_EXPR(t) "coalesce(floor(extract(epoch FROM " t "tokens_valid_after))::bigint::text, '')"
#define AUTH_VALID_AFTER_COL AUTH_VALID_AFTER_EXPR("")
#define AUTH_VALID_AFTER_U_COL AUTH_VALID_AFTER_EXPR("u.")

#define USER_COLS                                                                                             \
    "id, username, email, telegram_chat_id, is_active, "                                                      \
    "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at"

/* ---- passwords ---------------------------------------------------------- */

/* yescrypt hash of `pw` with a fresh salt into out. Returns 0 or -1. */
static int auth_hash_password(const char *pw, char *out, size_t outlen)
{
    char *salt = crypt_gensalt_ra("$y$", 0, NULL, 0);
    struct crypt_data *cd = calloc(1, sizeof(*cd));
    const char *h = NULL;
    int rc = -1;

    if (!salt || !cd)
        goto out;
    h = crypt_rn(pw, salt, cd, (int)sizeof(*cd));
    if (h && h[0] != '*' && strlen(h) < outlen) {
        snprintf(out, outlen, "%s", h);
        rc = 0;
    }
out:
    free(salt);
    free(cd);
    return rc;
}

/* Nonzero when `pw` matches `stored`; always spends one yescrypt run. */
static int auth_check_password(const char *pw, const char *stored)
{
    struct crypt_data *cd = calloc(1, sizeof(*cd));
    const char *h;
    int ok = 0;

    if (!cd)
        return 0;
    h = crypt_rn(pw, stored, cd, (int)sizeof(*cd));
    if (h && h[0] != '*')
        ok = apiutil_secret_eq(h, stored);
    free(cd);
    return ok;
}

int auth_init(gateway *gw, char *err, size_t errlen)
{
    unsigned char rnd[24];
    char pw[64];

    if (apiutil_random(rnd, sizeof(rnd)) < 0) {
        snprintf(err, errlen, "getrandom failed");
        return -1;
    }
    apiutil_b64url(rnd, sizeof(rnd), pw, sizeof(pw));
    if (auth_hash_password(pw, gw->dummy_hash, sizeof(gw->dummy_hash)) < 0) {
        snprintf(err, errlen, "libcrypt has no yescrypt");
        return -1;
    }
    return 0;
}

/* ---- password guessing --------------------------------------------------- */

/* Answers 429 with Retry-After. */
static void auth_throttled(httpd_req *req, int wait_s, const char *why)
{
    char secs[16];

    snprintf(secs, sizeof(secs), "%d", wait_s);
    httpd_respond_errorf(req, 429, "rate_limited", "%s; retry in %d s", why, wait_s);
    httpd_req_add_header(req, "Retry-After", secs);
}

/* Takes a hash slot, or answers 429 and returns -1. */
static int auth_hash_slot(gateway *gw, httpd_req *req)
{
    if (loginguard_hash_take(gw->logins) == 0)
        return 0;
    metrics_counter_inc(metrics_counter_get(metrics_default(), "gateway_login_throttled_total",
                                            "Logins and registrations refused with 429, by reason.",
                                            "reason=\"hashes\""));
    auth_throttled(req, 1, "too many password checks in progress");
    return -1;
}

/* ---- request bodies ----------------------------------------------------- */

/* Parses the body into an object or answers 400. */
static cJSON *auth_body(httpd_req *req)
{
    cJSON *body = NULL;

    if (httpd_req_json(req, &body) < 0)
        return NULL;
    if (!cJSON_IsObject(body)) {
        cJSON_Delete(body);
        httpd_respond_error(req, 400, "invalid_request", "the body must be a JSON object", NULL);
        return NULL;
    }
    return body;
}

/* Answers 400 with `details` when it has members; returns nonzero then. */
/* Answers 400 when `*details` lists bad fields. The details object then
 * belongs to the response, so *details is set to NULL for the caller's
 * cleanup path. */
static int auth_reject(httpd_req *req, cJSON **details)
{
    if (!cJSON_GetArraySize(*details))
        return 0;
    httpd_respond_error(req, 400, "invalid_request", "invalid fields", *details);
    *details = NULL;
    return 1;
}

/* ---- tokens ------------------------------------------------------------- */

static cJSON *user_json(const PGresult *res, int row)
{
    cJSON *u = cJSON_CreateObject();
    const char *tg = PQgetisnull(res, row, 3) ? NULL : PQgetvalue(res, row, 3);

    cJSON_AddStringToObject(u, "id", PQgetvalue(res, row, 0));
    cJSON_AddStringToObject(u, "username", PQgetvalue(res, row, 1));
    cJSON_AddStringToObject(u, "email", PQgetvalue(res, row, 2));
    if (tg)
        cJSON_AddStringToObject(u, "telegram_chat_id", tg);
    else
        cJSON_AddNullToObject(u, "telegram_chat_id");
    cJSON_AddBoolToObject(u, "is_active", PQgetisnull(res, row, 4) || PQgetvalue(res, row, 4)[0] == 't');
    cJSON_AddStringToObject(u, "created_at", PQgetvalue(res, row, 5));
    return u;
}

/* A new opaque refresh token (43 characters) and its SHA-256. */
static int auth_new_refresh(char tok[64], char hash[65])
{
    unsigned char rnd[32];

    if (apiutil_random(rnd, sizeof(rnd)) < 0)
        return -1;
    apiutil_b64url(rnd, sizeof(rnd), tok, 64);
    apiutil_sha256_hex(tok, hash);
    return 0;
}

/* Stores a refresh token for `user_id` in `family` and answers 200 with
 * the token pair. Runs on `conn` (inside the caller's transaction when it
 * has one, which it then commits). Returns 0, or -1 when it answered with
 * an error. */
/* tokens_valid_after (floor, unix seconds) from a column of "" or digits. */
static long long auth_valid_after(const char *s)
{
    return s && s[0] ? strtoll(s, NULL, 10) : LLONG_MIN;
}

static int auth_issue(gateway *gw, httpd_req *req, PGconn *conn, const char *user_id, const char *username,
                      const char *family, long long valid_after, int in_tx)
{
    long long now = (long long)time(NULL);
    char tok[64], hash[65], ttl[32];
    const char *params[4];
    char *access = NULL;
    cJSON *claims, *out;
    PGresult *res;
    int rc;

    if (auth_new_refresh(tok, hash) < 0) {
        httpd_respond_error(req, 500, "internal", "no randomness", NULL);
        return -1;
    }
    claims = cJSON_CreateObject();
    cJSON_AddStringToObject(claims, "sub", user_id);
    cJSON_AddStringToObject(claims, "user_id", user_id);
    cJSON_AddStringToObject(claims, "username", username);
    /* Tokens issued at or before tokens_valid_after are refused, and iat has
     * whole seconds: a token issued in the second of a logout-everywhere
     * carries the next second, so that it works. */
    if (valid_after != LLONG_MIN && now <= valid_after)
        cJSON_AddNumberToObject(claims, "iat", (double)(valid_after + 1));
    rc = jwtauth_sign(gw->jwt, claims, gw->cfg.access_token_ttl_s, &access);
    cJSON_Delete(claims);
    if (rc < 0 || !access) {
        log_error("cannot sign an access token: %s", jwtauth_reason(rc));
        httpd_respond_error(req, 500, "internal", "cannot sign a token", NULL);
        return -1;
    }
    snprintf(ttl, sizeof(ttl), "%ld", gw->cfg.refresh_token_ttl_s);
    params[0] = hash;
    params[1] = user_id;
    params[2] = family;
    params[3] = ttl;
    res = apiutil_exec(req, conn,
                       "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at) "
                       "VALUES ($1, $2, $3, now() + $4::bigint * interval '1 second')",
                       4, params);
    if (!res)
        goto fail;
    PQclear(res);
    if (in_tx) {
        res = apiutil_exec(req, conn, "COMMIT", 0, NULL);
        if (!res)
            goto fail;
        PQclear(res);
    }
    out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "access_token", access);
    cJSON_AddStringToObject(out, "refresh_token", tok);
    cJSON_AddStringToObject(out, "token_type", "Bearer");
    cJSON_AddNumberToObject(out, "expires_in", (double)gw->cfg.access_token_ttl_s);
    free(access);
    httpd_respond_json(req, 200, out);
    return 0;
fail:
    free(access);
    return -1;
}

/* ---- routes ------------------------------------------------------------- */

static void auth_register(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    cJSON *body = auth_body(req), *details;
    const char *username, *password, *params[3];
    char hash[256], err[512];
    authbody_fields f;
    PGconn *conn = NULL;
    PGresult *res;
    int rc;

    if (!body)
        return;
    details = cJSON_CreateObject();
    (void)authbody_register(body, details, &f);
    if (auth_reject(req, &details))
        goto out;
    cJSON_Delete(details);
    details = NULL;
    username = f.username;
    password = f.password;
    if (auth_hash_slot(gw, req) < 0)
        goto out;
    rc = auth_hash_password(password, hash, sizeof(hash));
    loginguard_hash_give(gw->logins);
    if (rc < 0) {
        httpd_respond_error(req, 500, "internal", "cannot hash the password", NULL);
        goto out;
    }
    if (!(conn = apiutil_db(gw, req)))
        goto out;
    params[0] = username;
    params[1] = f.email_lower;
    params[2] = hash;
    res = dbpool_exec(conn,
                      "INSERT INTO users (username, email, password_hash) VALUES ($1, $2, $3) RETURNING " USER_COLS,
                      3, params, err, sizeof(err));
    if (!res) {
        if (strncmp(err, "23505", 5) == 0) {
            cJSON *d = cJSON_CreateObject();

            cJSON_AddStringToObject(d, strstr(err, "email") ? "email" : "username", "already taken");
            httpd_respond_error(req, 409, "conflict", "an account with this username or email exists", d);
        } else {
            apiutil_db_fail(req, "register", err);
        }
        goto out;
    }
    log_event(LOG_INFO, "user registered", "\"user_id\":\"%s\"", PQgetvalue(res, 0, 0));
    httpd_respond_json(req, 201, user_json(res, 0));
    PQclear(res);
out:
    dbpool_release(gw->db, conn);
    cJSON_Delete(details);
    cJSON_Delete(body);
}

static void auth_login(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    cJSON *body = auth_body(req), *details;
    const char *username, *password, *params[1];
    char family[40], user_id[128], uname[128], account[300];
    authbody_fields f;
    long long valid_after;
    unsigned char rnd[16];
    PGconn *conn = NULL;
    PGresult *res = NULL;
    int found, ok, wait;

    if (!body)
        return;
    details = cJSON_CreateObject();
    (void)authbody_login(body, details, &f);
    if (auth_reject(req, &details))
        goto out;
    username = f.username;
    password = f.password;
    if (!(conn = apiutil_db(gw, req)))
        goto out;
    if (username) {
        params[0] = username;
        res = apiutil_exec(req, conn,
                           "SELECT id, username, password_hash, is_active, " AUTH_VALID_AFTER_COL
                           " FROM users WHERE lower(username) = lower($1)",
                           1, params);
    } else {
        params[0] = f.email_lower;
        res = apiutil_exec(req, conn,
                           "SELECT id, username, password_hash, is_active, " AUTH_VALID_AFTER_COL
                           " FROM users WHERE lower(email) = lower($1)",
                           1, params);
    }
    if (!res)
        goto out;
    found = PQntuples(res) == 1 && !PQgetisnull(res, 0, 2);
    /* The account is the user when known, else the name as given, so that
     * unknown names are limited exactly like known ones. */
    if (found) {
        snprintf(account, sizeof(account), "u:%s", PQgetvalue(res, 0, 0));
    } else {
        memcpy(account, "n:", 3);
        authbody_lower(account + 2, sizeof(account) - 2, username ? username : f.email_lower);
    }
    wait = loginguard_wait(gw->logins, account, svc_now_ms());
    if (wait > 0) {
        metrics_counter_inc(metrics_counter_get(metrics_default(), "gateway_login_throttled_total",
                                                "Logins and registrations refused with 429, by reason.",
                                                "reason=\"account\""));
        auth_throttled(req, wait, "too many failed logins for this account");
        goto out;
    }
    if (auth_hash_slot(gw, req) < 0)
        goto out;
    /* An unknown user costs one yescrypt run too, against a hash nobody
     * knows the password of, so timing does not tell users apart. */
    ok = auth_check_password(password, found ? PQgetvalue(res, 0, 2) : gw->dummy_hash);
    loginguard_hash_give(gw->logins);
    ok = found && ok && !(!PQgetisnull(res, 0, 3) && PQgetvalue(res, 0, 3)[0] == 'f');
    loginguard_record(gw->logins, account, ok, svc_now_ms());
    if (!ok) {
        httpd_respond_error(req, 401, "unauthorized", AUTH_BAD_LOGIN, NULL);
        goto out;
    }
    snprintf(user_id, sizeof(user_id), "%s", PQgetvalue(res, 0, 0));
    snprintf(uname, sizeof(uname), "%s", PQgetvalue(res, 0, 1));
    valid_after = auth_valid_after(PQgetvalue(res, 0, 4));
    PQclear(res);
    params[0] = user_id;
    res = apiutil_exec(req, conn, "UPDATE users SET last_login_at = now() WHERE id = $1", 1, params);
    if (!res)
        goto out;
    if (apiutil_random(rnd, sizeof(rnd)) < 0) {
        httpd_respond_error(req, 500, "internal", "no randomness", NULL);
        goto out;
    }
    for (size_t i = 0; i < sizeof(rnd); i++)
        snprintf(family + 2 * i, 3, "%02x", rnd[i]);
    auth_issue(gw, req, conn, user_id, uname, family, valid_after, 0);
out:
    PQclear(res);
    dbpool_release(gw->db, conn);
    cJSON_Delete(details);
    cJSON_Delete(body);
}

/* Revokes every live token of the family `hash` belongs to. Returns the
 * number revoked, or -1 (after answering) on a database error. */
static int auth_revoke_family(httpd_req *req, PGconn *conn, const char *hash, int only_if_used)
{
    const char *params[1] = {hash};
    PGresult *res;
    int n;

    res = apiutil_exec(req, conn,
                       only_if_used
                           ? "UPDATE refresh_tokens SET revoked_at = now() WHERE revoked_at IS NULL AND family_id = "
                             "(SELECT family_id FROM refresh_tokens WHERE token_hash = $1 AND used_at IS NOT NULL)"
                           : "UPDATE refresh_tokens SET revoked_at = now() WHERE revoked_at IS NULL AND family_id = "
                             "(SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
                       1, params);
    if (!res)
        return -1;
    n = (int)strtol(PQcmdTuples(res), NULL, 10);
    PQclear(res);
    return n;
}

static void auth_refresh(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    cJSON *body = auth_body(req), *details;
    const char *tok, *params[1];
    char hash[65], user_id[128], uname[128], family[128];
    authbody_fields f;
    PGconn *conn = NULL;
    PGresult *res = NULL;

    if (!body)
        return;
    details = cJSON_CreateObject();
    (void)authbody_refresh(body, details, &f);
    if (auth_reject(req, &details))
        goto out;
    tok = f.refresh_token;
    apiutil_sha256_hex(tok, hash);
    if (!(conn = apiutil_db(gw, req)))
        goto out;
    if (!(res = apiutil_exec(req, conn, "BEGIN", 0, NULL)))
        goto out;
    PQclear(res);
    params[0] = hash;
    /* The row lock taken by UPDATE makes two concurrent refreshes with the
     * same token serialise: the second finds used_at set. */
    res = apiutil_exec(req, conn,
                       "UPDATE refresh_tokens r SET used_at = now() FROM users u "
                       "WHERE r.token_hash = $1 AND r.used_at IS NULL AND r.revoked_at IS NULL "
                       "AND r.expires_at > now() AND u.id = r.user_id AND u.is_active IS NOT FALSE "
                       "RETURNING r.user_id, u.username, r.family_id, " AUTH_VALID_AFTER_U_COL,
                       1, params);
    if (!res)
        goto out;
    if (PQntuples(res) != 1) {
        int n;

        PQclear(res);
        res = NULL;
        n = auth_revoke_family(req, conn, hash, 1);
        if (n < 0)
            goto out;
        if ((res = apiutil_exec(req, conn, "COMMIT", 0, NULL)) == NULL)
            goto out;
        if (n > 0)
            log_event(LOG_WARN, "refresh token replayed: session revoked", "\"request_id\":\"%s\"",
                      httpd_req_id(req));
        httpd_respond_error(req, 401, "unauthorized", AUTH_BAD_REFRESH, NULL);
        goto out;
    }
    snprintf(user_id, sizeof(user_id), "%s", PQgetvalue(res, 0, 0));
    snprintf(uname, sizeof(uname), "%s", PQgetvalue(res, 0, 1));
    snprintf(family, sizeof(family), "%s", PQgetvalue(res, 0, 2));
    auth_issue(gw, req, conn, user_id, uname, family, auth_valid_after(PQgetvalue(res, 0, 3)), 1);
out:
    PQclear(res);
    dbpool_release(gw->db, conn); /* rolls back an unfinished transaction */
    cJSON_Delete(details);
    cJSON_Delete(body);
}

static void auth_logout(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    cJSON *body = auth_body(req), *details;
    const char *tok;
    char hash[65];
    authbody_fields f;
    PGconn *conn = NULL;

    if (!body)
        return;
    details = cJSON_CreateObject();
    (void)authbody_refresh(body, details, &f);
    if (auth_reject(req, &details))
        goto out;
    tok = f.refresh_token;
    apiutil_sha256_hex(tok, hash);
    if (!(conn = apiutil_db(gw, req)))
        goto out;
    /* Unknown tokens answer the same 204: logout is idempotent and tells
     * nothing about which tokens exist. */
    if (auth_revoke_family(req, conn, hash, 0) >= 0)
        httpd_respond_static(req, 204, NULL, "", 0);
out:
    dbpool_release(gw->db, conn);
    cJSON_Delete(details);
    cJSON_Delete(body);
}

/* POST /api/v1/auth/logout-all: every access token of the caller issued
 * until now stops working at once, on every gateway instance (revocation.h),
 * and every refresh token is revoked. One statement, so both or neither. */
static void auth_logout_all(httpd_req *req, void *ud)
{
    gateway *gw = ud;
    auth_user user;
    char now_s[32];
    const char *params[2];
    PGconn *conn;
    PGresult *res;

    if (auth_require(gw, req, &user) < 0 || !(conn = apiutil_db(gw, req)))
        return;
    snprintf(now_s, sizeof(now_s), "%lld", (long long)time(NULL));
    params[0] = user.user_id;
    params[1] = now_s;
    res = apiutil_exec(req, conn,
                       "WITH u AS (UPDATE users SET updated_at = now(), tokens_valid_after = "
                       "greatest(coalesce(tokens_valid_after, '-infinity'), to_timestamp($2::bigint)) "
                       "WHERE id = $1 RETURNING id) "
                       "UPDATE refresh_tokens SET revoked_at = now() "
                       "WHERE user_id IN (SELECT id FROM u) AND revoked_at IS NULL",
                       2, params);
    dbpool_release(gw->db, conn);
    if (!res)
        return;
    PQclear(res);
    revocation_forget(gw->revocation, user.user_id);
    {
        char esc[300];

        log_event(LOG_INFO, "signed out everywhere", "\"user_id\":\"%s\"",
                  log_escape(esc, sizeof(esc), user.user_id));
    }
    httpd_respond_static(req, 204, NULL, "", 0);
}

int auth_check(gateway *gw, httpd_req *req, auth_user *out)
{
    const char *hdr = httpd_req_header(req, "Authorization");
    const char *tok = hdr ? jwtauth_bearer(hdr) : NULL;
    cJSON *claims = NULL;
    const cJSON *sub, *name, *iat;
    char err[256];
    int rc;

    if (!tok) {
        httpd_respond_error(req, 401, "unauthorized", "missing Bearer token", NULL);
        httpd_req_add_header(req, "WWW-Authenticate", "Bearer");
        return -1;
    }
    rc = jwtauth_verify(gw->jwt, tok, &claims);
    if (rc < 0) {
        cJSON *d = cJSON_CreateObject();

        cJSON_AddStringToObject(d, "reason", jwtauth_reason(rc));
        httpd_respond_error(req, 401, "unauthorized", jwtauth_message(rc), d);
        httpd_req_add_header(req, "WWW-Authenticate", "Bearer error=\"invalid_token\"");
        cJSON_Delete(claims);
        return -1;
    }
    sub = cJSON_GetObjectItemCaseSensitive(claims, "sub");
    name = cJSON_GetObjectItemCaseSensitive(claims, "username");
    iat = cJSON_GetObjectItemCaseSensitive(claims, "iat");
    if (!cJSON_IsString(sub) || !sub->valuestring[0] || strlen(sub->valuestring) >= sizeof(out->user_id)) {
        cJSON_Delete(claims);
        httpd_respond_error(req, 401, "unauthorized", "invalid token: no subject", NULL);
        return -1;
    }
    snprintf(out->user_id, sizeof(out->user_id), "%s", sub->valuestring);
    snprintf(out->username, sizeof(out->username), "%s", cJSON_IsString(name) ? name->valuestring : "");
    /* A token without iat counts as issued at the epoch: refused once its
     * user has signed out everywhere. */
    rc = revocation_check(gw->revocation, gw->db, out->user_id, cJSON_IsNumber(iat) ? (long long)iat->valuedouble : 0,
                          err, sizeof(err));
    cJSON_Delete(claims);
    if (rc < 0) {
        log_event(LOG_WARN, "cannot check token revocation", "\"request_id\":\"%s\"", httpd_req_id(req));
        httpd_respond_error(req, 503, "unavailable", "the database is unavailable", NULL);
        return -1;
    }
    if (rc != REVOCATION_OK) {
        static const char *const reasons[] = {"", "token_revoked", "account_inactive", "account_unknown"};
        cJSON *d = cJSON_CreateObject();

        cJSON_AddStringToObject(d, "reason", reasons[rc]);
        httpd_respond_error(req, 401, "unauthorized", revocation_message(rc), d);
        httpd_req_add_header(req, "WWW-Authenticate", "Bearer error=\"invalid_token\"");
        return -1;
    }
    return 0;
}

int auth_require(gateway *gw, httpd_req *req, auth_user *out)
{
    const auth_user *seen = httpd_req_ctx(req);

    if (seen) {
        *out = *seen;
        return 0;
    }
    return auth_check(gw, req, out);
}

int gateway_auth_routes(gateway *gw)
{
    if (httpd_route(gw->http, "POST", "/api/v1/auth/register", auth_register, gw) < 0 ||
        httpd_route(gw->http, "POST", "/api/v1/auth/login", auth_login, gw) < 0 ||
        httpd_route(gw->http, "POST", "/api/v1/auth/refresh", auth_refresh, gw) < 0 ||
        httpd_route(gw->http, "POST", "/api/v1/auth/logout", auth_logout, gw) < 0 ||
        httpd_route(gw->http, "POST", "/api/v1/auth/logout-all", auth_logout_all, gw) < 0)
        return -1;
    return 0;
}
