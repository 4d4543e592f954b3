#include "backoff.h"

#include <stdlib.h>
#include <time.h>

/* Past this many doublings any sane base has long reached any sane cap;
 * stopping here keeps the shift and the counter from overflowing. */
#define BACKOFF_ATTEMPT_MAX 30

long backoff_cap_ms(long base_ms, long max_ms, int attempt)
{
    long cap;

    if (base_ms < 1)
        base_ms = 1;
    if (max_ms < base_ms)
        max_ms = base_ms;
    if (attempt < 0)
        attempt = 0;
    cap = base_ms;
    for (int i = 0; i < attempt && cap < max_ms; i++) {
        if (cap > max_ms / 2) {
            cap = max_ms;
            break;
        }
        cap *= 2;
    }
    return cap < max_ms ? cap : max_ms;
}

long backoff_delay_ms(long base_ms, long max_ms, int attempt, unsigned int *seed)
{
    long cap = backoff_cap_ms(base_ms, max_ms, attempt);
    long half = cap / 2;

    if (!seed)
        return cap;
    /* Equal jitter: half the cap is certain, the other half is random, so
     * concurrent clients spread out but none retries immediately. */
    return half + (long)((double)rand_r(seed) / ((double)RAND_MAX + 1.0) * (double)(cap - half + 1));
}

void backoff_init(backoff *b, long base_ms, long max_ms)
{
    struct timespec ts;

    if (base_ms < 1)
        base_ms = 1;
    if (max_ms < base_ms)
        max_ms = base_ms;
    b->base_ms = base_ms;
    b->max_ms = max_ms;
    b->attempt = 0;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* Distinct seeds per object and per process, so that services started
     * together do not retry in lock step. */
    b->seed = (unsigned int)ts.tv_nsec ^ (unsigned int)(ts.tv_sec * 2654435761u) ^
              (unsigned int)(unsigned long)b;
}

long backoff_next_ms(backoff *b)
{
    long d = backoff_delay_ms(b->base_ms, b->max_ms, b->attempt, &b->seed);

    if (b->attempt < BACKOFF_ATTEMPT_MAX)
        b->attempt++;
    return d;
}

void backoff_reset(backoff *b)
{
    b->attempt = 0;
}
