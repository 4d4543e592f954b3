/* curlep: a libcurl multi handle driven by an epoll set (the proxy's
 * loops, the action-workers' workers).
 *
 * libcurl tells which sockets to watch (CURLMOPT_SOCKETFUNCTION) and when
 * to call back (CURLMOPT_TIMERFUNCTION); the loop hands it only the sockets
 * epoll reports ready, instead of curl_multi_perform, which visits (and
 * polls) every transfer each turn. A curlep belongs to the thread that runs
 * the loop; the epoll set may hold other descriptors (the caller tells its
 * own events apart by their data). */
#ifndef AE_CURLEP_H
#define AE_CURLEP_H

#include <stdint.h>

#include <curl/curl.h>

typedef struct {
    CURLM *multi;
    int epfd;
    long long due;            /* libcurl's next timeout in the clock's ms, -1 for none */
    long long (*clock)(void); /* milliseconds */
} curlep;

/* Installs the socket and timer callbacks of `multi` on `c`, which must
 * stay at its address while the multi handle lives. */
void curlep_init(curlep *c, CURLM *multi, int epfd, long long (*clock_ms)(void));

/* Hands libcurl an epoll event of one of its sockets (data.fd). */
void curlep_event(curlep *c, int fd, uint32_t events);

/* Runs libcurl's timeout when it is due at `now`. */
void curlep_expire(curlep *c, long long now);

/* Milliseconds until libcurl's timeout from `now`, at most `max` (0 when
 * due, `max` when none). */
int curlep_wait_ms(const curlep *c, long long now, int max);

#endif
