/* loginguard: password guessing kept in check (issue 10.8).
 *
 * Per account, failed logins are counted: after `free_failures` of them
 * each further failure locks the account out for twice as long as the
 * previous one (1 s, 2 s, 4 s... up to `backoff_max_ms`); a success clears
 * the count, and so does a quiet period as long as the longest back-off
 * after the lock ended. An account is a user id when the name or email is
 * known and the lower-cased name or email otherwise, so unknown names are
 * limited the same way (a lock tells nothing about which accounts exist),
 * and logging in by username or by email shares one count. At most 65,536
 * accounts are tracked (ktab: the least recently touched goes first).
 *
 * Independently, at most `max_hashes` password hashes (yescrypt, the
 * expensive part of a login or registration) run at once in the process;
 * beyond that a login is refused at once rather than queued behind them.
 *
 * Thread-safe. Counts are per gateway process. */
#ifndef AE_LOGINGUARD_H
#define AE_LOGINGUARD_H

typedef struct loginguard loginguard;

/* NULL on OOM or bad arguments (free_failures >= 1, backoff_max_ms >= 1000,
 * max_hashes >= 1). Free with loginguard_free. */
loginguard *loginguard_new(int free_failures, long backoff_max_ms, int max_hashes);
void loginguard_free(loginguard *g);

/* Seconds (>= 1) until `account` may try again, or 0 when it may now. */
int loginguard_wait(loginguard *g, const char *account, long long now_ms);

/* Records the outcome of a login of `account` (ok nonzero: it succeeded). */
void loginguard_record(loginguard *g, const char *account, int ok, long long now_ms);

/* Takes one of the hash slots: 0, or -1 when all are in use (then answer
 * 429). Every successful take is followed by one loginguard_hash_give. */
int loginguard_hash_take(loginguard *g);
void loginguard_hash_give(loginguard *g);

#endif
