/* breaker: a circuit breaker per target host (action-workers) or upstream
 * (the gateway's proxy), shared by the threads of one process (internally
 * locked).
 *
 * A host whose deliveries fail `threshold` times in a row (network errors,
 * timeouts, 5xx: the failures that say the host is unwell, not a 4xx about
 * one request) is opened for `cooldown_ms`. Jobs for an open host are put
 * back on the delayed queue until the cool-down ends instead of being
 * attempted and failed. After it, one probe is let through (half-open): its
 * success closes the breaker, its failure opens it for another cool-down.
 * At most `BREAKER_MAX_HOSTS` hosts are tracked; beyond that new hosts are
 * simply let through. */
#ifndef AE_BREAKER_H
#define AE_BREAKER_H

typedef struct breaker breaker;

#define BREAKER_MAX_HOSTS 4096

/* NULL on OOM. threshold <= 0 disables the breaker. Free with breaker_free. */
breaker *breaker_new(int threshold, long cooldown_ms);
void breaker_free(breaker *b);

/* Asks to send to `host` at `now_ms`. Returns 0 when allowed (a half-open
 * probe included), else the milliseconds to wait before asking again. */
long breaker_allow(breaker *b, const char *host, long long now_ms);

/* Reports how a delivery to `host` went: ok nonzero for success, zero for
 * a failure that counts against the host. */
void breaker_report(breaker *b, const char *host, int ok, long long now_ms);

/* Number of hosts currently open (for metrics). */
int breaker_open_count(breaker *b, long long now_ms);

/* A half-open probe that ended without a verdict (its client went away):
 * the next request may probe again. */
void breaker_cancel(breaker *b, const char *host);

enum { BREAKER_CLOSED = 0, BREAKER_OPEN = 1, BREAKER_HALF_OPEN = 2 };

/* The state of `host` at `now_ms`: open during the cool-down, half-open once
 * it is over (until a probe succeeds), else closed. */
int breaker_state(breaker *b, const char *host, long long now_ms);

/* "closed", "open" or "half_open". */
const char *breaker_state_name(int state);

#endif
