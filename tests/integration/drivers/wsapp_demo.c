/* wsapp_demo: a small server on libshared/wsapp that test_wsapp.py drives.
 *
 *   wsapp_demo PORT [REUSE_PORT]   prints "port N" once listening
 *
 * HTTP: GET /hello, POST /echo (JSON), GET /defer (answered from another
 * thread), GET /items/... (prefix), GET /metrics, GET /stream?n=N (N
 * numbered 100-byte lines streamed by a thread through 64 KiB; &cut=K ends
 * the body as failed after K lines, &refuse=1 answers 404 before the body),
 * GET /stream-stats (what the producers saw). WSAPP_DEMO_HTTP_TIMEOUT_S sets
 * http_timeout_s.
 * WebSocket /echo: accept needs ?key=ok (401 otherwise, 503 for key=full),
 * echoes an offered "chat" or "access_token.*" subprotocol; echoes text;
 * "flood N" queues N 1 KiB frames; "ping" sends a WebSocket ping and
 * answers "pong-received" on the pong; "tick" answers "tock" from a 50 ms
 * timer; an oversize message answers "too_big N". */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "svc.h"
#include "wsapp.h"

typedef struct {
    wsapp_conn *c;
    wsapp_timer *tick;
    int closed;
} demo_user;

static wsapp *app;

static void hello(wsapp_req *req, void *ud)
{
    (void)ud;
    wsapp_req_add_header(req, "X-Demo", "1");
    wsapp_respond(req, 200, "application/json", "{\"hello\":\"world\"}", 17);
}

static void echo(wsapp_req *req, void *ud)
{
    cJSON *j;

    (void)ud;
    if (wsapp_req_json(req, &j) < 0)
        return;
    wsapp_respond_json(req, 200, j);
}

static void items(wsapp_req *req, void *ud)
{
    cJSON *o = cJSON_CreateObject();
    const char *q = wsapp_req_query(req, "q");

    (void)ud;
    cJSON_AddStringToObject(o, "path", wsapp_req_path(req));
    cJSON_AddStringToObject(o, "q", q ? q : "");
    cJSON_AddStringToObject(o, "ua", wsapp_req_header(req, "User-Agent") ? wsapp_req_header(req, "User-Agent") : "");
    wsapp_respond_json(req, 200, o);
}

static void defer_answer(wsapp *a, void *ud)
{
    wsapp_req **slot = ud;

    (void)a;
    if (*slot)
        wsapp_respond(*slot, 200, "application/json", "{\"deferred\":true}", 17);
    free(slot);
}

static void defer_gone(wsapp_req *req, void *ud)
{
    wsapp_req **slot = ud;

    (void)req;
    *slot = NULL;
}

static void *defer_thread(void *arg)
{
    usleep(50000);
    wsapp_post(app, defer_answer, arg);
    return NULL;
}

static void defer_route(wsapp_req *req, void *ud)
{
    wsapp_req **slot = malloc(sizeof(*slot));
    pthread_t t;

    (void)ud;
    *slot = req;
    wsapp_req_defer(req, defer_gone, slot);
    pthread_create(&t, NULL, defer_thread, slot);
    pthread_detach(t);
}

/* What the stream producers saw, for the tests. */
static atomic_long stream_bytes, stream_failed, stream_finished, stream_gone;

typedef struct {
    wsapp_stream *s;
    wsapp_req *req; /* loop only, for the refusal */
    long n, cut;
    int refuse;
    atomic_int refs; /* the thread's and the request's (on_gone comes once) */
} demo_stream;

static void stream_unref(demo_stream *d)
{
    if (atomic_fetch_sub(&d->refs, 1) == 1)
        free(d);
}

static void stream_refuse(wsapp *a, void *ud)
{
    demo_stream *d = ud;

    (void)a;
    if (d->req)
        wsapp_respond_error(d->req, 404, "not_found", "refused before the body", NULL);
}

static void stream_gone_cb(wsapp_req *req, void *ud)
{
    demo_stream *d = ud;

    (void)req;
    d->req = NULL;
    atomic_fetch_add(&stream_gone, 1);
    stream_unref(d);
}

