/* sendcost: what one small TCP send over loopback costs on this machine,
 * with no server around it: the floor under realtime's fan-out (docs/
 * realtime.md, Benchmarks). Opens N connected pairs, then ROUNDS times
 * sends 120 bytes (a Broadcast frame's size) on each server side, and
 * drains the client sides between rounds (outside the timing).
 *
 *   sendcost [N=5000] [ROUNDS=10] [THREADS=1]
 *
 * Prints the wall and CPU (process, all threads) microseconds per send;
 * THREADS > 1 splits each round's sends over that many threads. N is
 * bounded by the descriptor limit (2N + a few). */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 8
#define FRAME 120

typedef struct {
    const int *fds;
    int n, step, first, failed;
} sender;

static double clock_s(clockid_t id)
{
    struct timespec t;

    clock_gettime(id, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void *send_some(void *arg)
{
    sender *s = arg;
    char frame[FRAME];

    memset(frame, 'x', sizeof(frame));
    for (int i = s->first; i < s->n; i += s->step)
        if (send(s->fds[i], frame, sizeof(frame), MSG_DONTWAIT | MSG_NOSIGNAL) != (ssize_t)sizeof(frame))
            s->failed = 1;
    return NULL;
}

static long arg_or(int argc, char **argv, int i, long dflt, long lo, long hi)
{
    char *end;
    long v;

    if (argc <= i)
        return dflt;
    v = strtol(argv[i], &end, 10);
    if (*end || v < lo || v > hi) {
        fprintf(stderr, "sendcost: argument %d must be %ld..%ld\n", i, lo, hi);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    int n = (int)arg_or(argc, argv, 1, 5000, 1, 1000000);
    int rounds = (int)arg_or(argc, argv, 2, 10, 1, 100000);
    int nthreads = (int)arg_or(argc, argv, 3, 1, 1, MAX_THREADS);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1, rc = 1;
    struct sockaddr_in a = {0};
    socklen_t al = sizeof(a);
    int *srv = calloc((size_t)n, sizeof(int)), *cli = calloc((size_t)n, sizeof(int));
    static char drain[65536];
    double wall = 0, cpu = 0;

    if (ls < 0 || !srv || !cli)
        goto fail;
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(ls, 4096) < 0 ||
        getsockname(ls, (struct sockaddr *)&a, &al) < 0)
        goto fail;
    for (int i = 0; i < n; i++) {
        cli[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (cli[i] < 0 || connect(cli[i], (struct sockaddr *)&a, sizeof(a)) < 0 || (srv[i] = accept(ls, NULL, NULL)) < 0)
            goto fail;
        setsockopt(srv[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    for (int r = 0; r < rounds; r++) {
        pthread_t th[MAX_THREADS];
        sender s[MAX_THREADS];
        double w0 = clock_s(CLOCK_MONOTONIC), c0 = clock_s(CLOCK_PROCESS_CPUTIME_ID);

        for (int t = 0; t < nthreads; t++) {
            s[t] = (sender){srv, n, nthreads, t, 0};
            if (t > 0 && pthread_create(&th[t], NULL, send_some, &s[t]) != 0)
                goto fail;
        }
        send_some(&s[0]);
        for (int t = 1; t < nthreads; t++)
            pthread_join(th[t], NULL);
        wall += clock_s(CLOCK_MONOTONIC) - w0;
        cpu += clock_s(CLOCK_PROCESS_CPUTIME_ID) - c0;
        for (int t = 0; t < nthreads; t++)
            if (s[t].failed) {
                fprintf(stderr, "sendcost: a send did not take the whole frame\n");
                goto fail;
            }
        for (int i = 0; i < n; i++)
            while (recv(cli[i], drain, sizeof(drain), MSG_DONTWAIT) > 0) {
            }
    }
    printf("sendcost: %d connections, %d rounds, %d thread(s): %.2f us wall, %.2f us CPU per send\n", n, rounds,
           nthreads, wall * 1e6 / n / rounds, cpu * 1e6 / n / rounds);
    rc = 0;
fail:
    if (rc)
        perror("sendcost");
    for (int i = 0; srv && cli && i < n; i++) {
        if (srv[i] > 0)
            close(srv[i]);
        if (cli[i] > 0)
            close(cli[i]);
    }
    free(srv);
    free(cli);
    if (ls >= 0)
        close(ls);
    return rc;
}
