/* health: background dependency checks, so health routes answer from
 * memory and never make a round trip per request.
 *
 * One thread runs every registered check each `interval_ms`. A check that
 * fails is retried on the next round; each change of state is logged once
 * (not each round), so a dependency that is down for an hour logs one
 * line, plus one when it comes back. */
#ifndef AE_HEALTH_H
#define AE_HEALTH_H

/* Returns 0 when the dependency answered. Runs on the health thread only,
 * so it may keep its own connection in `ud`. */
typedef int (*health_check_fn)(void *ud);

typedef struct health health;

/* NULL on OOM. Free with health_free (stops the thread first). */
health *health_new(long interval_ms);
void health_free(health *h);

/* Registers a check before health_start; up to 8. `name` must outlive h.
 * Returns the check's index, or -1. */
int health_add(health *h, const char *name, health_check_fn fn, void *ud);

/* Runs every check once synchronously (so the first answer is known),
 * then starts the thread. Returns 0 or -1. */
int health_start(health *h);

/* Nonzero when every check passed on its last run. Lock-free. */
int health_ok(const health *h);

/* Nonzero when check `idx` passed on its last run. */
int health_check_ok(const health *h, int idx);

/* The number of checks and the name of check `idx` (NULL when out of
 * range), for health routes that list their dependencies. */
int health_count(const health *h);
const char *health_check_name(const health *h, int idx);

/* Runs the checks now, without waiting for the next round (tests, and
 * after a known reconnect). */
void health_poke(health *h);

#endif
