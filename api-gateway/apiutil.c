#include "apiutil.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <openssl/sha.h>

#include "event_model.h"
#include "log.h"

PGconn *apiutil_db(gateway *gw, httpd_req *req)
{
    PGconn *conn = dbpool_acquire(gw->db, APIUTIL_DB_WAIT_MS);

    if (!conn) {
        char why[256];

        log_event(LOG_WARN, "database unavailable", "\"reason\":\"%s\"",
                  log_escape(why, sizeof(why), dbpool_errstr(gw->db, why, sizeof(why))));
        httpd_respond_error(req, 503, "unavailable", "the database is unavailable, retry later", NULL);
    }
    return conn;
}

void apiutil_db_fail(httpd_req *req, const char *what, const char *err)
{
    char esc[512];

    log_event(LOG_ERROR, "query failed", "\"query\":\"%s\",\"reason\":\"%s\",\"request_id\":\"%s\"", what,
              log_escape(esc, sizeof(esc), err), httpd_req_id(req));
    if (strncmp(err, "08", 2) == 0 || strncmp(err, "57P", 3) == 0)
        httpd_respond_error(req, 503, "unavailable", "the database is unavailable, retry later", NULL);
    else
        httpd_respond_error(req, 500, "internal", "internal error", NULL);
}

PGresult *apiutil_exec(httpd_req *req, PGconn *conn, const char *sql, int n, const char *const *params)
{
    char err[512];
    PGresult *res = dbpool_exec(conn, sql, n, params, err, sizeof(err));

    if (!res)
        apiutil_db_fail(req, "exec", err);
    return res;
}

/* Nonzero when `res` succeeded; otherwise writes "SQLSTATE: message". */
static int apiutil_res_ok(PGconn *conn, const PGresult *res, char *err, size_t errlen)
{
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    const char *state, *msg;

    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return 1;
    state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    msg = res ? PQresultErrorMessage(res) : PQerrorMessage(conn);
    snprintf(err, errlen, "%s: %s", state ? state : "08006", msg && *msg ? msg : "no result");
    return 0;
}

PGresult *apiutil_exec_prepared(httpd_req *req, PGconn *conn, const char *name, const char *sql, int n,
                                const char *const *params)
{
    char err[512];
    PGresult *res;

    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        return apiutil_exec(req, conn, sql, n, params);
    res = PQexecPrepared(conn, name, n, params, NULL, NULL, 0);
    if (!apiutil_res_ok(conn, res, err, sizeof(err)) && strncmp(err, "26000", 5) == 0) {
        PQclear(res);
        res = PQprepare(conn, name, sql, n, NULL);
        if (!apiutil_res_ok(conn, res, err, sizeof(err))) {
            PQclear(res);
            apiutil_db_fail(req, name, err);
            return NULL;
        }
        PQclear(res);
        res = PQexecPrepared(conn, name, n, params, NULL, NULL, 0);
    }
    if (!apiutil_res_ok(conn, res, err, sizeof(err))) {
        PQclear(res);
        apiutil_db_fail(req, name, err);
        return NULL;
    }
    return res;
}

