/* rtload: a C WebSocket load client for realtime's /ws (benchmarks and
 * tests). One thread, epoll, no per-connection buffer unless a frame
 * straddles reads.
 *
 *   rtload [options]
 *     -h HOST      server address (127.0.0.1)
 *     -p PORT      server port (8081)
 *     -n N         connections (1)
 *     -s SRCS      comma list of source addresses to spread over (none)
 *     -k SECRET    JWT_SECRET to sign tokens with (user ids u<base+i>)
 *     -b BASE      first user number (0)
 *     -t TOPIC     topic every connection subscribes to ("bench")
 *     -w SECS      after all subscribed: wait this long for traffic (10)
 *     -e COUNT     stop early once every connection got COUNT broadcasts
 *     -P MSGS      also publish MSGS broadcasts on an extra connection,
 *     -r RATE      at RATE per second (100), after -d SECS (1) of quiet
 *     -u PATH      request path before the token ("/ws?token=")
 *     -S           do not subscribe (a connection is ready once open)
 *     -i USECS     after a round of reads, sleep USECS (0) so the next
 *                  round reads what came meanwhile in one recv per socket
 *     -R FILE      write "ready\n" to FILE once every connection subscribed
 *                  (the publisher then waits for FILE.go to exist)
 *     -L FILE      at the end, write one line per broadcast received
 *                  ("n count min_ms max_ms", n from its payload): where in a
 *                  run the slow deliveries were
 *
 * Output, one JSON line: {"connected":N,"subscribed":N,"received":N,
 * "conns_with_all":N,"deliveries_per_s":D,"p50_ms":x,"p99_ms":y,
 * "max_ms":z,"errors":N,...,"cpu_us":C,"traffic_cpu_us":T}: C is this process's
 * CPU (user+sys) in all, T the part after every connection was ready. Latency is from the publisher's wall clock in
 * the payload to the receipt (same machine). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "jwtauth.h"

enum { ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_DEAD };

typedef struct {
    int fd, state, subscribed, publisher;
    long received;
    char *pend; /* bytes of an incomplete frame (or handshake) */
    size_t plen;
} conn;

static conn *conns;
static int nconns, epfd;
static char host[64] = "127.0.0.1", topic[128] = "bench", ready_file[512], path[256] = "/ws?token=";
static int no_subscribe;
static long read_pause_us;
static long long setup_cpu_us; /* CPU used before the traffic (connects, handshakes, subscribes) */
static int port = 8081;
static long expect_each;
static long long total_rx, first_rx_us, last_rx_us, errors;
static int nsubscribed, nconnected;
/* Latency histogram: 0.1 ms buckets up to 10 s. */
#define HBUCKETS 100000
static unsigned *hist;
static long long hmax_us;
/* Per broadcast (-L): deliveries, fastest and slowest, by payload "n". */
#define TRACE_MAX 100000
typedef struct {
    unsigned count;
    long long min_us, max_us;
} trace_slot;
static trace_slot *trace;
static char trace_file[512];

static long long now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static int send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            usleep(1000);
            continue;
        }
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A masked text frame with a zero mask (legal, and no copy needed). */
static int send_text(conn *c, const char *text, size_t n)
{
    char hdr[16];
    size_t h = 0;

    hdr[h++] = (char)0x81;
    if (n < 126) {
        hdr[h++] = (char)(0x80 | n);
    } else {
        hdr[h++] = (char)(0x80 | 126);
        hdr[h++] = (char)(n >> 8);
        hdr[h++] = (char)n;
    }
    memset(hdr + h, 0, 4);
    h += 4;
    if (send_all(c->fd, hdr, h) < 0 || send_all(c->fd, text, n) < 0)
        return -1;
    return 0;
}

