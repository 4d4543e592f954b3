#include "svc.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

static atomic_int svc_stop_flag;
static pthread_mutex_t svc_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t svc_cond = PTHREAD_COND_INITIALIZER;

static void svc_stop_set(void)
{
    pthread_mutex_lock(&svc_lock);
    atomic_store(&svc_stop_flag, 1);
    pthread_cond_broadcast(&svc_cond);
    pthread_mutex_unlock(&svc_lock);
}

int svc_init(void)
{
    sigset_t set;
    struct sigaction sa = {0};

    sa.sa_handler = SIG_IGN;
    if (sigaction(SIGPIPE, &sa, NULL) < 0)
        return -1;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    return pthread_sigmask(SIG_BLOCK, &set, NULL) == 0 ? 0 : -1;
}

int svc_wait(long timeout_ms)
{
    sigset_t set;
    struct timespec ts;
    long slice = timeout_ms;
    int sig;

    if (svc_stopping())
        return SIGTERM;
    /* Short slices let svc_request_stop() from another thread be seen
     * promptly without a signal. */
    if (slice > 100)
        slice = 100;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    for (long waited = 0; waited < timeout_ms || timeout_ms == 0; waited += slice) {
        ts.tv_sec = slice / 1000;
        ts.tv_nsec = (slice % 1000) * 1000000L;
        sig = sigtimedwait(&set, NULL, &ts);
        if (sig == SIGTERM || sig == SIGINT) {
            svc_stop_set();
            return sig;
        }
        if (sig == SIGHUP)
            return sig;
        if (svc_stopping())
            return SIGTERM;
        if (timeout_ms == 0)
            break;
    }
    return 0;
}

int svc_stopping(void)
{
    return atomic_load(&svc_stop_flag);
}

void svc_request_stop(void)
{
    svc_stop_set();
}

long long svc_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int svc_sleep_ms(long ms)
{
    struct timespec deadline;
    int rc = 0;

    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += ms / 1000;
    deadline.tv_nsec += (ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&svc_lock);
    while (!atomic_load(&svc_stop_flag) && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&svc_cond, &svc_lock, &deadline);
    pthread_mutex_unlock(&svc_lock);
    return svc_stopping();
}