int apiutil_limit(httpd_req *req, int def, int max, int *out, cJSON *details)
{
    const char *s = httpd_req_query(req, "limit");
    int64_t v;

    *out = def;
    if (!s)
        return 0;
    if (event_model_parse_i64(s, &v) < 0 || v < 1 || v > max) {
        char msg[64];

        snprintf(msg, sizeof(msg), "must be an integer from 1 to %d", max);
        cJSON_AddStringToObject(details, "limit", msg);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static const char b64url_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

char *apiutil_b64url(const unsigned char *in, size_t len, char *out, size_t outlen)
{
    size_t o = 0;

    for (size_t i = 0; i < len && o + 5 < outlen; i += 3) {
        unsigned v = (unsigned)in[i] << 16;

        if (i + 1 < len)
            v |= (unsigned)in[i + 1] << 8;
        if (i + 2 < len)
            v |= in[i + 2];
        out[o++] = b64url_chars[(v >> 18) & 63];
        out[o++] = b64url_chars[(v >> 12) & 63];
        if (i + 1 < len)
            out[o++] = b64url_chars[(v >> 6) & 63];
        if (i + 2 < len)
            out[o++] = b64url_chars[v & 63];
    }
    out[o] = '\0';
    return out;
}

static int b64url_val(int c)
{
    const char *p = c ? strchr(b64url_chars, c) : NULL;

    return p ? (int)(p - b64url_chars) : -1;
}

/* Decodes base64url without padding; returns the length or -1. */
static long b64url_decode(const char *in, unsigned char *out, size_t outlen)
{
    size_t n = strlen(in), o = 0;

    if (n % 4 == 1)
        return -1;
    for (size_t i = 0; i < n; i += 4) {
        int c[4] = {0, 0, 0, 0};
        size_t k = n - i < 4 ? n - i : 4;
        unsigned v = 0;

        for (size_t j = 0; j < k; j++) {
            c[j] = b64url_val((unsigned char)in[i + j]);
            if (c[j] < 0)
                return -1;
        }
        v = (unsigned)c[0] << 18 | (unsigned)c[1] << 12 | (unsigned)c[2] << 6 | (unsigned)c[3];
        for (size_t j = 0; j + 1 < k; j++) {
            if (o >= outlen)
                return -1;
            out[o++] = (unsigned char)(v >> (16 - 8 * j));
        }
    }
    return (long)o;
}

char *apiutil_cursor_encode(const char *usec, const char *id)
{
    size_t rawlen = strlen(usec) + strlen(id) + 2;
    char *raw = malloc(rawlen), *out;

    if (!raw)
        return NULL;
    snprintf(raw, rawlen, "%s:%s", usec, id);
    out = malloc(rawlen * 4 / 3 + 8);
    if (out)
        apiutil_b64url((const unsigned char *)raw, strlen(raw), out, rawlen * 4 / 3 + 8);
    free(raw);
    return out;
}

int apiutil_cursor_decode(httpd_req *req, char *usec, size_t usec_len, char *id, size_t id_len,
                          cJSON *details)
{
    const char *s = httpd_req_query(req, "cursor");
    unsigned char raw[600];
    long n;
    char *colon;
    int64_t v;

    usec[0] = id[0] = '\0';
    if (!s || !*s)
        return 0;
    if (strlen(s) > 780 || (n = b64url_decode(s, raw, sizeof(raw) - 1)) <= 0)
        goto bad;
    raw[n] = '\0';
    if (memchr(raw, '\0', (size_t)n))
        goto bad;
    colon = strchr((char *)raw, ':');
    if (!colon || colon == (char *)raw || !colon[1])
        goto bad;
    *colon = '\0';
    if (event_model_parse_i64((char *)raw, &v) < 0 || strlen((char *)raw) >= usec_len ||
        strlen(colon + 1) >= id_len)
        goto bad;
    snprintf(usec, usec_len, "%s", (char *)raw);
    snprintf(id, id_len, "%s", colon + 1);
    return 0;
bad:
    usec[0] = id[0] = '\0';
    cJSON_AddStringToObject(details, "cursor", "malformed cursor (use next_cursor from a previous page)");
    return -1;
}

/* Reads exactly `n` digits. */
static int digits(const char **p, int n, int *out)
{
    int v = 0;

    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)(*p)[i]))
            return -1;
        v = v * 10 + ((*p)[i] - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

int apiutil_parse_time(const char *s, int64_t *out)
{
    const char *p = s;
    int y, mo, d, h, mi, sec, oh = 0, om = 0, sign = 0;
    struct tm tm;
    int64_t t;

    if (!s || !*s)
        return -1;
    if (event_model_parse_i64(s, out) == 0)
        return 0;
    if (digits(&p, 4, &y) || *p++ != '-' || digits(&p, 2, &mo) || *p++ != '-' || digits(&p, 2, &d))
        return -1;
    if (*p != 'T' && *p != 't' && *p != ' ')
        return -1;
    p++;
    if (digits(&p, 2, &h) || *p++ != ':' || digits(&p, 2, &mi) || *p++ != ':' || digits(&p, 2, &sec))
        return -1;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return -1;
        while (isdigit((unsigned char)*p))
            p++;
    }
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        sign = *p++ == '-' ? -1 : 1;
        if (digits(&p, 2, &oh) || *p++ != ':' || digits(&p, 2, &om))
            return -1;
    } else {
        return -1;
    }
    if (*p || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60 || oh > 23 || om > 59)
        return -1;
    memset(&tm, 0, sizeof(tm));
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = sec;
    t = (int64_t)timegm(&tm);
    if (tm.tm_mday != d) /* 2023-02-30 normalised into March */
        return -1;
    *out = t - (int64_t)sign * (oh * 3600 + om * 60);
    return 0;
}

int apiutil_secret_eq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char diff = (unsigned char)(la != lb);

    for (size_t i = 0; i < lb; i++)
        diff |= (unsigned char)(b[i] ^ (i < la ? a[i] : 0));
    return diff == 0;
}

void apiutil_sha256_hex(const char *s, char out[65])
{
    unsigned char md[SHA256_DIGEST_LENGTH];

    SHA256((const unsigned char *)s, strlen(s), md);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

int apiutil_random(unsigned char *buf, size_t len)
{
    size_t got = 0;

    while (got < len) {
        ssize_t n = getrandom(buf + got, len - got, 0);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

/* PostgreSQL type oids (pg_type.dat); libpq does not export them. */
enum { OID_BOOL = 16, OID_INT8 = 20, OID_INT2 = 21, OID_INT4 = 23, OID_JSON = 114, OID_FLOAT4 = 700,
       OID_FLOAT8 = 701, OID_NUMERIC = 1700, OID_JSONB = 3802 };

cJSON *apiutil_row_json(const PGresult *res, int row)
{
    cJSON *o = cJSON_CreateObject();

    if (!o)
        return NULL;
    for (int f = 0; f < PQnfields(res); f++) {
        const char *name = PQfname(res, f), *v = PQgetvalue(res, row, f);
        cJSON *it;

        if (strncmp(name, "cursor_", 7) == 0)
            continue;
        if (PQgetisnull(res, row, f)) {
            it = cJSON_CreateNull();
        } else {
            switch (PQftype(res, f)) {
            case OID_BOOL:
                it = cJSON_CreateBool(v[0] == 't');
                break;
            case OID_INT2:
            case OID_INT4:
            case OID_INT8:
            case OID_FLOAT4:
            case OID_FLOAT8:
            case OID_NUMERIC:
                it = cJSON_CreateNumber(strtod(v, NULL));
                break;
            case OID_JSON:
            case OID_JSONB:
                it = cJSON_Parse(v);
                if (!it)
                    it = cJSON_CreateString(v);
                break;
            default:
                it = cJSON_CreateString(v);
            }
        }
        if (!it || !cJSON_AddItemToObject(o, name, it)) {
            cJSON_Delete(it);
            cJSON_Delete(o);
            return NULL;
        }
    }
    return o;
}
