/* rt_ws_latency: append-to-WebSocket-frame latency of the runtime's Khala
 * WebSocket (issue 14, benchmark 3), driven by scripts/bench.d's
 * runtime_bench.py. One thread, poll(2), no allocation per message: the
 * load generator shares the two cores with the runtime and PostgreSQL, so
 * it must not be what the tail measures (the node client it replaces spent
 * more CPU per append than the runtime did).
 *
 *   rt_ws_latency PORT RUN_ID RATE SECONDS TOKEN
 *
 * Subscribes to run:RUN_ID:events on 127.0.0.1:PORT with the sync token
 * TOKEN, then, once the hello frame came, appends RATE events per second
 * for SECONDS over 16 keep-alive connections (one request in flight on
 * each, Prefer: return=minimal), each carrying its number in payload.n,
 * and records for each frame the time since its append was sent. Prints
 * one JSON line: {rate, sent, received, failed, p50_ms, p99_ms, max_ms,
 * ack_p50_ms, ack_p99_ms} (ack: the append's HTTP answer). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HTTP_CONNS 16
#define BUF_CAP 65536

typedef struct {
    int fd;
    long n;     /* the append in flight (0: idle) */
    long long t; /* when it was sent */
    size_t len; /* bytes in buf */
    char buf[BUF_CAP];
} conn;

