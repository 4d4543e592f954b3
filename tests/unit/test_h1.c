/* Unit tests of the HTTP/1.1 response parser (libshared/h1parse.c, used by
 * action-workers/h1.c and the gateway's direct proxy path):
 * split reads, Content-Length, chunked bodies, bodies read to close, bad
 * status lines, oversized headers, and the bounded body buffer.
 *
 * The Makefile links unit tests against libshared only, so the modules'
 * sources are compiled into this binary directly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../action-workers/h1.c"

typedef struct {
    int n;
    char last[256];
    char ctype[128];
} hdrs;

static void on_hdr(void *ud, const char *line, size_t n)
{
    hdrs *h = ud;

    h->n++;
    snprintf(h->last, sizeof(h->last), "%.*s", (int)n, line);
    if (n > 13 && !strncasecmp(line, "content-type:", 13))
        snprintf(h->ctype, sizeof(h->ctype), "%.*s", (int)(n - 14 - 2), line + 14);
}

/* Feeds `s` in pieces of `step` bytes; returns the last result and the
 * bytes of the final piece that were used. */
static int feed(h1_parser *p, const char *s, size_t step, size_t *used_total)
{
    size_t len = strlen(s), off = 0, used = 0;
    int rc = H1_PARSE_MORE;

    *used_total = 0;
    while (off < len) {
        size_t k = len - off < step ? len - off : step;

        rc = h1_parse(p, s + off, k, &used);
        *used_total += used;
        if (rc != H1_PARSE_MORE)
            break;
        off += k;
    }
    return rc;
}

static const char *CL_RESP = "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 11\r\n"
                             "X-Other: 1\r\n\r\n{\"ok\":true}";

static void content_length_any_split(void **state)
{
    (void)state;
    for (size_t step = 1; step <= strlen(CL_RESP); step++) {
        h1_parser *p = malloc(sizeof(*p));
        buf b;
        hdrs h;
        size_t used;

        memset(&h, 0, sizeof(h));
        buf_init(&b, 1024);
        h1_parser_init(p, 0, &b, on_hdr, &h);
        assert_int_equal(feed(p, CL_RESP, step, &used), H1_PARSE_DONE);
        assert_int_equal(used, strlen(CL_RESP));
        assert_int_equal(p->status, 201);
        assert_string_equal(buf_str(&b), "{\"ok\":true}");
        assert_int_equal(h.n, 3);
        assert_string_equal(h.ctype, "application/json");
        assert_true(h1_parse_reusable(p));
        buf_free(&b);
        free(p);
    }
}

static void leftover_bytes_not_used(void **state)
{
    h1_parser *p = malloc(sizeof(*p));
    const char *two = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n";
    size_t used = 0;
    buf b;

    (void)state;
    buf_init(&b, 64);
    h1_parser_init(p, 0, &b, NULL, NULL);
    assert_int_equal(h1_parse(p, two, strlen(two), &used), H1_PARSE_DONE);
    assert_int_equal(used, strlen(two) - strlen("HTTP/1.1 200 OK\r\n"));
    assert_string_equal(buf_str(&b), "ok");
    buf_free(&b);
    free(p);
}

static void chunked_any_split(void **state)
{
    const char *r = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "5;ext=1\r\nhello\r\n7\r\n, world\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";

    (void)state;
    for (size_t step = 1; step <= strlen(r); step++) {
        h1_parser *p = malloc(sizeof(*p));
        buf b;
        size_t used;

        buf_init(&b, 1024);
        h1_parser_init(p, 0, &b, NULL, NULL);
        assert_int_equal(feed(p, r, step, &used), H1_PARSE_DONE);
        assert_int_equal(used, strlen(r));
        assert_string_equal(buf_str(&b), "hello, world0123456789");
        assert_true(h1_parse_reusable(p));
        buf_free(&b);
        free(p);
    }
}

/* One whole response that must be refused; `msg` (NULL: any) is the
 * reason expected. */
static void expect_error(const char *r, const char *msg)
{
    h1_parser *p = malloc(sizeof(*p));
    size_t used;

    h1_parser_init(p, 0, NULL, NULL, NULL);
    assert_int_equal(h1_parse(p, r, strlen(r), &used), H1_PARSE_ERROR);
    if (msg)
        assert_string_equal(p->err, msg);
    free(p);
}

static void chunked_bad_size(void **state)
{
    (void)state;
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size");
}

static void chunked_bad_terminator(void **state)
{
    (void)state;
    expect_error("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n", NULL);
}

static void bad_status_lines(void **state)
{
    const char *bad[] = {"HTTP/2 200 OK\r\n\r\n", "HTTP/1.1 20 OK\r\n\r\n", "HTTP/1.1 2000 OK\r\n\r\n",
                         "SSH-2.0-OpenSSH\r\n\r\n", "HTTP/1.1 abc\r\n\r\n", "HTTP/1.1 600 X\r\n\r\n"};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_error(bad[i], "bad status line");
}

static void malformed_header_and_length(void **state)
{
    const char *bad[] = {"HTTP/1.1 200 OK\r\nNoColonHere\r\n\r\n", "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
                         "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"};

    (void)state;
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_error(bad[i], NULL);
}

