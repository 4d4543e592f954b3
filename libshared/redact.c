#include "redact.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>

#define REDACT_MASK "***"

typedef struct {
    char *dst;
    size_t len, used;
} redact_out;

static void out_put(redact_out *o, const char *s, size_t n)
{
    size_t room = o->len - 1 - o->used;

    if (n > room)
        n = room;
    memcpy(o->dst + o->used, s, n);
    o->used += n;
    o->dst[o->used] = '\0';
}

static void out_str(redact_out *o, const char *s)
{
    out_put(o, s, strlen(s));
}

/* Whether a parameter named s[0..n) carries a secret. Matching on parts of
 * names errs on the side of masking ("sslkey", a path, is masked too). */
static int redact_secret_name(const char *s, size_t n)
{
    static const char *const parts[] = {"pass", "pwd", "secret", "token", "key", "auth", "sig", "credential",
                                        "session", NULL};

    for (int i = 0; parts[i]; i++) {
        size_t pl = strlen(parts[i]);

        for (size_t j = 0; j + pl <= n; j++)
            if (strncasecmp(s + j, parts[i], pl) == 0)
                return 1;
    }
    return 0;
}

/* Copies "k=v&k=v" (a query or fragment, s[0..n)) masking secret values. */
static void redact_params(redact_out *o, const char *s, size_t n)
{
    const char *end = s + n;

    while (s < end) {
        const char *amp = s, *eq;

        while (amp < end && *amp != '&' && *amp != ';')
            amp++;
        eq = memchr(s, '=', (size_t)(amp - s));
        if (eq && redact_secret_name(s, (size_t)(eq - s))) {
            out_put(o, s, (size_t)(eq - s) + 1);
            out_str(o, REDACT_MASK);
        } else {
            out_put(o, s, (size_t)(amp - s));
        }
        if (amp < end)
            out_put(o, amp, 1);
        s = amp + 1;
    }
}

/* A libpq keyword conninfo: key = value pairs, values bare or in single
 * quotes with backslash escapes. */
static void redact_conninfo(redact_out *o, const char *s)
{
    while (*s) {
        const char *k = s, *ke, *v;
        int secret;

        while (*s && *s != '=' && !isspace((unsigned char)*s))
            s++;
        ke = s;
        while (isspace((unsigned char)*s))
            s++;
        if (*s != '=') { /* not key=value: copy the word and go on */
            out_put(o, k, (size_t)(s - k));
            if (s == k && *s)
                out_put(o, s++, 1);
            continue;
        }
        s++;
        while (isspace((unsigned char)*s))
            s++;
        v = s;
        if (*s == '\'') {
            for (s++; *s && *s != '\''; s++)
                if (*s == '\\' && s[1])
                    s++;
            if (*s)
                s++;
        } else {
            while (*s && !isspace((unsigned char)*s))
                s++;
        }
        secret = redact_secret_name(k, (size_t)(ke - k));
        out_put(o, k, (size_t)(ke - k));
        out_str(o, "=");
        if (secret)
            out_str(o, REDACT_MASK);
        else
            out_put(o, v, (size_t)(s - v));
        while (isspace((unsigned char)*s))
            out_put(o, s++, 1);
    }
}

char *redact_url(char *dst, size_t len, const char *url)
{
    redact_out o = {dst, len, 0};
    const char *scheme_end, *start, *q, *at = NULL;

    if (!dst || len == 0)
        return dst;
    dst[0] = '\0';
    if (!url)
        return dst;
    scheme_end = strstr(url, "://");
    if (!scheme_end) {
        redact_conninfo(&o, url);
        return dst;
    }
    start = scheme_end + 3;
    q = start + strcspn(start, "?#");
    /* The last '@' before the query ends the userinfo: a password may hold
     * an '@' of its own when it is not %-encoded. */
    for (const char *s = start; s < q; s++)
        if (*s == '@')
            at = s;
    out_put(&o, url, (size_t)(start - url));
    if (at) {
        const char *colon = memchr(start, ':', (size_t)(at - start));
        size_t sl = (size_t)(scheme_end - url);
        int lone_is_password = (sl == 5 && strncasecmp(url, "redis", 5) == 0) ||
                               (sl == 6 && strncasecmp(url, "rediss", 6) == 0);

        if (colon) {
            out_put(&o, start, (size_t)(colon - start) + 1);
            out_str(&o, REDACT_MASK);
        } else if (lone_is_password) {
            out_str(&o, REDACT_MASK);
        } else {
            out_put(&o, start, (size_t)(at - start));
        }
        start = at;
    }
    out_put(&o, start, (size_t)(q - start));
    while (*q) {
        const char *next = q + 1 + strcspn(q + 1, *q == '?' ? "#" : "");

        out_put(&o, q, 1);
        redact_params(&o, q + 1, (size_t)(next - q - 1));
        q = next;
    }
    return dst;
}