static long long now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int dial(int port)
{
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;

    if (fd < 0)
        return -1;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* The sockets block and no signal is caught: send queues all of a
 * request this small or fails. */
static int send_all(int fd, const char *p, size_t n)
{
    return send(fd, p, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

static double q(double *v, long n, double p)
{
    long i = (long)(p * (double)n);

    if (n == 0)
        return -1;
    return v[i >= n ? n - 1 : i];
}

/* The number after `"key"` and a colon in text (spaces allowed), or -1. */
static long json_num_after(const char *text, size_t len, const char *key)
{
    size_t kl = strlen(key), i;

    for (i = 0; i + kl < len; i++) {
        if (memcmp(text + i, key, kl) != 0)
            continue;
        i += kl;
        while (i < len && (text[i] == ' ' || text[i] == ':'))
            i++;
        return i < len ? strtol(text + i, NULL, 10) : -1;
    }
    return -1;
}

static const char *find_n(const char *text, size_t len, size_t *rest)
{
    static const char pl[] = "\"payload\"";
    size_t i;

    for (i = 0; i + sizeof(pl) - 1 < len; i++)
        if (memcmp(text + i, pl, sizeof(pl) - 1) == 0) {
            *rest = len - i;
            return text + i;
        }
    return NULL;
}

int main(int argc, char **argv)
{
    static conn http[HTTP_CONNS];
    static char ws[4 * 1024 * 1024];
    struct pollfd pfd[HTTP_CONNS + 1];
    char req[1024], body[256];
    const char *run;
    long rate, seconds, total, sent = 0, received = 0, failed = 0, nack = 0, i;
    long long *sent_at, t0 = 0, end_at = 0;
    double *lat, *ack;
    size_t wlen = 0;
    int port, wsfd, upgraded = 0, started = 0, k, next_conn = 0;

    if (argc != 6) {
        fprintf(stderr, "usage: rt_ws_latency PORT RUN_ID RATE SECONDS TOKEN\n");
        return 2;
    }
    port = atoi(argv[1]); /* trusted: the benchmark's own arguments */
    run = argv[2];
    rate = strtol(argv[3], NULL, 10);
    seconds = strtol(argv[4], NULL, 10);
    total = rate * seconds;
    sent_at = calloc((size_t)total + 2, sizeof(*sent_at));
    lat = calloc((size_t)total + 2, sizeof(*lat));
    ack = calloc((size_t)total + 2, sizeof(*ack));
    if (!sent_at || !lat || !ack || total <= 0)
        return 2;
    if ((wsfd = dial(port)) < 0) {
        perror("connect");
        return 2;
    }
    snprintf(req, sizeof(req),
             "GET /internal/v1/khala/topics/run:%s:events/ws?after_seq=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
             "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             "Sec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n",
             run, port, argv[5]);
    if (send_all(wsfd, req, strlen(req)) < 0)
        return 2;
    for (k = 0; k < HTTP_CONNS; k++)
        if ((http[k].fd = dial(port)) < 0) {
            perror("connect");
            return 2;
        }
    for (;;) {
        long long now = now_ns();
        int timeout = 1000, n;

        if (started && sent < total) {
            long due = (long)((double)(now - t0) / 1e9 * (double)rate);

            if (due > total)
                due = total;
            /* Round robin from the connection after the last one used:
             * taking the first idle one left the last few unused for the
             * whole run (at sub-ms answers connection 0 is nearly always
             * idle), and the runtime answers a connection that sends no
             * request head within RUNTIME_HTTP_HEADER_TIMEOUT_MS (10 s) 408
             * and closes it: the run failed ("append connection closed")
             * whenever no early stall had spread the appends. */
            for (i = 0; i < HTTP_CONNS && sent < due; i++) {
                int hl, bl;

                k = (int)((next_conn + i) % HTTP_CONNS);
                if (http[k].n)
                    continue;
                next_conn = (k + 1) % HTTP_CONNS;
                sent++;
                bl = snprintf(body, sizeof(body),
                              "{\"event_type\":\"bench.tick\",\"payload\":{\"n\":%ld},\"idempotency_key\":\"ws-%s-%ld\"}",
                              sent, run, sent);
                hl = snprintf(req, sizeof(req),
                              "POST /internal/v1/runs/%s/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              "Content-Type: application/json\r\nPrefer: return=minimal\r\nContent-Length: %d\r\n\r\n%s",
                              run, bl, body);
                sent_at[sent] = http[k].t = now_ns();
                http[k].n = sent;
                if (send_all(http[k].fd, req, (size_t)hl) < 0) {
                    failed++;
                    http[k].n = 0;
                }
            }
            if (sent >= total)
                end_at = now + 3000000000LL;
            timeout = 1;
        }
        if (started && sent >= total && (received >= total || now >= end_at))
            break;
        pfd[0].fd = wsfd;
        pfd[0].events = POLLIN;
        for (k = 0; k < HTTP_CONNS; k++) {
            pfd[k + 1].fd = http[k].fd;
            pfd[k + 1].events = POLLIN;
        }
        n = poll(pfd, HTTP_CONNS + 1, timeout);
        if (n < 0 && errno != EINTR)
            return 2;
        now = now_ns();
        if (n > 0 && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t r = recv(wsfd, ws + wlen, sizeof(ws) - wlen, 0);
            size_t off = 0;

            if (r <= 0) {
                fprintf(stderr, "websocket closed\n");
                return 2;
            }
            wlen += (size_t)r;
            /* The 101 answer and the hello frame may come in separate
             * reads: once the head is consumed, what follows is frames. */
            if (!upgraded) {
                char *e = memmem(ws, wlen, "\r\n\r\n", 4);

                if (!e)
                    continue;
                if (strncmp(ws, "HTTP/1.1 101", 12) != 0) {
                    fprintf(stderr, "upgrade refused: %.*s\n", (int)wlen, ws);
                    return 2;
                }
                off = (size_t)(e + 4 - ws);
                upgraded = 1;
            }
            /* Server frames: unmasked, FIN set (the runtime sends each
             * message as one frame). */
            while (wlen - off >= 2) {
                unsigned char *h = (unsigned char *)ws + off;
                size_t plen = h[1] & 0x7f, hdr = 2;
                int op = h[0] & 0x0f;

                if (plen == 126) {
                    if (wlen - off < 4)
                        break;
                    plen = (size_t)h[2] << 8 | h[3];
                    hdr = 4;
                } else if (plen == 127) {
                    if (wlen - off < 10)
                        break;
                    plen = 0;
                    for (i = 0; i < 8; i++)
                        plen = plen << 8 | h[2 + i];
                    hdr = 10;
                }
                if (wlen - off < hdr + plen)
                    break;
                if (op == 1) {
                    const char *t = ws + off + hdr, *p;
                    size_t rest = 0;
                    long num;

                    if (!started && memmem(t, plen, "\"hello\"", 7)) {
                        started = 1;
                        t0 = now_ns();
                    } else if ((p = find_n(t, plen, &rest)) != NULL && (num = json_num_after(p, rest, "\"n\"")) > 0 &&
                               num <= total && sent_at[num]) {
                        lat[received++] = (double)(now - sent_at[num]) / 1e6;
                        sent_at[num] = 0;
                    } else if (!memmem(t, plen, "\"message\"", 9)) {
                        fprintf(stderr, "unexpected frame: %.*s\n", (int)plen, t);
                        return 2;
                    }
                } else if (op == 8) {
                    fprintf(stderr, "websocket closed by the server\n");
                    return 2;
                }
                off += hdr + plen;
            }
            memmove(ws, ws + off, wlen - off);
            wlen -= off;
            if (wlen == sizeof(ws))
                return 2;
        }
        for (k = 0; n > 0 && k < HTTP_CONNS; k++) {
            conn *c = &http[k];
            ssize_t r;
            char *e;
            long clen;

            if (!(pfd[k + 1].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            r = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len - 1, 0);
            if (r <= 0) {
                fprintf(stderr, "append connection closed\n");
                return 2;
            }
            c->len += (size_t)r;
            c->buf[c->len] = '\0';
            if (!(e = strstr(c->buf, "\r\n\r\n")))
                continue;
            clen = json_num_after(c->buf, (size_t)(e - c->buf), "ontent-length");
            if (clen < 0 || c->len < (size_t)(e + 4 - c->buf) + (size_t)clen)
                continue;
            if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0)
                failed++;
            if (c->n)
                ack[nack++] = (double)(now - c->t) / 1e6;
            c->n = 0;
            c->len = 0;
        }
    }
    qsort(lat, (size_t)received, sizeof(*lat), cmp_d);
    qsort(ack, (size_t)nack, sizeof(*ack), cmp_d);
    printf("{\"rate\":%ld,\"sent\":%ld,\"received\":%ld,\"failed\":%ld,\"p50_ms\":%.3f,\"p99_ms\":%.3f,"
           "\"max_ms\":%.3f,\"ack_p50_ms\":%.3f,\"ack_p99_ms\":%.3f}\n",
           rate, sent, received, failed, q(lat, received, 0.5), q(lat, received, 0.99), q(lat, received, 1.0),
           q(ack, nack, 0.5), q(ack, nack, 0.99));
    return failed ? 1 : 0;
}
