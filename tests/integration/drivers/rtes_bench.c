/* Load tools for the RTES benchmark (scripts/bench.d/60-rtes.sh), over the
 * same librabbitmq as the service, so that the anchor and ours differ only
 * in what they do with a message.
 *
 *   rtes_bench publish AMQP_URL ROUTING_KEY EXECUTION_ID N
 *       N node status messages into exchange `workflows` (node ids 0..N-1),
 *       into the non-durable queue named as the routing key (declared,
 *       bound and emptied first).
 *   rtes_bench consume AMQP_URL QUEUE N PREFETCH
 *       the anchor: a plain consumer that acks each message, nothing else;
 *       prints "consumed N in S s".
 *   rtes_bench watch HOST PORT EXECUTION_ID CONNS N
 *       CONNS WebSockets on GET /rt, each reading until it has N text
 *       frames; prints "watched CONNS x N at EPOCH_S" (wall clock when the
 *       last one completed) and fails when a frame is missing or extra.
 *
 * AMQP_URL as for the services. Exit status 0 on success. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_framing.h>

#include "amqpc.h"
#include "log.h"

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long arg_long(const char *s, long min, long max)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max) {
        fprintf(stderr, "rtes_bench: bad number %s\n", s);
        exit(2);
    }
    return v;
}

static int publish(const char *url, const char *rk, const char *eid, long n)
{
    amqpc *a = amqpc_new(url, "rtes-bench-publish");
    char body[512];

    if (!a || amqpc_connect(a) < 0 || amqpc_declare_topic_exchange(a, "workflows", 1) < 0 ||
        amqpc_declare_queue(a, rk, 0, "workflows", rk) < 0) {
        fprintf(stderr, "rtes_bench: %s\n", a ? amqpc_errstr(a) : "bad URL");
        return 1;
    }
    amqp_queue_purge(amqpc_state(a), 1, amqp_cstring_bytes(rk));
    if (amqpc_check(a, amqp_get_rpc_reply(amqpc_state(a)), "queue.purge") < 0) {
        fprintf(stderr, "rtes_bench: %s\n", amqpc_errstr(a));
        return 1;
    }
    for (long i = 0; i < n; i++) {
        int len = snprintf(body, sizeof(body),
                           "{\"workflow_id\":\"wf-bench\",\"execution_id\":\"%s\",\"node_id\":\"node-%ld\","
                           "\"node_name\":\"Node %ld\",\"status\":\"success\",\"executed_at\":\"2026-01-01T00:00:00Z\","
                           "\"duration_ms\":12,\"input\":{\"item\":%ld},\"parameters\":{\"url\":\"https://example.com\"},"
                           "\"output\":{\"status\":200,\"ok\":true}}",
                           eid, i, i, i);

        if (amqpc_publish(a, "workflows", rk, body, (size_t)len, 0) < 0) {
            fprintf(stderr, "rtes_bench: publish: %s\n", amqpc_errstr(a));
            return 1;
        }
    }
    /* A synchronous round trip: every publish before it has reached the
     * broker. */
    if (amqpc_ping(a) < 0) {
        fprintf(stderr, "rtes_bench: %s\n", amqpc_errstr(a));
        return 1;
    }
    amqpc_free(a);
    printf("published %ld\n", n);
    return 0;
}