static void on_text(conn *c, const char *p, size_t n)
{
    const char *t;

    if (n > 30 && memcmp(p, "{\"type\":\"Broadcast\"", 19) == 0) {
        long long now = now_us(), sent;

        c->received++;
        total_rx++;
        if (!first_rx_us)
            first_rx_us = now;
        last_rx_us = now;
        t = memmem(p, n, "\"t\":", 4);
        /* strtod, not strtoll: realtime prints the payload again with
         * cJSON, which writes a timestamp ending in 0 as 1.76e+15 form. */
        if (t && (sent = (long long)strtod(t + 4, NULL)) > 0) {
            long long d = now - sent;
            long b = d < 0 ? 0 : d / 100;

            hist[b >= HBUCKETS ? HBUCKETS - 1 : b]++;
            if (d > hmax_us)
                hmax_us = d;
            if (trace) {
                const char *np = memmem(p, n, "\"n\":", 4);
                long k = np ? strtol(np + 4, NULL, 10) : -1;

                if (k >= 0 && k < TRACE_MAX) {
                    trace_slot *ts = &trace[k];

                    if (!ts->count || d < ts->min_us)
                        ts->min_us = d;
                    if (d > ts->max_us)
                        ts->max_us = d;
                    ts->count++;
                }
            }
        }
        return;
    }
    if (!c->subscribed && memmem(p, n, "\"status\":\"subscribed\"", 21)) {
        c->subscribed = 1;
        nsubscribed++;
        return;
    }
    if (memmem(p, n, "\"type\":\"Error\"", 14)) {
        errors++;
        if (errors < 5)
            fprintf(stderr, "rtload: %.*s\n", (int)(n > 200 ? 200 : n), p);
    }
}

/* Parses whole frames from p; returns bytes used. */
static size_t parse_frames(conn *c, const char *p, size_t n)
{
    size_t off = 0;

    while (n - off >= 2) {
        unsigned char b0 = (unsigned char)p[off], b1 = (unsigned char)p[off + 1];
        size_t len = b1 & 0x7f, h = 2;

        if (len == 126) {
            if (n - off < 4)
                break;
            len = ((size_t)(unsigned char)p[off + 2] << 8) | (unsigned char)p[off + 3];
            h = 4;
        } else if (len == 127) {
            if (n - off < 10)
                break;
            len = 0;
            for (int i = 0; i < 8; i++)
                len = (len << 8) | (unsigned char)p[off + 2 + i];
            h = 10;
        }
        if (n - off < h + len)
            break;
        if ((b0 & 0x0f) == 1)
            on_text(c, p + off + h, len);
        else if ((b0 & 0x0f) == 9) {
            /* Ping: answer with a masked pong of the same payload. */
            char pong[2 + 4 + 125];
            size_t pl = len > 125 ? 125 : len;

            pong[0] = (char)0x8a;
            pong[1] = (char)(0x80 | pl);
            memset(pong + 2, 0, 4);
            memcpy(pong + 6, p + off + h, pl);
            send_all(c->fd, pong, 6 + pl);
        } else if ((b0 & 0x0f) == 8) {
            c->state = ST_DEAD;
        }
        off += h + len;
    }
    return off;
}

static void sign_token(jwtauth *j, long uid, char **tok)
{
    cJSON *cl = cJSON_CreateObject();
    char sub[32];

    snprintf(sub, sizeof(sub), "u%ld", uid);
    cJSON_AddStringToObject(cl, "sub", sub);
    if (jwtauth_sign(j, cl, 3600, tok) != JWTAUTH_OK)
        die("jwtauth_sign");
    cJSON_Delete(cl);
}

