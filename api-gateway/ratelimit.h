/* ratelimit: a token bucket per client address, in bounded memory.
 *
 * Each address gets a bucket of `per_min` tokens that refills at per_min/60
 * tokens a second; a request takes one. Buckets live in a fixed number of
 * shards, each a small hash table under its own mutex (thread-safe; the
 * gateway's worker threads share one limiter). A shard holds at most
 * RATELIMIT_SHARD_CAP buckets: when full, buckets idle long enough to be
 * full again are dropped first (forgetting them changes nothing), then the
 * least recently seen one. Memory is therefore bounded by
 * RATELIMIT_SHARDS * RATELIMIT_SHARD_CAP buckets whatever the traffic. */
#ifndef AE_RATELIMIT_H
#define AE_RATELIMIT_H

#include "gateway.h"

#define RATELIMIT_SHARDS 64
#define RATELIMIT_SHARD_CAP 1024

/* A limiter allowing `per_min` (>= 1) requests a minute per key. NULL on
 * OOM or a bad argument. Free with ratelimit_free. */
ratelimit *ratelimit_new(long per_min);
void ratelimit_free(ratelimit *rl);

/* Takes a token for `key` at monotonic time `now_ms`. Returns 0 when
 * allowed, else the number of seconds (>= 1) until a token is available. */
int ratelimit_take(ratelimit *rl, const char *key, long long now_ms);

/* Number of buckets held (for tests and metrics). */
long ratelimit_size(ratelimit *rl);

/* The httpd hook: answers 429 (rate_limited, Retry-After) when the client
 * address is out of tokens. Health routes, /metrics are exempt so probes
 * are never throttled. `ud` is the gateway. */
int ratelimit_hook(httpd_req *req, void *ud);
/* The hook's verdict without a request (the proxy's front): 0, or the
 * seconds to wait (a token was taken when 0). */
int ratelimit_wait(gateway *gw, const char *path, const char *remote);

#endif
