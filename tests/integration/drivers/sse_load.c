/* sse_load: the SSE benchmark's load client (scripts/bench.d/35-sse.sh).
 *
 *   sse_load HOST PORT CLIENT_ID CLIENTS SOURCES EVENTS PUBLISH_PATH TOKEN
 *
 * Opens CLIENTS streams of GET /api/v1/events/CLIENT_ID from SOURCES local
 * addresses (127.0.0.2, 127.0.0.3...: one address has only ~28,000
 * ephemeral ports, and per-address connection limits apply), waits until
 * every one has its first frame, prints "ready N" and waits for a line on
 * stdin (the script measures the server's memory meanwhile). Then it
 * publishes EVENTS events, 300 ms apart, each with one POST PUBLISH_PATH
 * (Bearer TOKEN; an empty path publishes nothing and expects the server to
 * send on its own) and measures for every stream the time from the POST
 * being written to the event arriving. Prints "latency_ms p50 P p99 P max
 * P all_p99 P lost N read_p99 P read_all_p99 P client_cpu_ms C": percentiles
 * over every delivery, all_p99 over the events of the time until the last
 * stream had it, lost = deliveries that never came within 5 s of the last
 * event. "Arriving" is the kernel's receive timestamp of the segment
 * (SO_TIMESTAMPNS), so the figures measure the server's delivery, not how
 * long this one thread takes to get round to reading 10,000 sockets; the
 * read_ figures are the same measured when this client read the event, and
 * client_cpu_ms is this process's CPU time over the events.
 *
 * One epoll loop, nonblocking sockets; a stream's state is a few bytes. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 64
#define MARK "event: bench.tick"

typedef struct {
    int fd;
    int established;
    int seen;          /* bench events received */
    char tail[32];     /* the end of the last read, for a marker split across reads */
    unsigned char tlen;
} stream;

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* The clock of the kernel's receive timestamps. */
static double rt_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static double cpu_ms(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000.0 +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000.0;
}

/* Reads into buf; *t is the kernel's receive time of the data when it
 * gave one, else the time of the read. */
static ssize_t read_stamped(int fd, char *buf, size_t len, double *t)
{
    char ctl[CMSG_SPACE(sizeof(struct timespec))];
    struct iovec iov = {buf, len};
    struct msghdr mh;
    ssize_t got;

    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl;
    mh.msg_controllen = sizeof(ctl);
    got = recvmsg(fd, &mh, 0);
    *t = rt_ms();
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); got > 0 && c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;

            memcpy(&ts, CMSG_DATA(c), sizeof(ts));
            *t = (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
        }
    return got;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

static double pct(double *v, size_t n, double p)
{
    size_t i;

    if (n == 0)
        return -1;
    i = (size_t)(p * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static int open_stream(const struct sockaddr_in *dst, int src_idx)
{
    struct sockaddr_in src;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;

    if (fd < 0)
        return -1;
    memset(&src, 0, sizeof(src));
    src.sin_family = AF_INET;
    src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)src_idx);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&src, sizeof(src)) < 0 ||
        (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) < 0 && errno != EINPROGRESS)) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Counts markers in tail+data; keeps the new tail. */
static int count_marks(stream *s, const char *data, size_t n, int *established)
{
    char buf[4096 + 32];
    size_t len = 0;
    int count = 0;
    const char *p;

    memcpy(buf, s->tail, s->tlen);
    len = s->tlen;
    if (n > sizeof(buf) - len)
        n = sizeof(buf) - len;
    memcpy(buf + len, data, n);
    len += n;
    buf[len < sizeof(buf) ? len : sizeof(buf) - 1] = '\0';
    for (p = buf; (p = memmem(p, (size_t)(buf + len - p), MARK, sizeof(MARK) - 1)); p += sizeof(MARK) - 1)
        count++;
    if (memmem(buf, len, "connection.established", 22))
        *established = 1;
    s->tlen = (unsigned char)(len < sizeof(s->tail) ? len : sizeof(s->tail));
    memcpy(s->tail, buf + len - s->tlen, s->tlen);
    /* A marker wholly inside the kept tail was counted already. */
    if (s->tlen >= sizeof(MARK) - 1 && memmem(s->tail, s->tlen, MARK, sizeof(MARK) - 1))
        s->tlen = 0;
    return count;
}