static void start_conn(conn *c, const struct sockaddr_in *dst, const char *src)
{
    int one = 1;
    struct epoll_event ev;

    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0)
        die("socket");
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (src) {
        struct sockaddr_in sa = {0};

        sa.sin_family = AF_INET;
        inet_pton(AF_INET, src, &sa.sin_addr);
#ifdef IP_BIND_ADDRESS_NO_PORT
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
#endif
        if (bind(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
            die("bind");
    }
    if (connect(c->fd, (const struct sockaddr *)dst, sizeof(*dst)) < 0 && errno != EINPROGRESS)
        die("connect");
    c->state = ST_CONNECTING;
    ev.events = EPOLLOUT | EPOLLIN;
    ev.data.ptr = c;
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
}

static void on_writable(conn *c, jwtauth *j, long uid)
{
    char *tok = NULL, req[2048];
    int n;
    struct epoll_event ev;

    if (c->state != ST_CONNECTING)
        return;
    sign_token(j, uid, &tok);
    n = snprintf(req, sizeof(req),
                 "GET %s%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                 path, tok, host);
    free(tok);
    if (send_all(c->fd, req, (size_t)n) < 0) {
        c->state = ST_DEAD;
        errors++;
        return;
    }
    c->state = ST_HANDSHAKE;
    /* Edge-triggered: on_readable reads until a short read, and a level
     * would have every epoll_wait poll each socket it reported last time
     * once more (tcp_poll), only to find it empty. */
    ev.events = EPOLLIN | EPOLLET;
    ev.data.ptr = c;
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void on_readable(conn *c, char *scratch, size_t cap)
{
    for (;;) {
        size_t have = c->plen, used;
        ssize_t r;
        char *p;

        if (have)
            memcpy(scratch, c->pend, have);
        r = recv(c->fd, scratch + have, cap - have, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            if (c->state != ST_DEAD)
                errors++;
            c->state = ST_DEAD;
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            free(c->pend);
            c->pend = NULL;
            c->plen = 0;
            return;
        }
        if (r < 0)
            return;
        free(c->pend);
        c->pend = NULL;
        c->plen = 0;
        have += (size_t)r;
        p = scratch;
        if (c->state == ST_HANDSHAKE) {
            char *end = memmem(p, have, "\r\n\r\n", 4);
            char sub[256];
            int n;

            if (!end) {
                c->pend = malloc(have);
                memcpy(c->pend, p, have);
                c->plen = have;
                continue;
            }
            if (strncmp(p, "HTTP/1.1 101", 12) != 0) {
                errors++;
                c->state = ST_DEAD;
                return;
            }
            c->state = ST_OPEN;
            nconnected++;
            n = snprintf(sub, sizeof(sub), "{\"type\":\"Subscribe\",\"data\":{\"topics\":[\"%s\"]}}", topic);
            if (!c->publisher && !no_subscribe)
                send_text(c, sub, (size_t)n);
            else {
                c->subscribed = 1;
                nsubscribed++;
            }
            used = (size_t)(end + 4 - p);
            p += used;
            have -= used;
        }
        used = parse_frames(c, p, have);
        if (used < have) {
            c->plen = have - used;
            c->pend = malloc(c->plen);
            memcpy(c->pend, p + used, c->plen);
        }
        if ((size_t)r < cap - c->plen)
            return;
    }
}

static double percentile(double q)
{
    unsigned long long total = 0, seen = 0;

    for (int i = 0; i < HBUCKETS; i++)
        total += hist[i];
    if (!total)
        return 0;
    for (int i = 0; i < HBUCKETS; i++) {
        seen += hist[i];
        if ((double)seen >= q * (double)total)
            return (i + 1) * 0.1;
    }
    return HBUCKETS * 0.1;
}

int main(int argc, char **argv)
{
    const char *secret = "dev-jwt-secret-change-me", *srcs_arg = NULL;
    char *srcs[64], *srcs_copy = NULL;
    int nsrc = 0, opt, npub = 0;
    long base = 0, wait_s = 10, pub_msgs = 0, rate = 100, delay_s = 1;
    struct sockaddr_in dst = {0};
    jwtauth *j;
    char *scratch;
    size_t cap = 1 << 20;
    long long deadline;
    struct epoll_event evs[512];
    conn *pub = NULL;

    signal(SIGPIPE, SIG_IGN);
    {
        /* The load shares the cores with the server: as a SCHED_BATCH task
         * a wake-up does not preempt the server in the middle of a fan-out,
         * so each recv takes many frames instead of one (real subscribers
         * are on other machines). */
        struct sched_param sp = {0};

        if (!getenv("RTLOAD_NO_BATCH"))
            sched_setscheduler(0, SCHED_BATCH, &sp);
    }
    while ((opt = getopt(argc, argv, "h:p:n:s:k:b:t:w:e:P:r:d:R:u:Si:L:")) != -1) {
        switch (opt) {
        case 'h': snprintf(host, sizeof(host), "%s", optarg); break;
        case 'p': port = (int)strtol(optarg, NULL, 10); break;
        case 'n': nconns = (int)strtol(optarg, NULL, 10); break;
        case 's': srcs_arg = optarg; break;
        case 'k': secret = optarg; break;
        case 'b': base = strtol(optarg, NULL, 10); break;
        case 't': snprintf(topic, sizeof(topic), "%s", optarg); break;
        case 'w': wait_s = strtol(optarg, NULL, 10); break;
        case 'e': expect_each = strtol(optarg, NULL, 10); break;
        case 'P': pub_msgs = strtol(optarg, NULL, 10); break;
        case 'r': rate = strtol(optarg, NULL, 10); break;
        case 'd': delay_s = strtol(optarg, NULL, 10); break;
        case 'R': snprintf(ready_file, sizeof(ready_file), "%s", optarg); break;
        case 'u': snprintf(path, sizeof(path), "%s", optarg); break;
        case 'S': no_subscribe = 1; break;
        case 'i': read_pause_us = strtol(optarg, NULL, 10); break;
        case 'L': snprintf(trace_file, sizeof(trace_file), "%s", optarg); break;
        default: fprintf(stderr, "rtload: see the comment at the top of rtload.c\n"); return 2;
        }
    }
    if (srcs_arg) {
        char *p = srcs_copy = strdup(srcs_arg);

        while (p && *p && nsrc < 64) {
            char *comma = strchr(p, ',');

            if (comma)
                *comma = '\0';
            srcs[nsrc++] = p;
            p = comma ? comma + 1 : NULL;
        }
    }
    npub = pub_msgs > 0;
    conns = calloc((size_t)(nconns + npub), sizeof(conn));
    hist = calloc(HBUCKETS, sizeof(*hist));
    scratch = malloc(cap);
    if (trace_file[0] && !(trace = calloc(TRACE_MAX, sizeof(*trace))))
        die("calloc");
    j = jwtauth_new(secret, NULL, NULL, 0);
    epfd = epoll_create1(0);
    if (!conns || !hist || !scratch || !j || epfd < 0)
        die("setup");
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, host, &dst.sin_addr);
    if (npub) {
        pub = &conns[nconns];
        pub->publisher = 1;
    }
    /* Connect in waves so the listen backlog never overflows. */
    for (int i = 0; i < nconns + npub;) {
        int wave = i + 500 < nconns + npub ? i + 500 : nconns + npub;

        for (; i < wave; i++)
            start_conn(&conns[i], &dst, nsrc ? srcs[i % nsrc] : NULL);
        deadline = now_us() + 10000000;
        while (nconnected < wave - (int)errors && now_us() < deadline) {
            int n = epoll_wait(epfd, evs, 512, 100);

            for (int e = 0; e < n; e++) {
                conn *c = evs[e].data.ptr;

                if (evs[e].events & EPOLLOUT)
                    on_writable(c, j, base + (c - conns));
                if (evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                    on_readable(c, scratch, cap);
            }
        }
    }
    deadline = now_us() + 30000000;
    if (no_subscribe)
        nsubscribed = nconnected;
    while (nsubscribed < nconnected && now_us() < deadline) {
        int n = epoll_wait(epfd, evs, 512, 100);

        for (int e = 0; e < n; e++)
            on_readable(evs[e].data.ptr, scratch, cap);
    }
    fprintf(stderr, "rtload: %d connected, %d subscribed, %lld errors\n", nconnected, nsubscribed, errors);
    if (ready_file[0]) {
        FILE *f = fopen(ready_file, "w");
        char go[600];
        struct stat st;

        if (f) {
            fprintf(f, "ready %d\n", nsubscribed);
            fclose(f);
        }
        snprintf(go, sizeof(go), "%s.go", ready_file);
        /* Stay responsive (pings) while the others get ready. */
        deadline = now_us() + 300000000LL;
        while (stat(go, &st) != 0 && now_us() < deadline) {
            int n = epoll_wait(epfd, evs, 512, 50);

            for (int e = 0; e < n; e++)
                on_readable(evs[e].data.ptr, scratch, cap);
        }
    }
    {
        struct rusage ru;

        getrusage(RUSAGE_SELF, &ru);
        setup_cpu_us = (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec +
                       ru.ru_stime.tv_usec;
    }
    {
        long long start = now_us(), next_pub = start + delay_s * 1000000LL, interval = rate > 0 ? 1000000 / rate : 0;
        long sent = 0;

        deadline = start + (delay_s + wait_s) * 1000000LL + (rate > 0 ? pub_msgs * 1000000LL / rate : 0);
        while (now_us() < deadline) {
            long long now = now_us(), wait_us = 50000;
            struct timespec wt;
            int n;

            if (pub && sent < pub_msgs && pub->state == ST_OPEN) {
                while (sent < pub_msgs && now >= next_pub) {
                    char msg[256];
                    int l = snprintf(msg, sizeof(msg),
                                     "{\"type\":\"Broadcast\",\"data\":{\"topic\":\"%s\",\"payload\":{\"t\":%lld,"
                                     "\"n\":%ld}}}",
                                     topic, now_us(), sent);

                    send_text(pub, msg, (size_t)l);
                    sent++;
                    next_pub += interval;
                }
                /* To the microsecond: a wait in whole milliseconds, rounded
                 * down, spun in epoll_wait(0) for the last one before each
                 * broadcast, CPU the server and the readers share. */
                wait_us = next_pub - now_us();
                if (wait_us < 0)
                    wait_us = 0;
                if (wait_us > 50000)
                    wait_us = 50000;
            }
            wt.tv_sec = 0;
            wt.tv_nsec = wait_us * 1000;
            n = epoll_pwait2(epfd, evs, 512, &wt, NULL);
            for (int e = 0; e < n; e++)
                on_readable(evs[e].data.ptr, scratch, cap);
            if (n > 0 && read_pause_us > 0) {
                /* Asleep outside epoll_wait, the server's sends wake
                 * nobody; the next round reads what came meanwhile. */
                struct timespec ts = {0, read_pause_us * 1000};

                nanosleep(&ts, NULL);
            }
            if (expect_each && (!pub || sent >= pub_msgs)) {
                int all = 1;

                for (int i = 0; i < nconns && all; i++)
                    all = conns[i].received >= expect_each;
                if (all)
                    break;
            }
        }
    }
    {
        long with_all = 0;
        double secs = last_rx_us > first_rx_us ? (double)(last_rx_us - first_rx_us) / 1e6 : 0;

        for (int i = 0; i < nconns; i++)
            if (expect_each ? conns[i].received >= expect_each : conns[i].received > 0)
                with_all++;
        struct rusage ru;
        long long cpu_us;

        getrusage(RUSAGE_SELF, &ru);
        cpu_us = (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
        printf("{\"connected\":%d,\"subscribed\":%d,\"received\":%lld,\"conns_with_all\":%ld,"
               "\"deliveries_per_s\":%.0f,\"p50_ms\":%.1f,\"p99_ms\":%.1f,\"max_ms\":%.1f,\"errors\":%lld,\"first_us\":%lld,"
               "\"last_us\":%lld,\"cpu_us\":%lld,\"traffic_cpu_us\":%lld}\n",
               nconnected, nsubscribed, total_rx, with_all, secs > 0 ? (double)total_rx / secs : 0,
               percentile(0.5), percentile(0.99), (double)hmax_us / 1000.0, errors, first_rx_us, last_rx_us, cpu_us,
               cpu_us - setup_cpu_us);
    }
    if (trace) {
        FILE *f = fopen(trace_file, "w");

        if (!f)
            die(trace_file);
        for (long k = 0; k < TRACE_MAX; k++)
            if (trace[k].count)
                fprintf(f, "%ld %u %.1f %.1f\n", k, trace[k].count, trace[k].min_us / 1000.0, trace[k].max_us / 1000.0);
        fclose(f);
        free(trace);
    }
    for (int i = 0; i < nconns + npub; i++) {
        free(conns[i].pend);
        if (conns[i].state != ST_DEAD && conns[i].fd > 0)
            close(conns[i].fd);
    }
    free(conns);
    free(hist);
    free(scratch);
    free(srcs_copy);
    jwtauth_free(j);
    close(epfd);
    return 0;
}
