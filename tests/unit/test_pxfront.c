/* Unit tests of the proxy front's output buffer (pxfront.c) for a streamed
 * answer: a client that reads steadily but slower than the upstream writes
 * never lets the buffer drain whole, and what the buffer holds must stay
 * under its bound anyway (the bug fixed in 9116da6: only a whole drain
 * reset it, so it grew by everything the client had taken until it passed
 * PX_OUT_MAX + PX_SMALL_MAX + 2 * PX_HDR_MAX and the stream was cut).
 *
 * The client is the other end of a socketpair, read in the same thread
 * between writes, so every partial send happens at the same place on every
 * run: no timing, no network. The Makefile links unit tests against
 * libshared only, so the module's source (and pxhdr's, which it calls) is
 * compiled into this binary directly; what it calls of proxy.c and
 * pxdirect.c is stubbed and must not be reached. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../api-gateway/pxhdr.c"
#include "../../api-gateway/pxfront.c"

/* ---- what the front calls of proxy.c and pxdirect.c: not reached here */
upstream *px_find(proxy *px, const char *name, size_t n)
{
    (void)px, (void)name, (void)n;
    fail_msg("px_find reached");
    return NULL;
}
pxreq *px_req_new(proxy *px, upstream *u, pxloop *l)
{
    (void)px, (void)u, (void)l;
    fail_msg("px_req_new reached");
    return NULL;
}
void px_unref(pxreq *r)
{
    (void)r;
    fail_msg("px_unref reached");
}
metrics_counter *px_up_counter(proxy *px, upstream *u, int status)
{
    (void)px, (void)u, (void)status;
    fail_msg("px_up_counter reached");
    return NULL;
}
void px_up_breaker_gauge(proxy *px, upstream *u)
{
    (void)px, (void)u;
    fail_msg("px_up_breaker_gauge reached");
}
void px_client_timed_out(proxy *px, const upstream *u)
{
    (void)px, (void)u;
    fail_msg("px_client_timed_out reached");
}
void px_finish(pxloop *l, pxreq *r, CURLcode rc, const char *why)
{
    (void)l, (void)r, (void)rc, (void)why;
    fail_msg("px_finish reached");
}
int px_direct_build(pxreq *r, const char *method, const char *rest, pxhdr_each each, const void *src,
                    const pxhdr_req_info *info)
{
    (void)r, (void)method, (void)rest, (void)each, (void)src, (void)info;
    fail_msg("px_direct_build reached");
    return -1;
}
void px_direct_start(pxloop *l, pxreq *r)
{
    (void)l, (void)r;
    fail_msg("px_direct_start reached");
}
void px_direct_flush(pxloop *l, pxreq *r)
{
    (void)l, (void)r;
    fail_msg("px_direct_flush reached");
}

#define PIECE 16384
#define NPIECES 256             /* 4 MiB: several fill-and-drain rounds */
#define TAKE (PIECE * 3 / 4)    /* what the client reads per piece written */
#define GOT_MAX (NPIECES * (PIECE + 16) + 4096)

static char got[GOT_MAX];
static size_t ngot;

/* The client reads up to `want` bytes of what is waiting (all: SIZE_MAX). */
static void client_read(int fd, size_t want)
{
    while (want) {
        size_t n = want < GOT_MAX - ngot ? want : GOT_MAX - ngot;
        ssize_t k = recv(fd, got + ngot, n, 0);

        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        assert_true(k > 0);
        ngot += (size_t)k;
        want -= want == SIZE_MAX ? 0 : (size_t)k;
    }
}

static void piece_fill(char *p, int i)
{
    memset(p, 'a' + i % 26, PIECE);
    memcpy(p, &i, sizeof(i));
}

/* The bytes the client got: a head, then NPIECES chunks of the pattern
 * and the chunked stream's end. */
static void check_stream(void)
{
    const char *p = memmem(got, ngot, "\r\n\r\n", 4), *end = got + ngot;
    char want[PIECE];

    assert_non_null(p);
    assert_true(ngot > 12 && !memcmp(got, "HTTP/1.1 200", 12));
    p += 4;
    for (int i = 0; i < NPIECES; i++) {
        char *e;
        unsigned long n = strtoul(p, &e, 16);

        assert_int_equal(n, PIECE);
        assert_true(end - e >= PIECE + 4 && !memcmp(e, "\r\n", 2));
        piece_fill(want, i);
        assert_memory_equal(e + 2, want, PIECE);
        assert_memory_equal(e + 2 + PIECE, "\r\n", 2);
        p = e + 2 + PIECE + 2;
    }
    assert_int_equal(end - p, 5);
    assert_memory_equal(p, "0\r\n\r\n", 5);
}

static void test_slow_reader_never_grows_the_buffer(void **state)
{
    static proxy px;
    static pxloop l;
    static pxreq r;
    pxfront *f = calloc(1, sizeof(*f));
    int sv[2], snd = 65536, paused = 0;
    char piece[PIECE];

    (void)state;
    assert_non_null(f);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    /* A small send buffer: the client's reads, not the kernel, decide how
     * much of `out` each send takes. */
    assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &snd, sizeof(snd)), 0);
    f->fd = sv[0];
    buf_init(&f->out, PX_OUT_MAX + PX_SMALL_MAX + 2 * PX_HDR_MAX); /* as pxfront_new */
    l.px = &px;
    r.px = &px;
    r.status = 200;
    r.declared_len = -1; /* chunked */
    r.fi.keep = 1;
    r.front = f;
    pxfront_stream_start(&l, &r, 0, NULL, 0);
    assert_true(f->chunked);
    for (int i = 0; i < NPIECES;) {
        int rc;

        piece_fill(piece, i);
        rc = pxfront_stream_write(&r, piece, PIECE);
        assert_int_not_equal(rc, -1);
        /* What is held: the unsent rest (at most PX_OUT_MAX when a write
         * is taken) plus one piece and its framing, whatever the client
         * took before. */
        assert_true(f->out.len <= PX_OUT_MAX + PIECE + 32);
        if (rc == 0) {
            i++;
            client_read(sv[1], TAKE);
            continue;
        }
        /* Paused, as the loop pauses the upstream: the client drains all
         * of it (the loop's EPOLLOUT turns) before the upstream resumes. */
        paused++;
        while (f->out_off < f->out.len) {
            client_read(sv[1], SIZE_MAX);
            assert_int_equal(pxfront_send(f), 0);
        }
        assert_true(paused < NPIECES);
    }
    assert_true(paused > 0); /* the client was slow enough to fill it */
    /* The stream's end, and the rest read. */
    buf_append(&f->out, "0\r\n\r\n", 5);
    while (f->out_off < f->out.len) {
        client_read(sv[1], SIZE_MAX);
        assert_int_equal(pxfront_send(f), 0);
    }
    client_read(sv[1], SIZE_MAX);
    assert_false(f->dead);
    check_stream();
    buf_free(&f->out);
    free(f);
    close(sv[0]);
    close(sv[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slow_reader_never_grows_the_buffer),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
