#include "rconn.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

#include "backoff.h"
#include "fmt.h"
#include "log.h"
#include "redact.h"
#include "svc.h"

#define RCONN_ERR_MAX 512
#define RCONN_BACKOFF_BASE_MS 100
#define RCONN_BACKOFF_MAX_MS 5000
#define RCONN_DB_MAX 65535

struct rconn {
    rconn_opts o;
    int timeout_ms;
    redisContext *ctx;
    backoff bo;
    int down;
    long long retry_at_ms;
    char err[RCONN_ERR_MAX];
};

static void seterr(char *err, size_t errlen, const char *fmt, const char *arg)
{
    if (err && errlen)
        snprintf(err, errlen, fmt, arg);
}

/* ---- URL parsing ---- */

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch = tolower(ch);
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    return -1;
}

/* %-decodes src[0..n) into dst (size dstlen). Returns -1 on a bad escape,
 * an embedded NUL or overflow. */
static int pct_decode(char *dst, size_t dstlen, const char *src, size_t n)
{
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        int ch = (unsigned char)src[i];

        if (ch == '%') {
            int hi, lo;

            if (i + 2 >= n)
                return -1;
            hi = hexval((unsigned char)src[i + 1]);
            lo = hexval((unsigned char)src[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            ch = hi * 16 + lo;
            if (ch == 0)
                return -1;
            i += 2;
        }
        if (o + 1 >= dstlen)
            return -1;
        dst[o++] = (char)ch;
    }
    dst[o] = '\0';
    return 0;
}

/* Parses a decimal integer in [min, max] from s[0..n). */
static int parse_range(const char *s, size_t n, long min, long max, long *out)
{
    char buf[24], *end;
    long v;

    if (n == 0 || n >= sizeof(buf))
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)buf[i]))
            return -1;
    errno = 0;
    v = strtol(buf, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static void opts_defaults(rconn_opts *o)
{
    memset(o, 0, sizeof(*o));
    snprintf(o->host, sizeof(o->host), "127.0.0.1");
    o->port = 6379;
}

/* unix:///path[?db=N] */
static int parse_unix(const char *rest, rconn_opts *o, char *err, size_t errlen)
{
    const char *q = strchr(rest, '?');
    size_t plen = q ? (size_t)(q - rest) : strlen(rest);
    long db;

    if (plen == 0 || rest[0] != '/') {
        seterr(err, errlen, "%s", "unix:// URL needs an absolute socket path (unix:///path/to/redis.sock)");
        return -1;
    }
    if (pct_decode(o->unix_path, sizeof(o->unix_path), rest, plen) < 0) {
        seterr(err, errlen, "%s", "unix socket path too long or badly escaped");
        return -1;
    }
    if (q) {
        if (strncmp(q + 1, "db=", 3) != 0 || parse_range(q + 4, strlen(q + 4), 0, RCONN_DB_MAX, &db) < 0) {
            seterr(err, errlen, "%s", "the only query parameter allowed is db=N (0-65535)");
            return -1;
        }
        o->db = (int)db;
    }
    return 0;
}

int rconn_parse_url(const char *url, rconn_opts *o, char *err, size_t errlen)
{
    const char *p, *at, *hostend, *slash, *colon;
    long v;

    if (err && errlen)
        err[0] = '\0';
    if (!url || !o) {
        seterr(err, errlen, "%s", "no URL");
        return -1;
    }
    opts_defaults(o);
    if (strncasecmp(url, "rediss://", 9) == 0) {
        seterr(err, errlen, "%s", "rediss:// (TLS) is not supported; use redis://");
        return -1;
    }
    if (strncasecmp(url, "unix://", 7) == 0)
        return parse_unix(url + 7, o, err, errlen);
    if (strncasecmp(url, "redis://", 8) != 0) {
        seterr(err, errlen, "%s", "a URL redis://[:password@]host[:port][/db]");
        return -1;
    }
    p = url + 8;
    if (strpbrk(p, "?#")) {
        seterr(err, errlen, "%s", "query strings and fragments are not supported in REDIS_URL");
        return -1;
    }
    slash = strchr(p, '/');
    /* The password may contain '@' only %-encoded; the last '@' before the
     * path ends the userinfo. */
    at = NULL;
    for (const char *s = p; *s && s != slash; s++)
        if (*s == '@')
            at = s;
    if (at) {
        const char *ucolon = memchr(p, ':', (size_t)(at - p));

        if (!ucolon) {
            /* "redis://secret@host": treat a lone userinfo as the password,
             * as redis-py and most clients do. */
            ucolon = p - 1;
        } else if (ucolon > p && !((ucolon - p) == 7 && strncmp(p, "default", 7) == 0)) {
            seterr(err, errlen, "%s", "ACL user names are not supported (use redis://:password@host)");
            return -1;
        }
        if (pct_decode(o->password, sizeof(o->password), ucolon + 1, (size_t)(at - ucolon - 1)) < 0) {
            seterr(err, errlen, "%s", "password too long or badly %-escaped");
            return -1;
        }
        p = at + 1;
    }
    hostend = slash ? slash : p + strlen(p);
    if (*p == '[') {
        const char *rb = memchr(p, ']', (size_t)(hostend - p));

        if (!rb || rb == p + 1 || (size_t)(rb - p - 1) >= sizeof(o->host)) {
            seterr(err, errlen, "%s", "bad IPv6 host (expected [addr])");
            return -1;
        }
        memcpy(o->host, p + 1, (size_t)(rb - p - 1));
        o->host[rb - p - 1] = '\0';
        colon = rb + 1 < hostend && rb[1] == ':' ? rb + 1 : NULL;
        if (!colon && rb + 1 != hostend) {
            seterr(err, errlen, "%s", "unexpected text after IPv6 host");
            return -1;
        }
    } else {
        colon = memchr(p, ':', (size_t)(hostend - p));
        {
            size_t hl = (size_t)((colon ? colon : hostend) - p);

            if (hl >= sizeof(o->host)) {
                seterr(err, errlen, "%s", "host name too long");
                return -1;
            }
            if (hl > 0) {
                memcpy(o->host, p, hl);
                o->host[hl] = '\0';
            }
        }
    }
    if (colon) {
        if (parse_range(colon + 1, (size_t)(hostend - colon - 1), 1, 65535, &v) < 0) {
            seterr(err, errlen, "%s", "port must be an integer from 1 to 65535");
            return -1;
        }
        o->port = (int)v;
    }
    if (slash && slash[1]) {
        if (parse_range(slash + 1, strlen(slash + 1), 0, RCONN_DB_MAX, &v) < 0) {
            seterr(err, errlen, "%s", "database must be an integer from 0 to 65535 (redis://host:port/N)");
            return -1;
        }
        o->db = (int)v;
    }
    return 0;
}

/* One line at start saying which Redis the service uses, secrets masked. */
static void rconn_log_target(const char *url, const rconn_opts *o)
{
    char shown[600], esc[1200];

    if (url)
        redact_url(shown, sizeof(shown), url);
    else
        snprintf(shown, sizeof(shown), "redis://%s%s:%d/%d", o->password[0] ? ":***@" : "", o->host, o->port, o->db);
    log_event(LOG_INFO, "redis", "\"url\":\"%s\"", log_escape(esc, sizeof(esc), shown));
}

int rconn_opts_from_cfg(cfg *c, rconn_opts *o)
{
    const char *url, *host, *pass;
    char err[256], shown[512];
    int rc = 0;
    long v;

    if (!c || !o)
        return -1;
    url = cfg_str(c, "REDIS_URL", NULL);
    if (url) {
        if (rconn_parse_url(url, o, err, sizeof(err)) < 0) {
            redact_url(shown, sizeof(shown), url);
            cfg_error(c, "REDIS_URL", shown, err);
            opts_defaults(o);
            return -1;
        }
        rconn_log_target(url, o);
        return 0;
    }
    opts_defaults(o);
    host = cfg_str(c, "REDIS_HOST", "127.0.0.1");
    if (strlen(host) >= sizeof(o->host)) {
        cfg_error(c, "REDIS_HOST", "(too long)", "a host name shorter than 256 bytes");
        rc = -1;
    } else {
        snprintf(o->host, sizeof(o->host), "%s", host);
    }
    v = cfg_int(c, "REDIS_PORT", -1, 1, 65535);
    if (v == -1) {
        if (cfg_str(c, "REDIS_PORT", NULL))
            rc = -1;
        v = 6379;
    }
    o->port = (int)v;
    pass = cfg_str(c, "REDIS_PASSWORD", NULL);
    if (pass) {
        if (strlen(pass) >= sizeof(o->password)) {
            cfg_error(c, "REDIS_PASSWORD", "(not shown)", "a password shorter than 256 bytes");
            rc = -1;
        } else {
            snprintf(o->password, sizeof(o->password), "%s", pass);
        }
    }
    v = cfg_int(c, "REDIS_DB", -1, 0, RCONN_DB_MAX);
    if (v == -1) {
        if (cfg_str(c, "REDIS_DB", NULL))
            rc = -1;
        v = 0;
    }
    o->db = (int)v;
    if (rc == 0)
        rconn_log_target(NULL, o);
    return rc;
}

/* ---- connection ---- */

rconn *rconn_new(const rconn_opts *o, int timeout_ms)
{
    rconn *r;

    if (!o)
        return NULL;
    r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->o = *o;
    r->timeout_ms = timeout_ms > 0 ? timeout_ms : 5000;
    backoff_init(&r->bo, RCONN_BACKOFF_BASE_MS, RCONN_BACKOFF_MAX_MS);
    return r;
}

void rconn_free(rconn *r)
{
    if (!r)
        return;
    if (r->ctx)
        redisFree(r->ctx);
    free(r);
}

void rconn_mark_broken(rconn *r)
{
    if (!r || !r->ctx)
        return;
    redisFree(r->ctx);
    r->ctx = NULL;
}

static const char *where(const rconn *r, char *buf, size_t len)
{
    if (r->o.unix_path[0])
        snprintf(buf, len, "%s", r->o.unix_path);
    else
        snprintf(buf, len, "%s:%d", r->o.host, r->o.port);
    return buf;
}

static void connect_failed(rconn *r)
{
    char esc[RCONN_ERR_MAX + 64], w[300], wesc[620];
    long delay = backoff_next_ms(&r->bo);

    r->down = 1;
    r->retry_at_ms = svc_now_ms() + delay;
    log_event(LOG_WARN, "redis unavailable", "\"addr\":\"%s\",\"attempt\":%d,\"retry_in_ms\":%ld,\"error\":\"%s\"",
              log_escape(wesc, sizeof(wesc), where(r, w, sizeof(w))), r->bo.attempt, delay,
              log_escape(esc, sizeof(esc), r->err));
}

/* Runs AUTH or SELECT during the handshake. */
static int handshake_cmd(rconn *r, const char *what, int argc, const char **argv)
{
    redisReply *rep = redisCommandArgv(r->ctx, argc, argv, NULL);

    if (!rep) {
        snprintf(r->err, sizeof(r->err), "%s: %s", what, r->ctx->errstr);
        return -1;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        snprintf(r->err, sizeof(r->err), "%s: %s", what, rep->str);
        freeReplyObject(rep);
        return -1;
    }
    freeReplyObject(rep);
    return 0;
}

static int do_connect(rconn *r, int force)
{
    struct timeval tv;
    char dbs[16];

    if (r->ctx && !r->ctx->err)
        return 0;
    rconn_mark_broken(r);
    if (r->down && !force && svc_now_ms() < r->retry_at_ms) {
        /* r->err keeps the cause of the last failure. */
        return -1;
    }
    tv.tv_sec = r->timeout_ms / 1000;
    tv.tv_usec = (r->timeout_ms % 1000) * 1000;
    if (r->o.unix_path[0])
        r->ctx = redisConnectUnixWithTimeout(r->o.unix_path, tv);
    else
        r->ctx = redisConnectWithTimeout(r->o.host, r->o.port, tv);
    if (!r->ctx || r->ctx->err) {
        snprintf(r->err, sizeof(r->err), "connect: %s", r->ctx ? r->ctx->errstr : "out of memory");
        goto fail;
    }
    if (redisSetTimeout(r->ctx, tv) != REDIS_OK) {
        snprintf(r->err, sizeof(r->err), "set timeout: %s", r->ctx->errstr);
        goto fail;
    }
    if (!r->o.unix_path[0])
        redisEnableKeepAlive(r->ctx);
    if (r->o.password[0]) {
        const char *argv[] = {"AUTH", r->o.password};

        if (handshake_cmd(r, "AUTH", 2, argv) < 0)
            goto fail;
    }
    if (r->o.db) {
        const char *argv[] = {"SELECT", dbs};

        snprintf(dbs, sizeof(dbs), "%d", r->o.db);
        if (handshake_cmd(r, "SELECT", 2, argv) < 0)
            goto fail;
    }
    if (r->down) {
        char w[300], wesc[620];

        log_event(LOG_INFO, "redis connection restored", "\"addr\":\"%s\",\"failed_attempts\":%d",
                  log_escape(wesc, sizeof(wesc), where(r, w, sizeof(w))), r->bo.attempt);
    }
    r->down = 0;
    backoff_reset(&r->bo);
    r->err[0] = '\0';
    return 0;
fail:
    rconn_mark_broken(r);
    connect_failed(r);
    return -1;
}

int rconn_connect(rconn *r)
{
    if (!r)
        return -1;
    return do_connect(r, 0);
}

redisContext *rconn_context(rconn *r)
{
    if (!r || !r->ctx || r->ctx->err)
        return NULL;
    return r->ctx;
}

/* Sends a formatted command and reads its reply, retrying once on a fresh
 * connection when allowed. */
static redisReply *send_formatted(rconn *r, int idempotent, const char *cmd, size_t len)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        void *reply = NULL;

        /* The retry connects even inside a back-off window: the failure was
         * on an established connection, not a refused connect. */
        if (do_connect(r, attempt > 0) < 0)
            return NULL;
        if (redisAppendFormattedCommand(r->ctx, cmd, len) == REDIS_OK &&
            redisGetReply(r->ctx, &reply) == REDIS_OK && reply)
            return reply;
        snprintf(r->err, sizeof(r->err), "%s", r->ctx->errstr[0] ? r->ctx->errstr : "I/O error");
        rconn_mark_broken(r);
        if (!idempotent)
            break;
    }
    return NULL;
}