static int consume(const char *url, const char *queue, long n, long prefetch)
{
    amqpc *a = amqpc_new(url, "rtes-bench-consume");
    amqp_connection_state_t st;
    double t0 = 0;
    long got = 0;

    if (!a || amqpc_connect(a) < 0 || !(st = amqpc_state(a))) {
        fprintf(stderr, "rtes_bench: %s\n", a ? amqpc_errstr(a) : "bad URL");
        return 1;
    }
    amqp_basic_qos(st, 1, 0, (uint16_t)prefetch, 0);
    if (amqpc_check(a, amqp_get_rpc_reply(st), "basic.qos") < 0)
        goto fail;
    amqp_basic_consume(st, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    if (amqpc_check(a, amqp_get_rpc_reply(st), "basic.consume") < 0)
        goto fail;
    while (got < n) {
        amqp_envelope_t env;
        struct timeval tv = {10, 0};
        amqp_rpc_reply_t r;

        amqp_maybe_release_buffers(st);
        r = amqp_consume_message(st, &env, &tv, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            fprintf(stderr, "rtes_bench: consume stopped after %ld\n", got);
            goto fail;
        }
        if (got == 0)
            t0 = now_s();
        got++;
        if (amqp_basic_ack(st, 1, env.delivery_tag, 0) != AMQP_STATUS_OK)
            goto fail;
        amqp_destroy_envelope(&env);
    }
    printf("consumed %ld in %.3f s\n", got, now_s() - t0);
    amqpc_free(a);
    return 0;
fail:
    fprintf(stderr, "rtes_bench: %s\n", amqpc_errstr(a));
    amqpc_free(a);
    return 1;
}

typedef struct {
    int fd, upgraded;
    long frames;
    size_t len;
    char buf[65536];
} wconn;

/* Consumes whole frames from c->buf; returns -1 on a protocol error. */
static int frames(wconn *c)
{
    size_t off = 0;

    for (;;) {
        unsigned char *p = (unsigned char *)c->buf + off;
        size_t avail = c->len - off, hl = 2;
        unsigned long long plen;

        if (avail < 2)
            break;
        plen = p[1] & 0x7f;
        if (p[1] & 0x80)
            return -1; /* servers do not mask */
        if (plen == 126) {
            hl = 4;
            if (avail < hl)
                break;
            plen = ((unsigned long long)p[2] << 8) | p[3];
        } else if (plen == 127) {
            hl = 10;
            if (avail < hl)
                break;
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = (plen << 8) | p[2 + i];
        }
        if (hl + plen > sizeof(c->buf))
            return -1;
        if (avail < hl + plen)
            break;
        /* A whole text message: a final text frame or final continuation. */
        if (((p[0] & 0x0f) == 1 || (p[0] & 0x0f) == 0) && (p[0] & 0x80))
            c->frames++;
        if ((p[0] & 0x0f) == 8)
            return -1; /* closed by the server */
        off += hl + plen;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

static int watch(const char *host, const char *port, const char *eid, int conns, long n)
{
    struct addrinfo hints = {0}, *ai;
    wconn *cs = calloc((size_t)conns, sizeof(*cs));
    int ep = epoll_create1(0), done = 0, rc = 1;
    char req[1024];
    int rl;
    double deadline = now_s() + 600;

    hints.ai_socktype = SOCK_STREAM;
    if (!cs || ep < 0 || getaddrinfo(host, port, &hints, &ai) != 0) {
        fprintf(stderr, "rtes_bench: cannot resolve %s\n", host);
        return 1;
    }
    rl = snprintf(req, sizeof(req),
                  "GET /rt?execution_id=%s&workflow_id=wf-bench HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n",
                  eid, host, port);
    for (int i = 0; i < conns; i++) {
        struct epoll_event ev = {0};
        int one = 1;

        cs[i].fd = socket(ai->ai_family, SOCK_STREAM, 0);
        if (cs[i].fd < 0 || connect(cs[i].fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
            write(cs[i].fd, req, (size_t)rl) != rl) {
            fprintf(stderr, "rtes_bench: connect: %s\n", strerror(errno));
            return 1;
        }
        setsockopt(cs[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        fcntl(cs[i].fd, F_SETFL, O_NONBLOCK);
        ev.events = EPOLLIN;
        ev.data.u32 = (uint32_t)i;
        epoll_ctl(ep, EPOLL_CTL_ADD, cs[i].fd, &ev);
    }
    freeaddrinfo(ai);
    while (done < conns && now_s() < deadline) {
        struct epoll_event evs[64];
        int k = epoll_wait(ep, evs, 64, 1000);

        for (int e = 0; e < k; e++) {
            wconn *c = &cs[evs[e].data.u32];
            ssize_t r;

            for (;;) {
                r = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);
                if (r <= 0)
                    break;
                c->len += (size_t)r;
                if (!c->upgraded) {
                    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
                    if (!end)
                        continue;
                    if (strncmp(c->buf, "HTTP/1.1 101", 12) != 0) {
                        fprintf(stderr, "rtes_bench: handshake refused: %.40s\n", c->buf);
                        goto out;
                    }
                    c->upgraded = 1;
                    memmove(c->buf, end + 4, c->len - (size_t)(end + 4 - c->buf));
                    c->len -= (size_t)(end + 4 - c->buf);
                }
                {
                    long before = c->frames;

                    if (frames(c) < 0) {
                        fprintf(stderr, "rtes_bench: watcher %u: closed or bad frame after %ld frames\n",
                                evs[e].data.u32, c->frames);
                        goto out;
                    }
                    if (before < n && c->frames >= n)
                        done++;
                }
            }
            if (r == 0) {
                fprintf(stderr, "rtes_bench: watcher %u: connection closed after %ld frames\n", evs[e].data.u32,
                        c->frames);
                goto out;
            }
        }
    }
    if (done < conns) {
        fprintf(stderr, "rtes_bench: timed out with %d of %d watchers complete\n", done, conns);
        goto out;
    }
    printf("watched %d x %ld at %.3f\n", conns, n, wall_s());
    fflush(stdout);
    /* Anything beyond N would be a repeat: look for a short while. */
    {
        double until = now_s() + 0.5;

        while (now_s() < until) {
            struct epoll_event evs[64];
            int k = epoll_wait(ep, evs, 64, 100);

            for (int e = 0; e < k; e++) {
                wconn *c = &cs[evs[e].data.u32];
                ssize_t r = read(c->fd, c->buf + c->len, sizeof(c->buf) - c->len);

                if (r > 0) {
                    c->len += (size_t)r;
                    frames(c);
                }
            }
        }
        for (int i = 0; i < conns; i++)
            if (cs[i].frames != n) {
                fprintf(stderr, "rtes_bench: watcher %d got %ld frames, not %ld\n", i, cs[i].frames, n);
                goto out;
            }
    }
    rc = 0;
out:
    for (int i = 0; i < conns; i++)
        if (cs[i].fd > 0)
            close(cs[i].fd);
    free(cs);
    close(ep);
    return rc;
}

int main(int argc, char **argv)
{
    log_init("rtes_bench", "warn", "text");
    if (argc == 6 && strcmp(argv[1], "publish") == 0)
        return publish(argv[2], argv[3], argv[4], arg_long(argv[5], 1, 100000000));
    if (argc == 6 && strcmp(argv[1], "consume") == 0)
        return consume(argv[2], argv[3], arg_long(argv[4], 1, 100000000), arg_long(argv[5], 1, 65535));
    if (argc == 7 && strcmp(argv[1], "watch") == 0)
        return watch(argv[2], argv[3], argv[4], (int)arg_long(argv[5], 1, 10000), arg_long(argv[6], 1, 100000000));
    fprintf(stderr, "usage: rtes_bench publish URL RK EID N | consume URL QUEUE N PREFETCH | "
                    "watch HOST PORT EID CONNS N\n");
    return 2;
}
