/* target: which hosts a webhook or MCP action may reach.
 *
 * User-supplied URLs must not reach the platform's own network (SSRF):
 * loopback, private, carrier-grade NAT, link-local (cloud metadata),
 * multicast and reserved ranges, v4 and v6 (v4-mapped v6 is checked as v4;
 * IPv4-compatible ::/96, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4
 * 2002::/16, Teredo 2001::/32 and site-local fec0::/10, which a gateway may
 * route to an address the check never sees, are refused whole), and host
 * names that are not ASCII (libcurl would resolve their punycode form
 * itself, bypassing the pin), are refused unless ALLOWED_TARGETS lists the
 * host name, the address or a
 * CIDR containing it. Every resolved address must pass, and the address
 * that passed is pinned for the transfer (CURLOPT_RESOLVE), so a DNS answer
 * that changes between the check and the connect (rebinding) cannot send
 * the request elsewhere. Only http and https are accepted. */
#ifndef AW_TARGET_H
#define AW_TARGET_H

#include <stddef.h>
#include <sys/socket.h>

typedef struct target_policy target_policy;

typedef struct {
    char host[256];     /* as in the URL, without brackets */
    int port;
    char resolve[400];  /* "host:port:addr" for CURLOPT_RESOLVE; "" for IP literals */
    /* The request target as libcurl sends it ("/path?query", from the
     * same curl_url() parse); "" when it does not fit here, and then h1
     * leaves the request to libcurl. */
    char path[256];
    struct sockaddr_storage addr; /* the pinned address (with the port), for h1's connect */
    socklen_t addrlen;
} target_info;

/* Parses ALLOWED_TARGETS: a comma list of host names, IPv4/IPv6 addresses
 * and CIDRs. NULL or "" allows nothing extra. Returns NULL with the bad
 * entry named in `err` when an entry is malformed, or on OOM. Free with
 * target_policy_free. */
target_policy *target_policy_new(const char *allowed, char *err, size_t errlen);
void target_policy_free(target_policy *p);

/* Checks `url`: scheme, host and every address it resolves to (getaddrinfo,
 * blocking). Returns 0 and fills `out` when it may be reached, -1 with the
 * reason in `err` otherwise. */
int target_check(const target_policy *p, const char *url, target_info *out, char *err, size_t errlen);

/* A small per-thread memory of URLs that passed target_check, so that a
 * stream of jobs for the same webhook does not parse and resolve the same
 * URL each time. An entry holds the exact URL and the pinned address and
 * is trusted for `ttl_ms` only, after which the URL is checked (and
 * resolved) again; refusals and resolution failures are never remembered.
 * Not thread-safe: one per worker thread. */
typedef struct target_cache target_cache;

/* NULL on OOM. Free with target_cache_free. */
target_cache *target_cache_new(long ttl_ms);
void target_cache_free(target_cache *c);

/* target_check through the cache `c` (NULL: no cache). `now_ms` is the
 * caller's clock. */
int target_check_cached(const target_policy *p, target_cache *c, const char *url, long long now_ms,
                        target_info *out, char *err, size_t errlen);

/* Nonzero when the address lies in a range refused by default. */
int target_addr_restricted(const struct sockaddr *sa);

#endif
