#include "target.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>

#include "hash.h"

#define TARGET_MAX_RULES 64

typedef struct {
    int family;               /* 0: host name, AF_INET, AF_INET6 */
    unsigned char addr[16];
    int prefix;
    char name[256];
} rule;

struct target_policy {
    int n;
    rule rules[TARGET_MAX_RULES];
};

static int parse_rule(const char *s, rule *r)
{
    char tmp[300];
    char *slash;
    long prefix = -1;

    memset(r, 0, sizeof(*r));
    if (snprintf(tmp, sizeof(tmp), "%s", s) >= (int)sizeof(tmp))
        return -1;
    slash = strchr(tmp, '/');
    if (slash) {
        char *end;

        *slash = '\0';
        prefix = strtol(slash + 1, &end, 10);
        if (*end || end == slash + 1)
            return -1;
    }
    if (tmp[0] == '[' && tmp[strlen(tmp) - 1] == ']') {
        memmove(tmp, tmp + 1, strlen(tmp));
        tmp[strlen(tmp) - 1] = '\0';
    }
    if (inet_pton(AF_INET, tmp, r->addr) == 1) {
        r->family = AF_INET;
        r->prefix = prefix < 0 ? 32 : (int)prefix;
        return r->prefix > 32 ? -1 : 0;
    }
    if (inet_pton(AF_INET6, tmp, r->addr) == 1) {
        r->family = AF_INET6;
        r->prefix = prefix < 0 ? 128 : (int)prefix;
        return r->prefix > 128 ? -1 : 0;
    }
    if (slash || !tmp[0] || strspn(tmp, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-") != strlen(tmp))
        return -1;
    snprintf(r->name, sizeof(r->name), "%.255s", tmp);
    return 0;
}

target_policy *target_policy_new(const char *allowed, char *err, size_t errlen)
{
    target_policy *p = calloc(1, sizeof(*p));
    const char *s = allowed ? allowed : "";

    if (!p) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    while (*s) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        char item[300];

        while (n && (*s == ' ' || *s == '\t')) {
            s++;
            n--;
        }
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
            n--;
        if (n) {
            if (n >= sizeof(item) || p->n >= TARGET_MAX_RULES) {
                snprintf(err, errlen, "too many or too long entries");
                goto fail;
            }
            memcpy(item, s, n);
            item[n] = '\0';
            if (parse_rule(item, &p->rules[p->n]) < 0) {
                snprintf(err, errlen, "bad entry '%.200s' (a host, an IP or a CIDR)", item);
                goto fail;
            }
            p->n++;
        }
        s = e ? e + 1 : s + strlen(s);
    }
    return p;
fail:
    free(p);
    return NULL;
}

void target_policy_free(target_policy *p)
{
    free(p);
}

static int prefix_match(const unsigned char *a, const unsigned char *net, int bits)
{
    int full = bits / 8, rest = bits % 8;

    if (memcmp(a, net, (size_t)full))
        return 0;
    if (rest) {
        unsigned char mask = (unsigned char)(0xff << (8 - rest));

        return (a[full] & mask) == (net[full] & mask);
    }
    return 1;
}

static int v4_restricted(const unsigned char *a)
{
    static const struct {
        unsigned char net[4];
        int bits;
    } ranges[] = {
        {{0, 0, 0, 0}, 8},       {{10, 0, 0, 0}, 8},     {{100, 64, 0, 0}, 10}, {{127, 0, 0, 0}, 8},
        {{169, 254, 0, 0}, 16},  {{172, 16, 0, 0}, 12},  {{192, 0, 0, 0}, 24},  {{192, 168, 0, 0}, 16},
        {{198, 18, 0, 0}, 15},   {{224, 0, 0, 0}, 4},    {{240, 0, 0, 0}, 4},
    };

    for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++)
        if (prefix_match(a, ranges[i].net, ranges[i].bits))
            return 1;
    return 0;
}

