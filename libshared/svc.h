/* svc: process lifecycle shared by every program: stop signals and the
 * wait loop of the main thread.
 *
 * svc_init() blocks SIGTERM, SIGINT and SIGHUP in the calling thread before
 * any other thread exists, so every thread inherits the mask and the signals
 * are taken only by svc_wait() in the main thread. SIGPIPE is ignored: a
 * peer that goes away must never kill the service. */
#ifndef AE_SVC_H
#define AE_SVC_H

/* Call first in main(). Returns 0 or -1. */
int svc_init(void);

/* Waits up to timeout_ms for a stop signal. Returns the signal number
 * (after which svc_stopping() is true), or 0 on timeout. SIGHUP is
 * returned too but does not count as a stop. */
int svc_wait(long timeout_ms);

/* Nonzero once a stop was requested, by a signal or svc_request_stop(). */
int svc_stopping(void);

/* Requests a stop from any thread; the next svc_wait returns at once. */
void svc_request_stop(void);

/* Monotonic clock in milliseconds. */
long long svc_now_ms(void);

/* Sleeps up to ms, returning early (nonzero) when a stop is requested. */
int svc_sleep_ms(long ms);

#endif