int main(int argc, char **argv)
{
    struct sockaddr_in dst;
    int n, sources, events, ep, pub = -1, ready = 0;
    stream *st;
    char req[512], line[64];
    size_t reqlen;
    double *lat, *lat_read, *t_pub, *t_all, *t_all_read, *per_event = NULL, cpu0 = 0;
    size_t nlat = 0;
    const char *path, *token;

    {
        /* The load shares the cores with the server: as a SCHED_BATCH task a
         * wake-up does not preempt the server in the middle of a fan-out
         * (real clients are on other machines). Same for every server. */
        struct sched_param sp = {0};

        if (!getenv("SSE_LOAD_NO_BATCH"))
            sched_setscheduler(0, SCHED_BATCH, &sp);
    }
    if (argc != 9) {
        fprintf(stderr, "usage: sse_load HOST PORT CLIENT_ID CLIENTS SOURCES EVENTS PUBLISH_PATH TOKEN\n");
        return 2;
    }
    memset(&dst, 0, sizeof(dst));
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)strtol(argv[2], NULL, 10));
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    n = (int)strtol(argv[4], NULL, 10);
    sources = (int)strtol(argv[5], NULL, 10);
    events = (int)strtol(argv[6], NULL, 10);
    path = argv[7];
    token = argv[8];
    if (n <= 0 || sources <= 0 || events <= 0)
        return 2;
    reqlen = (size_t)snprintf(req, sizeof(req),
                              "GET /api/v1/events/%s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n",
                              argv[3], argv[1]);
    st = calloc((size_t)n, sizeof(*st));
    lat = calloc((size_t)n * (size_t)events, sizeof(*lat));
    t_pub = calloc((size_t)events, sizeof(*t_pub));
    t_all = calloc((size_t)events, sizeof(*t_all));
    lat_read = calloc((size_t)n * (size_t)events, sizeof(*lat_read));
    t_all_read = calloc((size_t)events, sizeof(*t_all_read));
    ep = epoll_create1(0);
    if (!st || !lat || !t_pub || !t_all || !lat_read || !t_all_read || ep < 0)
        return 1;
    /* Connect in batches so that the listen backlog never overflows. */
    for (int i = 0; i < n;) {
        int batch = i + 500 < n ? i + 500 : n;

        for (; i < batch; i++) {
            struct epoll_event ev;

            st[i].fd = open_stream(&dst, i % sources);
            if (st[i].fd < 0) {
                fprintf(stderr, "sse_load: connect %d: %s\n", i, strerror(errno));
                return 1;
            }
            ev.events = EPOLLOUT | EPOLLIN;
            ev.data.u32 = (uint32_t)i;
            epoll_ctl(ep, EPOLL_CTL_ADD, st[i].fd, &ev);
        }
        for (double until = now_ms() + 20000; ready < i && now_ms() < until;) {
            struct epoll_event evs[MAX_EVENTS];
            int k = epoll_wait(ep, evs, MAX_EVENTS, 100);

            for (int j = 0; j < k; j++) {
                stream *s = &st[evs[j].data.u32];
                char buf[4096];
                ssize_t got;

                if (evs[j].events & EPOLLOUT) {
                    struct epoll_event ev;

                    if (write(s->fd, req, reqlen) != (ssize_t)reqlen) {
                        fprintf(stderr, "sse_load: request write failed\n");
                        return 1;
                    }
                    ev.events = EPOLLIN;
                    ev.data.u32 = evs[j].data.u32;
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                    continue;
                }
                got = read(s->fd, buf, sizeof(buf));
                if (got <= 0) {
                    fprintf(stderr, "sse_load: stream %u closed while connecting (%s; it had: %.*s)\n",
                            evs[j].data.u32, got < 0 ? strerror(errno) : "end of stream", (int)s->tlen, s->tail);
                    return 1;
                }
                if (!s->established) {
                    count_marks(s, buf, (size_t)got, &s->established);
                    if (s->established)
                        ready++;
                }
            }
        }
        if (ready < i) {
            fprintf(stderr, "sse_load: only %d of %d streams established\n", ready, i);
            return 1;
        }
    }
    printf("ready %d\n", ready);
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    for (int e = 0; e <= events; e++) {
        double until = now_ms() + (e < events ? 300 : 5000);

        if (e < events) {
            char body[160], msg[1024];
            int blen = snprintf(body, sizeof(body), "{\"event_type\":\"bench.tick\",\"data\":{\"seq\":%d}}", e);
            int mlen;

            if (pub >= 0)
                close(pub);
            pub = socket(AF_INET, SOCK_STREAM, 0);
            if (path[0] && (pub < 0 || connect(pub, (struct sockaddr *)&dst, sizeof(dst)) < 0)) {
                fprintf(stderr, "sse_load: cannot connect to publish\n");
                return 1;
            }
            mlen = snprintf(msg, sizeof(msg),
                            "POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: "
                            "application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
                            path, argv[1], token, blen, body);
            if (e == 0)
                cpu0 = cpu_ms();
            t_pub[e] = rt_ms();
            if (path[0] && write(pub, msg, (size_t)mlen) != mlen) {
                fprintf(stderr, "sse_load: publish write failed\n");
                return 1;
            }
        }
        while (now_ms() < until) {
            struct epoll_event evs[MAX_EVENTS];
            int k = epoll_wait(ep, evs, MAX_EVENTS, 20);

            for (int j = 0; j < k; j++) {
                stream *s = &st[evs[j].data.u32];
                char buf[4096];
                double t, tr;
                ssize_t got = read_stamped(s->fd, buf, sizeof(buf), &t);
                int est = 0, marks;

                tr = rt_ms();

                if (got <= 0) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                    continue;
                }
                marks = count_marks(s, buf, (size_t)got, &est);
                while (marks-- > 0 && s->seen < events) {
                    double d = t - t_pub[s->seen], dr = tr - t_pub[s->seen];

                    lat_read[nlat] = dr;
                    lat[nlat++] = d;
                    if (d > t_all[s->seen])
                        t_all[s->seen] = d;
                    if (dr > t_all_read[s->seen])
                        t_all_read[s->seen] = dr;
                    s->seen++;
                }
            }
        }
    }
    cpu0 = cpu_ms() - cpu0;
    /* After the result line, which is what a reader of stdout waits for. */
    if (getenv("SSE_LOAD_PER_EVENT")) {
        per_event = malloc(sizeof(double) * (size_t)events);
        if (per_event)
            memcpy(per_event, t_all, sizeof(double) * (size_t)events);
    }
    qsort(lat, nlat, sizeof(*lat), cmp_double);
    qsort(lat_read, nlat, sizeof(*lat_read), cmp_double);
    qsort(t_all_read, (size_t)events, sizeof(*t_all_read), cmp_double);
    qsort(t_all, (size_t)events, sizeof(*t_all), cmp_double);
    printf("latency_ms p50 %.2f p99 %.2f max %.2f all_p99 %.2f lost %zu read_p99 %.2f read_all_p99 %.2f "
           "client_cpu_ms %.0f\n",
           pct(lat, nlat, 0.50), pct(lat, nlat, 0.99), nlat ? lat[nlat - 1] : -1.0, pct(t_all, (size_t)events, 0.99),
           (size_t)n * (size_t)events - nlat, pct(lat_read, nlat, 0.99), pct(t_all_read, (size_t)events, 0.99), cpu0);
    fflush(stdout);
    if (per_event) {
        printf("per_event_last_ms");
        for (int e = 0; e < events; e++)
            printf(" %.1f", per_event[e]);
        printf("\n");
        free(per_event);
    }
    free(st);
    free(lat);
    free(lat_read);
    free(t_pub);
    free(t_all);
    free(t_all_read);
    return 0;
}
