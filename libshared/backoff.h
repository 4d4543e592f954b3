/* backoff: exponential back-off with "equal jitter", shared by every
 * reconnect loop (PostgreSQL, Redis, AMQP) and by job retries.
 *
 * The n-th delay (attempt counted from 0) is drawn uniformly from
 * [cap/2, cap] where cap = min(max_ms, base_ms * 2^attempt). Equal jitter
 * (rather than full jitter) is used so that a delay never collapses to ~0:
 * callers use the delay as a fast-fail window and log once per step, and a
 * zero window would turn "once per step" into "once per call".
 *
 * A backoff value is plain data with no locking; share it between threads
 * only under the caller's own lock. */
#ifndef AE_BACKOFF_H
#define AE_BACKOFF_H

typedef struct {
    long base_ms, max_ms;
    int attempt;
    unsigned int seed; /* private PRNG state for the jitter; set by backoff_init */
} backoff;

/* Initialises `b` with attempt 0. base_ms < 1 is treated as 1 and
 * max_ms < base_ms as base_ms. */
void backoff_init(backoff *b, long base_ms, long max_ms);

/* Returns the delay for the current attempt (equal jitter, see above) and
 * increments the attempt counter (saturating, so it never overflows). */
long backoff_next_ms(backoff *b);

/* Back to attempt 0, after a success. */
void backoff_reset(backoff *b);

/* Stateless variant: the delay for `attempt` (0-based) with equal jitter,
 * always within [cap/2, cap]. `seed` is rand_r state owned by the caller;
 * NULL gives the upper bound `cap` without jitter (deterministic). */
long backoff_delay_ms(long base_ms, long max_ms, int attempt, unsigned int *seed);

/* The un-jittered cap for `attempt`: min(max_ms, base_ms * 2^attempt). */
long backoff_cap_ms(long base_ms, long max_ms, int attempt);

#endif
