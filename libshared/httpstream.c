#include "httpstream.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "svc.h"

#define HTTPSTREAM_DEFAULT_MAX (256 * 1024)
#define HTTPSTREAM_BLOCK 8192

struct httpstream {
    pthread_mutex_t mu;
    int refs;
    struct MHD_Connection *conn;
    struct MHD_Response *resp; /* until handed to the request */
    char *buf;                 /* freed whenever it empties: an idle stream holds no buffer */
    size_t off, len, cap, max;
    int ended, error, closed, suspended, want_drain;
    long long waiting_ms;      /* see httpstream_waiting_since */
    httpstream_fn on_drain, on_close;
    void *ud;
};

static void httpstream_unref(httpstream *s)
{
    int last;

    pthread_mutex_lock(&s->mu);
    last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu);
    if (!last)
        return;
    free(s->buf);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* Runs on the connection's thread. Must be called with s->mu held; wakes a
 * suspended reader. */
static void httpstream_wake_locked(httpstream *s)
{
    if (s->suspended) {
        s->suspended = 0;
        MHD_resume_connection(s->conn);
    }
}

static ssize_t httpstream_reader(void *cls, uint64_t pos, char *out, size_t max)
{
    httpstream *s = cls;
    size_t avail, n;
    int drain = 0;

    (void)pos;
    pthread_mutex_lock(&s->mu);
    avail = s->len - s->off;
    if (avail == 0) {
        if (s->ended) {
            int err = s->error;

            pthread_mutex_unlock(&s->mu);
            return err ? MHD_CONTENT_READER_END_WITH_ERROR : MHD_CONTENT_READER_END_OF_STREAM;
        }
        /* Nothing to send: suspend rather than return 0 alone, which MHD
         * would answer by calling again at once (a busy loop). */
        s->suspended = 1;
        MHD_suspend_connection(s->conn);
        drain = s->want_drain;
        s->want_drain = 0;
        pthread_mutex_unlock(&s->mu);
        if (drain && s->on_drain)
            s->on_drain(s->ud);
        return 0;
    }
    n = avail < max ? avail : max;
    memcpy(out, s->buf + s->off, n);
    s->off += n;
    if (s->off == s->len) {
        free(s->buf);
        s->buf = NULL;
        s->off = s->len = s->cap = 0;
        s->waiting_ms = 0;
    } else {
        s->waiting_ms = svc_now_ms();
    }
    if (s->want_drain && s->len - s->off <= s->max / 2) {
        s->want_drain = 0;
        drain = 1;
    }
    pthread_mutex_unlock(&s->mu);
    if (drain && s->on_drain)
        s->on_drain(s->ud);
    return (ssize_t)n;
}

/* MHD is done with the response: the body was sent, or the client left. */
static void httpstream_freed(void *cls)
{
    httpstream *s = cls;

    pthread_mutex_lock(&s->mu);
    s->closed = 1;
    s->suspended = 0;
    pthread_mutex_unlock(&s->mu);
    if (s->on_close)
        s->on_close(s->ud);
    httpstream_unref(s);
}

httpstream *httpstream_new(httpd_req *req, int status, const char *content_type, long long length,
                           size_t max_buffered, size_t block)
{
    httpstream *s = calloc(1, sizeof(*s));

    if (!s)
        return NULL;
    pthread_mutex_init(&s->mu, NULL);
    s->refs = 2;
    s->conn = httpd_req_connection(req);
    s->max = max_buffered ? max_buffered : HTTPSTREAM_DEFAULT_MAX;
    s->resp = MHD_create_response_from_callback(length < 0 ? MHD_SIZE_UNKNOWN : (uint64_t)length,
                                                block ? block : HTTPSTREAM_BLOCK, httpstream_reader, s,
                                                httpstream_freed);
    if (!s->resp) {
        pthread_mutex_destroy(&s->mu);
        free(s);
        return NULL;
    }
    if (content_type)
        MHD_add_response_header(s->resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    httpd_req_set_response(req, status, s->resp);
    return s;
}

int httpstream_add_header(httpstream *s, const char *name, const char *value)
{
    return MHD_add_response_header(s->resp, name, value) == MHD_YES ? 0 : -1;
}

void httpstream_set_callbacks(httpstream *s, httpstream_fn on_drain, httpstream_fn on_close, void *ud)
{
    s->on_drain = on_drain;
    s->on_close = on_close;
    s->ud = ud;
}

/* Appends with s->mu held; 0, or -1 on OOM. */
static int httpstream_append_locked(httpstream *s, const void *p, size_t n)
{
    size_t have = s->len - s->off;

    if (s->off && s->cap - s->len < n) {
        memmove(s->buf, s->buf + s->off, have);
        s->off = 0;
        s->len = have;
    }
    if (!have)
        s->waiting_ms = svc_now_ms();
    if (s->cap - s->len < n) {
        size_t cap = s->cap ? s->cap : 1024;
        char *nb;

        while (cap - s->len < n)
            cap *= 2;
        nb = realloc(s->buf, cap);
        if (!nb)
            return -1;
        s->buf = nb;
        s->cap = cap;
    }
    memcpy(s->buf + s->len, p, n);
    s->len += n;
    httpstream_wake_locked(s);
    return 0;
}

int httpstream_write(httpstream *s, const void *p, size_t n)
{
    int rc;

    pthread_mutex_lock(&s->mu);
    if (s->closed || s->ended) {
        rc = -1;
    } else if (s->len - s->off + n > s->max && s->len > s->off) {
        s->want_drain = 1;
        rc = 1;
    } else {
        rc = httpstream_append_locked(s, p, n);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int httpstream_write_max(httpstream *s, const void *p, size_t n, size_t limit)
{
    int rc;

    pthread_mutex_lock(&s->mu);
    if (s->closed || s->ended)
        rc = -1;
    else if (s->len - s->off + n > limit)
        rc = -2;
    else
        rc = httpstream_append_locked(s, p, n);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void httpstream_end(httpstream *s, int error)
{
    pthread_mutex_lock(&s->mu);
    if (!s->ended && !s->closed) {
        s->ended = 1;
        s->error = error;
        if (error) {
            /* What is still buffered would only delay the cut. */
            free(s->buf);
            s->buf = NULL;
            s->off = s->len = s->cap = 0;
        }
        httpstream_wake_locked(s);
    }
    pthread_mutex_unlock(&s->mu);
}

void httpstream_cut(httpstream *s)
{
    pthread_mutex_lock(&s->mu);
    if (!s->closed) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(s->conn, MHD_CONNECTION_INFO_CONNECTION_FD);

        /* libmicrohttpd waits for the socket to take what it holds before it
         * asks for more (and would see the end): shut the socket, so that it
         * sees the hang-up now. Not closed yet (`closed` is set when
         * libmicrohttpd drops the response, before it closes the socket),
         * so the descriptor is still this connection's. */
        if (ci)
            shutdown(ci->connect_fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&s->mu);
    httpstream_end(s, 1);
}

long long httpstream_waiting_since(httpstream *s)
{
    long long t;

    pthread_mutex_lock(&s->mu);
    t = s->len > s->off ? s->waiting_ms : 0;
    pthread_mutex_unlock(&s->mu);
    return t;
}

size_t httpstream_buffered(httpstream *s)
{
    size_t n;

    pthread_mutex_lock(&s->mu);
    n = s->len - s->off;
    pthread_mutex_unlock(&s->mu);
    return n;
}

void httpstream_release(httpstream *s)
{
    if (s)
        httpstream_unref(s);
}
