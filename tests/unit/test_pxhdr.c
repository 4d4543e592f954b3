/* Unit tests of the gateway proxy's header and path rules (pxhdr.c): what
 * reaches the upstream from a client's headers, what reaches the client
 * from an upstream's head, and the dot-segment check. The seventeenth
 * Connection header case is what fuzz_proxy_headers found (its names were
 * passed on).
 *
 * The Makefile links unit tests against libshared only, so the module's
 * source is compiled into this binary directly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../api-gateway/pxhdr.c"

typedef struct {
    const char *const *kv; /* name, value, ..., NULL */
} hsrc;

static void each(const void *src, pxhdr_visit visit, void *vud)
{
    const hsrc *h = src;

    for (int i = 0; h->kv[i]; i += 2)
        visit(vud, h->kv[i], h->kv[i + 1]);
}

typedef struct {
    char out[8][PXHDR_LINE_MAX + 16];
    char all[16384];
    int n;
} lines;

static int on_line(void *ud, const char *line)
{
    lines *l = ud;

    if (l->n < 8)
        snprintf(l->out[l->n], sizeof(l->out[0]), "%s", line);
    l->n++;
    strncat(l->all, line, sizeof(l->all) - strlen(l->all) - 2);
    strcat(l->all, "|");
    return 0;
}

static const pxhdr_req_info info = {"127.0.0.1", "rid-7", "http"};

static void test_request_filters_and_forwards(void **state)
{
    static const char *const kv[] = {"Content-Type", "application/json", "X-Custom", "kept", "X-Request-Id",
                                     "client-id", "Connection", "keep-alive, X-Drop-Me", "X-Drop-Me", "gone",
                                     "Keep-Alive", "timeout=9", "TE", "trailers", "X-Forwarded-For", "10.1.2.3",
                                     "X-Forwarded-For", "10.9.9.9", "Host", "front.example:8443", "Empty", "",
                                     "Bad Name", "x", "Content-Length", "5", NULL};
    hsrc h = {kv};
    lines l = {.n = 0};

    (void)state;
    assert_int_equal(pxhdr_request(each, &h, &info, on_line, &l), 0);
    assert_string_equal(l.all, "Content-Type: application/json|X-Custom: kept|Empty;|"
                               "X-Forwarded-For: 10.1.2.3, 10.9.9.9, 127.0.0.1|X-Forwarded-Host: front.example:8443|"
                               "X-Forwarded-Proto: http|X-Request-Id: rid-7|Expect:|Accept:|");
}

static void test_request_refuses_what_it_cannot_honour(void **state)
{
    const char *kv[2 * 18 + 3];
    static char big[PXHDR_LINE_MAX + 10];
    hsrc h = {kv};
    lines l = {.n = 0};
    int i;

    (void)state;
    for (i = 0; i < 17; i++) {
        kv[2 * i] = "Connection";
        kv[2 * i + 1] = i == 16 ? "X-Secret" : "close";
    }
    kv[2 * i] = "X-Secret";
    kv[2 * i + 1] = "for the gateway only";
    kv[2 * i + 2] = NULL;
    assert_int_equal(pxhdr_request(each, &h, &info, on_line, &l), -2);
    assert_null(strstr(l.all, "X-Secret"));

    memset(big, 'a', sizeof(big) - 1);
    kv[0] = "X-Big";
    kv[1] = big;
    kv[2] = NULL;
    l.n = 0;
    assert_int_equal(pxhdr_request(each, &h, &info, on_line, &l), -2);
    assert_int_equal(l.n, 0);
}

static pxhdr_kind line(const char *s, long long *num, size_t *keep)
{
    return pxhdr_response_line(s, strlen(s), num, keep);
}

static void test_response_lines(void **state)
{
    long long num = 0;
    size_t keep = 0;

    (void)state;
    assert_int_equal(line("HTTP/1.1 201 Created\r\n", &num, &keep), PXHDR_STATUS);
    assert_int_equal(num, 201);
    assert_int_equal(line("HTTP/1.1 banana\r\n", &num, &keep), PXHDR_STATUS);
    assert_int_equal(num, 502);
    assert_int_equal(line("\r\n", &num, &keep), PXHDR_END);
    assert_int_equal(line("Content-Length: 42\r\n", &num, &keep), PXHDR_LENGTH);
    assert_int_equal(num, 42);
    assert_int_equal(line("content-length: 4x2\r\n", &num, &keep), PXHDR_LENGTH);
    assert_int_equal(num, -1);
    assert_int_equal(line("X-Up: yes\r\n", &num, &keep), PXHDR_KEEP);
    assert_int_equal(keep, 9);
    assert_int_equal(line("Connection: x-hop\r\n", &num, &keep), PXHDR_KEEP);
    assert_int_equal(line("Keep-Alive: 5\r\n", &num, &keep), PXHDR_DROP);
    assert_int_equal(line("Date: now\r\n", &num, &keep), PXHDR_DROP);
    assert_int_equal(line(" folded: x\r\n", &num, &keep), PXHDR_DROP);
    assert_int_equal(line("X-Ctl: a\001b\r\n", &num, &keep), PXHDR_DROP);
    assert_int_equal(line("no colon\r\n", &num, &keep), PXHDR_DROP);
}

static void on_pair(void *ud, const char *name, const char *value)
{
    char *all = ud;

    strcat(all, name);
    strcat(all, "=");
    strcat(all, value);
    strcat(all, "|");
}

static void test_response_connection_lists(void **state)
{
    const char *head = "X-Up: yes\nConnection: keep-alive, X-Private\nX-Private: s\nSet-Cookie: a=b\n";
    char all[512] = "";

    (void)state;
    pxhdr_response(head, strlen(head), on_pair, all);
    assert_string_equal(all, "X-Up=yes|Set-Cookie=a=b|");
}

static void test_dot_segments(void **state)
{
    (void)state;
    assert_true(pxhdr_has_dot_segment("/../../etc/passwd"));
    assert_true(pxhdr_has_dot_segment("/%2e%2E/x"));
    assert_true(pxhdr_has_dot_segment("/a%2f..%5cb"));
    assert_true(pxhdr_has_dot_segment("/a\\.\\b"));
    assert_true(pxhdr_has_dot_segment("/a/.."));
    assert_true(pxhdr_has_dot_segment("/a/..?x"));
    assert_false(pxhdr_has_dot_segment("/a/...b/.c/b..?q=/../"));
    assert_false(pxhdr_has_dot_segment(""));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_request_filters_and_forwards),
        cmocka_unit_test(test_request_refuses_what_it_cannot_honour),
        cmocka_unit_test(test_response_lines),
        cmocka_unit_test(test_response_connection_lists),
        cmocka_unit_test(test_dot_segments),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