static void *stream_thread(void *arg)
{
    demo_stream *d = arg;
    char line[128];
    int ok = 1;

    if (d->refuse) {
        wsapp_post(app, stream_refuse, d);
        usleep(100000);
    }
    if (wsapp_stream_begin(d->s, 200, "text/plain") < 0)
        ok = 0;
    for (long i = 0; ok && i < d->n; i++) {
        if (i == d->cut) {
            ok = -1;
            break;
        }
        snprintf(line, sizeof(line), "line %09ld %84s\n", i % 1000000000L, "");
        if (wsapp_stream_write(d->s, line, 100) < 0)
            ok = 0;
        else
            atomic_fetch_add(&stream_bytes, 100);
    }
    if (!ok)
        atomic_fetch_add(&stream_failed, 1);
    atomic_fetch_add(&stream_finished, 1);
    wsapp_stream_end(d->s, ok == 1);
    stream_unref(d);
    return NULL;
}

static void stream_route(wsapp_req *req, void *ud)
{
    demo_stream *d = calloc(1, sizeof(*d));
    const char *n = wsapp_req_query(req, "n"), *cut = wsapp_req_query(req, "cut");
    pthread_t t;

    (void)ud;
    if (!d || !(d->s = wsapp_req_stream(req, 64 * 1024))) {
        free(d);
        wsapp_respond_error(req, 503, "unavailable", "out of memory", NULL);
        return;
    }
    atomic_init(&d->refs, 2);
    d->req = req;
    d->n = n ? strtol(n, NULL, 10) : 10;
    d->cut = cut ? strtol(cut, NULL, 10) : -1;
    d->refuse = wsapp_req_query(req, "refuse") != NULL;
    wsapp_req_defer(req, stream_gone_cb, d);
    pthread_create(&t, NULL, stream_thread, d);
    pthread_detach(t);
}

static void stream_stats(wsapp_req *req, void *ud)
{
    cJSON *o = cJSON_CreateObject();

    (void)ud;
    cJSON_AddNumberToObject(o, "bytes", (double)atomic_load(&stream_bytes));
    cJSON_AddNumberToObject(o, "failed", (double)atomic_load(&stream_failed));
    cJSON_AddNumberToObject(o, "finished", (double)atomic_load(&stream_finished));
    cJSON_AddNumberToObject(o, "gone", (double)atomic_load(&stream_gone));
    wsapp_respond_json(req, 200, o);
}

static int ws_accept(wsapp_req *req, void *user, void *ud)
{
    const char *key = wsapp_req_query(req, "key"), *protos = wsapp_req_subprotocols(req);

    (void)user;
    (void)ud;
    if (key && strcmp(key, "full") == 0) {
        wsapp_respond(req, 503, "application/json", "{\"error\":\"Server at capacity\"}", 30);
        return -1;
    }
    if (!key || strcmp(key, "ok") != 0) {
        wsapp_respond_error(req, 401, "unauthorized", "key missing or wrong", NULL);
        return -1;
    }
    if (protos) {
        char first[4096];
        size_t n = strcspn(protos, ", ");

        if (n < sizeof(first)) {
            memcpy(first, protos, n);
            first[n] = '\0';
            if (strcmp(first, "chat") == 0 || strncmp(first, "access_token.", 13) == 0)
                wsapp_req_set_subprotocol(req, first);
        }
    }
    return 0;
}

static void tick_fire(wsapp_timer *t, void *ud)
{
    demo_user *u = ud;

    (void)t;
    wsapp_conn_send_text(u->c, "tock", 4);
}

static void ws_open(wsapp_conn *c, void *user, void *ud)
{
    demo_user *u = user;

    (void)ud;
    u->c = c;
    u->tick = wsapp_timer_new(app, tick_fire, u);
    wsapp_conn_send_text(c, "hello", 5);
}

