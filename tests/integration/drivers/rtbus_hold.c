/* Test driver for realtime's Redis hand-off bound (realtime/rtbus.c).
 *
 *   rtbus_hold CHANNEL MAX_HELD
 *
 * subscribes to CHANNEL through rtbus on a wsapp loop of its own, with
 * REDIS_URL (or REDIS_*) from the environment, and prints "ready" once the
 * subscription is up. Then it holds the loop (a posted function that waits),
 * so that every message published now has to wait for the loop, the state
 * in which the bound matters. Commands on stdin, one answer line each:
 *
 *   count N   waits until the drop counter has stopped moving, releases
 *             the loop, waits until
 *             delivered + dropped == N, and prints
 *             {"delivered":D,"bytes":B,"dropped":X}
 *   one       waits for one more delivery and prints {"delivered":D}
 *
 * A timeout prints {"error":"..."} and exits 1. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cfg.h"
#include "log.h"
#include "metrics.h"
#include "rconn.h"
#include "rtbus.h"
#include "svc.h"
#include "wsapp.h"

static atomic_long delivered;
static atomic_size_t delivered_bytes;

static pthread_mutex_t hold_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hold_cond = PTHREAD_COND_INITIALIZER;
static int holding, released;

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void on_message(void *ud, const char *ch, size_t clen, const char *payload, size_t plen)
{
    (void)ud;
    (void)ch;
    (void)payload;
    atomic_fetch_add(&delivered_bytes, clen + plen);
    atomic_fetch_add(&delivered, 1);
}

/* Runs on the loop and keeps it until released: the loop is "behind". */
static void hold_loop(wsapp *app, void *ud)
{
    (void)app;
    (void)ud;
    pthread_mutex_lock(&hold_lock);
    holding = 1;
    pthread_cond_broadcast(&hold_cond);
    while (!released)
        pthread_cond_wait(&hold_cond, &hold_lock);
    pthread_mutex_unlock(&hold_lock);
}

static void release_loop(void)
{
    pthread_mutex_lock(&hold_lock);
    released = 1;
    pthread_cond_broadcast(&hold_cond);
    pthread_mutex_unlock(&hold_lock);
}

static int fail(const char *what)
{
    printf("{\"error\":\"%s\"}\n", what);
    fflush(stdout);
    release_loop();
    return 1;
}

/* Waits until the sub thread has read `n` messages, 10 s at most. */
static int wait_read(metrics_counter *received, long n)
{
    long long deadline = svc_now_ms() + 10000;

    while (svc_now_ms() < deadline) {
        if ((long)metrics_counter_value(received) >= n)
            return 0;
        sleep_ms(20);
    }
    return -1;
}

static int wait_delivered(metrics_counter *dropped, long n)
{
    long long deadline = svc_now_ms() + 10000;

    while (svc_now_ms() < deadline) {
        if (atomic_load(&delivered) + (long)metrics_counter_value(dropped) >= n)
            return 0;
        sleep_ms(20);
    }
    return -1;
}

/* The loop has freed what it ran: room for the next message. */
static int wait_unheld(metrics_gauge *held)
{
    long long deadline = svc_now_ms() + 10000;

    while (svc_now_ms() < deadline) {
        if (metrics_gauge_value(held) == 0)
            return 0;
        sleep_ms(20);
    }
    return -1;
}

static int run(wsapp *app, metrics *mx)
{
    metrics_counter *received = metrics_counter_get(mx, "realtime_bus_messages_total", NULL, NULL);
    metrics_counter *dropped = metrics_counter_get(mx, "realtime_bus_dropped_total", NULL, NULL);
    metrics_gauge *held = metrics_gauge_get(mx, "realtime_bus_held_bytes", NULL, NULL);
    char line[256];
    long n;

    if (wsapp_post(app, hold_loop, NULL) < 0)
        return fail("post");
    pthread_mutex_lock(&hold_lock);
    while (!holding)
        pthread_cond_wait(&hold_cond, &hold_lock);
    pthread_mutex_unlock(&hold_lock);
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin) || sscanf(line, "count %ld", &n) != 1)
        return fail("expected: count N");
    if (wait_read(received, n) < 0)
        return fail("the messages did not all arrive");
    release_loop();
    if (wait_delivered(dropped, n) < 0 || wait_unheld(held) < 0)
        return fail("messages neither delivered nor dropped");
    printf("{\"delivered\":%ld,\"bytes\":%zu,\"dropped\":%llu}\n", atomic_load(&delivered),
           atomic_load(&delivered_bytes), (unsigned long long)metrics_counter_value(dropped));
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin) || strncmp(line, "one", 3) != 0)
        return fail("expected: one");
    /* One past the first count: the message may have come before the line. */
    n++;
    if (wait_delivered(dropped, n) < 0)
        return fail("the next message did not arrive");
    printf("{\"delivered\":%ld,\"dropped\":%llu}\n", atomic_load(&delivered),
           (unsigned long long)metrics_counter_value(dropped));
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    wsapp_opts wo = {.service = "rtbus_hold", .host = "127.0.0.1"};
    char err[256];
    rconn_opts ro;
    metrics *mx;
    wsapp *app = NULL;
    rtbus *bus = NULL;
    cfg *c;
    int rc = 1;

    if (argc != 3) {
        fprintf(stderr, "usage: rtbus_hold CHANNEL MAX_HELD\n");
        return 2;
    }
    if (svc_init() < 0 || !(c = cfg_boot("rtbus_hold")))
        return 2;
    if (rconn_opts_from_cfg(c, &ro) < 0 || cfg_finish(c) < 0)
        return 2;
    cfg_free(c);
    mx = metrics_new();
    wo.metrics = mx;
    if (!mx || !(app = wsapp_new(&wo, err, sizeof(err))) || wsapp_start(app, err, sizeof(err)) < 0) {
        fprintf(stderr, "wsapp: %s\n", err);
        goto out;
    }
    bus = rtbus_new(&ro, app, strtoul(argv[2], NULL, 10), mx, on_message, NULL);
    if (!bus || rtbus_subscribe(bus, argv[1], strlen(argv[1])) < 0 || rtbus_start(bus) < 0)
        goto out;
    for (int i = 0; i < 500 && !rtbus_up(bus); i++)
        sleep_ms(20);
    if (!rtbus_up(bus)) {
        rc = fail("redis is not up");
        goto out;
    }
    rc = run(app, mx);
out:
    release_loop();
    if (app)
        wsapp_stop(app, 0);
    rtbus_free(bus);
    wsapp_free(app);
    metrics_free(mx);
    return rc;
}
