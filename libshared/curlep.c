#include "curlep.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>

static int curlep_socket(CURL *e, curl_socket_t s, int what, void *ud, void *sockp)
{
    curlep *c = ud;
    struct epoll_event ev;

    (void)e;
    memset(&ev, 0, sizeof(ev));
    ev.data.fd = s;
    if (what == CURL_POLL_REMOVE) {
        if (sockp)
            epoll_ctl(c->epfd, EPOLL_CTL_DEL, s, NULL);
        curl_multi_assign(c->multi, s, NULL);
        return 0;
    }
    ev.events = (what & CURL_POLL_IN ? EPOLLIN : 0u) | (what & CURL_POLL_OUT ? EPOLLOUT : 0u);
    /* A socket libcurl closed and reopened under the same number is new
     * to epoll even though it was assigned. */
    if (epoll_ctl(c->epfd, sockp ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s, &ev) < 0 && errno == ENOENT)
        epoll_ctl(c->epfd, EPOLL_CTL_ADD, s, &ev);
    if (!sockp)
        curl_multi_assign(c->multi, s, c);
    return 0;
}

static int curlep_timer(CURLM *m, long timeout_ms, void *ud)
{
    curlep *c = ud;

    (void)m;
    c->due = timeout_ms < 0 ? -1 : c->clock() + timeout_ms;
    return 0;
}

void curlep_init(curlep *c, CURLM *multi, int epfd, long long (*clock_ms)(void))
{
    c->multi = multi;
    c->epfd = epfd;
    c->due = -1;
    c->clock = clock_ms;
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, curlep_socket);
    curl_multi_setopt(multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, curlep_timer);
    curl_multi_setopt(multi, CURLMOPT_TIMERDATA, c);
}

void curlep_event(curlep *c, int fd, uint32_t events)
{
    int f = 0, running;

    /* A hang-up is read as such: libcurl sees the end of the stream. */
    if (events & (EPOLLIN | EPOLLHUP))
        f |= CURL_CSELECT_IN;
    if (events & EPOLLOUT)
        f |= CURL_CSELECT_OUT;
    if (events & EPOLLERR)
        f |= CURL_CSELECT_ERR;
    curl_multi_socket_action(c->multi, fd, f, &running);
}

void curlep_expire(curlep *c, long long now)
{
    int running;

    if (c->due >= 0 && now >= c->due) {
        c->due = -1;
        curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    }
}

int curlep_wait_ms(const curlep *c, long long now, int max)
{
    if (c->due < 0)
        return max;
    if (c->due <= now)
        return 0;
    return c->due - now < max ? (int)(c->due - now) : max;
}