static void ws_message(wsapp_conn *c, void *user, const char *data, size_t len, int binary, void *ud)
{
    demo_user *u = user;

    (void)ud;
    if (!binary && len > 6 && strncmp(data, "flood ", 6) == 0) {
        long n = strtol(data + 6, NULL, 10);
        wsapp_msg *m = wsapp_msg_new_text(1024);

        memset(wsapp_msg_data(m), 'x', 1024);
        wsapp_msg_set_len(m, 1024);
        for (long i = 0; i < n; i++)
            if (wsapp_conn_send(c, m) < 0)
                break;
        wsapp_msg_unref(m);
        return;
    }
    if (!binary && len == 4 && memcmp(data, "ping", 4) == 0) {
        wsapp_conn_ping(c);
        return;
    }
    if (!binary && len == 4 && memcmp(data, "tick", 4) == 0) {
        wsapp_timer_set(u->tick, 50);
        return;
    }
    if (!binary && len == 5 && memcmp(data, "close", 5) == 0) {
        wsapp_conn_close(c, 4001, "asked to");
        return;
    }
    if (binary) {
        wsapp_msg *m = wsapp_msg_new(data, len, 1);

        wsapp_conn_send(c, m);
        wsapp_msg_unref(m);
        return;
    }
    wsapp_conn_send_text(c, data, len);
}

static void ws_too_big(wsapp_conn *c, void *user, size_t size, void *ud)
{
    char out[64];
    int n = snprintf(out, sizeof(out), "too_big %zu", size);

    (void)user;
    (void)ud;
    wsapp_conn_send_text(c, out, (size_t)n);
}

static void ws_pong(wsapp_conn *c, void *user, void *ud)
{
    (void)user;
    (void)ud;
    wsapp_conn_send_text(c, "pong-received", 13);
}

static void ws_close(wsapp_conn *c, void *user, void *ud)
{
    demo_user *u = user;

    (void)ud;
    (void)c;
    wsapp_timer_free(u->tick);
    u->tick = NULL;
}

int main(int argc, char **argv)
{
    wsapp_opts o = {0};
    wsapp_ws_handlers h = {0};
    char err[256];
    const char *timeout;

    if (argc < 2 || svc_init() < 0)
        return 2;
    log_init("wsapp-demo", "info", "json");
    o.service = "wsapp-demo";
    o.host = "127.0.0.1";
    o.port = (int)strtol(argv[1], NULL, 10);
    o.reuse_port = argc > 2 && strcmp(argv[2], "1") == 0;
    o.max_body = 4096;
    o.send_queue_bytes = 256 * 1024;
    timeout = getenv("WSAPP_DEMO_HTTP_TIMEOUT_S");
    o.http_timeout_s = timeout ? atoi(timeout) : 0;
    o.access_log = 1;
    app = wsapp_new(&o, err, sizeof(err));
    if (!app)
        return 1;
    h.user_size = sizeof(demo_user);
    h.accept = ws_accept;
    h.open = ws_open;
    h.message = ws_message;
    h.too_big = ws_too_big;
    h.pong = ws_pong;
    h.close = ws_close;
    if (wsapp_route(app, "GET", "/hello", hello, NULL) < 0 || wsapp_route(app, "POST", "/echo", echo, NULL) < 0 ||
        wsapp_route(app, "GET", "/defer", defer_route, NULL) < 0 ||
        wsapp_route(app, "GET", "/items/*", items, NULL) < 0 ||
        wsapp_route(app, "GET", "/stream", stream_route, NULL) < 0 ||
        wsapp_route(app, "GET", "/stream-stats", stream_stats, NULL) < 0 || wsapp_route_metrics(app) < 0 ||
        wsapp_ws_route(app, "/echo", &h, NULL) < 0 || wsapp_start(app, err, sizeof(err)) < 0) {
        fprintf(stderr, "wsapp_demo: %s\n", err);
        return 1;
    }
    printf("port %d\n", wsapp_port(app));
    fflush(stdout);
    while (!svc_stopping())
        svc_wait(1000);
    wsapp_stop(app, 2000);
    wsapp_free(app);
    return 0;
}