int target_addr_restricted(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return v4_restricted((const unsigned char *)&((const struct sockaddr_in *)sa)->sin_addr);
    if (sa->sa_family == AF_INET6) {
        const unsigned char *a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
        static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

        static const struct {
            unsigned char net[16];
            int bits;
        } ranges[] = {
            /* ::/96: ::, ::1 and the IPv4-compatible ::a.b.c.d (deprecated,
             * and some stacks still route them to the IPv4 address). */
            {{0}, 96},
            /* Addresses a gateway translates to an IPv4 address the check
             * never sees: NAT64 (64:ff9b::/96, and the local-use
             * 64:ff9b:1::/48), 6to4 (2002::/16), Teredo (2001::/32). */
            {{0x00, 0x64, 0xff, 0x9b}, 96},
            {{0x00, 0x64, 0xff, 0x9b, 0x00, 0x01}, 48},
            {{0x20, 0x02}, 16},
            {{0x20, 0x01, 0x00, 0x00}, 32},
            {{0x20, 0x01, 0x0d, 0xb8}, 32}, /* documentation */
            {{0xfc}, 7},                    /* unique local */
            {{0xfe, 0x80}, 10},             /* link-local */
            {{0xfe, 0xc0}, 10},             /* site-local (deprecated, still routed as private) */
            {{0xff}, 8},                    /* multicast */
        };

        if (!memcmp(a, mapped, 12))
            return v4_restricted(a + 12);
        for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++)
            if (prefix_match(a, ranges[i].net, ranges[i].bits))
                return 1;
        return 0;
    }
    return 1;
}

static int addr_allowed(const target_policy *p, const struct sockaddr *sa)
{
    const unsigned char *a;
    int fam = sa->sa_family;

    if (fam == AF_INET)
        a = (const unsigned char *)&((const struct sockaddr_in *)sa)->sin_addr;
    else if (fam == AF_INET6)
        a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
    else
        return 0;
    for (int i = 0; i < p->n; i++)
        if (p->rules[i].family == fam && prefix_match(a, p->rules[i].addr, p->rules[i].prefix))
            return 1;
    return 0;
}

static int name_allowed(const target_policy *p, const char *host)
{
    for (int i = 0; i < p->n; i++)
        if (!p->rules[i].family && !strcasecmp(p->rules[i].name, host))
            return 1;
    return 0;
}

/* out->path from the parsed URL: its path and query, as libcurl's request
 * line carries them (dot segments resolved, no fragment); "" when they are
 * longer than the buffer. */
static void request_path(CURLU *u, target_info *out)
{
    char *path = NULL, *query = NULL;
    size_t pl, ql;

    out->path[0] = '\0';
    if (curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK || !path)
        goto out;
    if (curl_url_get(u, CURLUPART_QUERY, &query, 0) != CURLUE_OK)
        query = NULL;
    pl = strlen(path);
    ql = query ? strlen(query) : 0;
    if (pl + (query ? 1 + ql : 0) >= sizeof(out->path))
        goto out;
    memcpy(out->path, path, pl);
    if (query) {
        out->path[pl] = '?';
        memcpy(out->path + pl + 1, query, ql);
        pl += 1 + ql;
    }
    out->path[pl] = '\0';
out:
    curl_free(path);
    curl_free(query);
}

static int split_url(const char *url, target_info *out, char *err, size_t errlen)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL;
    int rc = -1;

    if (!u) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK) {
        snprintf(err, errlen, "malformed URL");
        goto out;
    }
    if (strcasecmp(scheme, "http") && strcasecmp(scheme, "https")) {
        snprintf(err, errlen, "scheme %.16s is not allowed (http or https)", scheme);
        goto out;
    }
    {
        size_t n = strlen(host);
        const char *h = host;

        if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
            h = host + 1;
            n -= 2;
        }
        if (n == 0 || n >= sizeof(out->host)) {
            snprintf(err, errlen, "bad host");
            goto out;
        }
        /* ASCII names only: with an IDN host libcurl resolves the punycode
         * form itself, so the address pinned here would not be used (write
         * the xn-- form instead). Nothing else than letters, digits, dots,
         * hyphens and underscores, or an IPv6 literal, passes either. */
        for (size_t i = 0; i < n; i++) {
            unsigned char ch = (unsigned char)h[i];

            if (ch >= 0x80) {
                snprintf(err, errlen, "host names must be ASCII (use the xn-- form of an international name)");
                goto out;
            }
            if (!isalnum(ch) && !strchr(h == host ? ".-_" : ":.", ch)) {
                snprintf(err, errlen, "bad character in host");
                goto out;
            }
        }
        memcpy(out->host, h, n);
        out->host[n] = '\0';
    }
    out->port = (int)strtol(port, NULL, 10);
    request_path(u, out);
    rc = 0;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return rc;
}