static void oversized_headers(void **state)
{
    h1_parser *p = malloc(sizeof(*p));
    char *big = malloc(H1_LINE_MAX + 64);
    size_t used;
    int rc = H1_PARSE_MORE;

    (void)state;
    /* One header line longer than the line limit. */
    h1_parser_init(p, 0, NULL, NULL, NULL);
    memcpy(big, "X-Big: ", 7);
    memset(big + 7, 'a', H1_LINE_MAX + 10);
    assert_int_equal(h1_parse(p, "HTTP/1.1 200 OK\r\n", 17, &used), H1_PARSE_MORE);
    assert_int_equal(h1_parse(p, big, H1_LINE_MAX + 17, &used), H1_PARSE_ERROR);
    assert_string_equal(p->err, "header line too long");

    /* Many short lines past the total limit. */
    h1_parser_init(p, 0, NULL, NULL, NULL);
    assert_int_equal(h1_parse(p, "HTTP/1.1 200 OK\r\n", 17, &used), H1_PARSE_MORE);
    for (int i = 0; i < 10000 && rc == H1_PARSE_MORE; i++)
        rc = h1_parse(p, "X-Some-Header: some value here\r\n", 32, &used);
    assert_int_equal(rc, H1_PARSE_ERROR);
    assert_string_equal(p->err, "headers too large");
    free(big);
    free(p);
}

static void body_to_close_and_eof(void **state)
{
    h1_parser *p = malloc(sizeof(*p));
    const char *r = "HTTP/1.0 500 Oops\r\nContent-Type: text/plain\r\n\r\nsomething broke";
    size_t used;
    buf b;

    (void)state;
    buf_init(&b, 64);
    h1_parser_init(p, 0, &b, NULL, NULL);
    assert_int_equal(h1_parse(p, r, strlen(r), &used), H1_PARSE_MORE);
    assert_true(h1_parse_in_body(p));
    assert_int_equal(h1_parse_eof(p), H1_PARSE_DONE);
    assert_int_equal(p->status, 500);
    assert_string_equal(buf_str(&b), "something broke");
    assert_false(h1_parse_reusable(p));
    buf_free(&b);

    /* EOF inside a Content-Length body is an error. */
    h1_parser_init(p, 0, NULL, NULL, NULL);
    r = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
    assert_int_equal(h1_parse(p, r, strlen(r), &used), H1_PARSE_MORE);
    assert_int_equal(h1_parse_eof(p), H1_PARSE_ERROR);
    free(p);
}

/* Issue 9.3: tokens are matched whole: "closed" is not "close". */
static void connection_tokens_whole(void **state)
{
    static const struct {
        const char *hdr;
        int close, keep_alive, chunked;
    } v[] = {
        {"Connection: closed", 0, 0, 0},
        {"Connection: close", 1, 0, 0},
        {"Connection: Keep-Alive, CLOSE", 1, 1, 0},
        {"Connection: upgrade,close ", 1, 0, 0},
        {"Connection: keep-alive-ish, noclose", 0, 0, 0},
        {"Connection: \tkeep-alive\t", 0, 1, 0},
        {"Transfer-Encoding: chunkedx", 0, 0, 0},
        {"Transfer-Encoding: gzip, chunked", 0, 0, 1},
        {"Transfer-Encoding: chunked;q=1", 0, 0, 1},
    };
    h1_parser *p = malloc(sizeof(*p));
    char r[256];
    size_t used;

    (void)state;
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        snprintf(r, sizeof(r), "HTTP/1.1 200 OK\r\n%s\r\n", v[i].hdr);
        h1_parser_init(p, 0, NULL, NULL, NULL);
        assert_int_equal(h1_parse(p, r, strlen(r), &used), H1_PARSE_MORE);
        assert_int_equal(p->conn_close, v[i].close);
        assert_int_equal(p->keep_alive, v[i].keep_alive);
        assert_int_equal(p->chunked, v[i].chunked);
    }
    free(p);
}

static void no_body_statuses_and_head(void **state)
{
    h1_parser *p = malloc(sizeof(*p));
    const char *r204 = "HTTP/1.1 204 No Content\r\n\r\n";
    const char *head = "HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n";
    const char *cont = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    size_t used;

    (void)state;
    h1_parser_init(p, 0, NULL, NULL, NULL);
    assert_int_equal(h1_parse(p, r204, strlen(r204), &used), H1_PARSE_DONE);
    assert_int_equal(p->status, 204);
    h1_parser_init(p, 1, NULL, NULL, NULL);
    assert_int_equal(h1_parse(p, head, strlen(head), &used), H1_PARSE_DONE);
    assert_true(h1_parse_reusable(p));
    h1_parser_init(p, 0, NULL, NULL, NULL);
    assert_int_equal(h1_parse(p, cont, strlen(cont), &used), H1_PARSE_DONE);
    assert_int_equal(p->status, 200);
    free(p);
}

static void connection_close_and_bounded_body(void **state)
{
    h1_parser *p = malloc(sizeof(*p));
    char r[600];
    size_t used;
    buf b;

    (void)state;
    snprintf(r, sizeof(r), "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 300\r\n\r\n%300s", "x");
    buf_init(&b, 256);
    h1_parser_init(p, 0, &b, NULL, NULL);
    assert_int_equal(h1_parse(p, r, strlen(r), &used), H1_PARSE_DONE);
    assert_int_equal(b.len, 256);
    assert_int_equal(b.truncated, 44);
    assert_false(h1_parse_reusable(p));
    buf_free(&b);
    free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(content_length_any_split),
        cmocka_unit_test(leftover_bytes_not_used),
        cmocka_unit_test(chunked_any_split),
        cmocka_unit_test(chunked_bad_size),
        cmocka_unit_test(chunked_bad_terminator),
        cmocka_unit_test(bad_status_lines),
        cmocka_unit_test(malformed_header_and_length),
        cmocka_unit_test(oversized_headers),
        cmocka_unit_test(body_to_close_and_eof),
        cmocka_unit_test(no_body_statuses_and_head),
        cmocka_unit_test(connection_close_and_bounded_body),
        cmocka_unit_test(connection_tokens_whole),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