redisReply *rconn_command(rconn *r, int idempotent, const char *fmt, ...)
{
    char *cmd = NULL;
    redisReply *rep;
    va_list ap;
    int len;

    if (!r || !fmt)
        return NULL;
    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0) {
        snprintf(r->err, sizeof(r->err), "%s", len == -2 ? "invalid command format" : "out of memory");
        return NULL;
    }
    rep = send_formatted(r, idempotent, cmd, (size_t)len);
    redisFreeCommand(cmd);
    return rep;
}

redisReply *rconn_command_argv(rconn *r, int idempotent, int argc, const char **argv,
                               const size_t *argvlen)
{
    char *cmd = NULL;
    redisReply *rep;
    int len;

    if (!r || argc < 1 || !argv)
        return NULL;
    len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
    if (len < 0) {
        snprintf(r->err, sizeof(r->err), "out of memory");
        return NULL;
    }
    rep = send_formatted(r, idempotent, cmd, (size_t)len);
    redisFreeCommand(cmd);
    return rep;
}

/* Most EVALs have a handful of keys and arguments: those need no heap. */
#define RCONN_EVAL_STACK 24

redisReply *rconn_eval(rconn *r, int idempotent, const char *script, int nkeys, int nargs,
                       const char *const *keys_args, const size_t *lens)
{
    const char *sargv[RCONN_EVAL_STACK], **argv = sargv;
    size_t slens[RCONN_EVAL_STACK], *argvlen = lens ? slens : NULL;
    char snkeys[FMT_I64_MAX];
    int argc = 3 + nkeys + nargs;
    redisReply *rep = NULL;

    if (!r || nkeys < 0 || nargs < 0 || (nkeys + nargs && !keys_args))
        return NULL;
    if (argc > RCONN_EVAL_STACK) {
        argv = malloc((size_t)argc * sizeof(*argv));
        argvlen = lens ? malloc((size_t)argc * sizeof(*argvlen)) : NULL;
        if (!argv || (lens && !argvlen)) {
            snprintf(r->err, sizeof(r->err), "out of memory");
            goto out;
        }
    }
    fmt_i64(snkeys, nkeys);
    argv[0] = "EVAL";
    argv[1] = script;
    argv[2] = snkeys;
    if (nkeys + nargs)
        memcpy(argv + 3, keys_args, (size_t)(nkeys + nargs) * sizeof(*argv));
    if (argvlen) {
        argvlen[0] = 4;
        argvlen[1] = strlen(script);
        argvlen[2] = strlen(snkeys);
        if (nkeys + nargs)
            memcpy(argvlen + 3, lens, (size_t)(nkeys + nargs) * sizeof(*argvlen));
    }
    rep = rconn_command_argv(r, idempotent, argc, argv, argvlen);
out:
    if (argv != sargv)
        free(argv);
    if (argvlen != slens)
        free(argvlen);
    return rep;
}

const char *rconn_errstr(const rconn *r)
{
    return r ? r->err : "no connection handle";
}

int rconn_ping(rconn *r)
{
    redisReply *rep = rconn_command(r, 1, "PING");
    int ok;

    if (!rep)
        return -1;
    ok = rep->type == REDIS_REPLY_STATUS && rep->str && strcmp(rep->str, "PONG") == 0;
    if (!ok)
        snprintf(r->err, sizeof(r->err), "PING: %s", rep->str ? rep->str : "unexpected reply");
    freeReplyObject(rep);
    return ok ? 0 : -1;
}