int target_check(const target_policy *p, const char *url, target_info *out, char *err, size_t errlen)
{
    struct addrinfo hints, *res = NULL, *ai;
    char portstr[16], first[INET6_ADDRSTRLEN] = "";
    int literal, rc, by_name;
    unsigned char tmp[16];

    memset(out, 0, sizeof(*out));
    if (!url || !*url) {
        snprintf(err, errlen, "no URL");
        return -1;
    }
    if (split_url(url, out, err, errlen) < 0)
        return -1;
    literal = inet_pton(AF_INET, out->host, tmp) == 1 || inet_pton(AF_INET6, out->host, tmp) == 1;
    by_name = !literal && name_allowed(p, out->host);
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = literal ? AI_NUMERICHOST : 0;
    snprintf(portstr, sizeof(portstr), "%d", out->port);
    rc = getaddrinfo(out->host, portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve %.200s: %s", out->host, gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        char a[INET6_ADDRSTRLEN] = "?";
        const void *src = ai->ai_family == AF_INET ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                                                   : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;

        inet_ntop(ai->ai_family, src, a, sizeof(a));
        if (!by_name && target_addr_restricted(ai->ai_addr) && !addr_allowed(p, ai->ai_addr)) {
            snprintf(err, errlen, "target %.200s resolves to %s, a loopback/private/link-local address not in ALLOWED_TARGETS",
                     out->host, a);
            freeaddrinfo(res);
            return -1;
        }
        if (!first[0]) {
            snprintf(first, sizeof(first), "%s", a);
            if (ai->ai_addrlen <= sizeof(out->addr)) {
                memcpy(&out->addr, ai->ai_addr, ai->ai_addrlen);
                out->addrlen = (socklen_t)ai->ai_addrlen;
            }
        }
    }
    freeaddrinfo(res);
    if (!first[0]) {
        snprintf(err, errlen, "no address for %.200s", out->host);
        return -1;
    }
    if (!literal)
        snprintf(out->resolve, sizeof(out->resolve), strchr(first, ':') ? "%s:%d:[%s]" : "%s:%d:%s", out->host,
                 out->port, first);
    return 0;
}

#define TCACHE_SLOTS 64

typedef struct {
    char *url;             /* owned; NULL when the slot is free */
    long long expires;
    target_info info;
} tslot;

struct target_cache {
    long ttl_ms;
    tslot slots[TCACHE_SLOTS];
};

target_cache *target_cache_new(long ttl_ms)
{
    target_cache *c = calloc(1, sizeof(*c));

    if (c)
        c->ttl_ms = ttl_ms;
    return c;
}

void target_cache_free(target_cache *c)
{
    if (!c)
        return;
    for (int i = 0; i < TCACHE_SLOTS; i++)
        free(c->slots[i].url);
    free(c);
}

int target_check_cached(const target_policy *p, target_cache *c, const char *url, long long now_ms,
                        target_info *out, char *err, size_t errlen)
{
    tslot *s;

    if (!c || !url)
        return target_check(p, url, out, err, errlen);
    /* Direct-mapped: a colliding URL simply replaces the entry. */
    s = &c->slots[hash_fnv1a_str(url) % TCACHE_SLOTS];
    if (s->url && now_ms < s->expires && !strcmp(s->url, url)) {
        *out = s->info;
        return 0;
    }
    if (target_check(p, url, out, err, errlen) < 0)
        return -1;
    free(s->url);
    s->url = strdup(url);
    s->info = *out;
    s->expires = now_ms + c->ttl_ms;
    return 0;
}
