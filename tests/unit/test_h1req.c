/* Unit tests of the strict HTTP/1.1 request-head parser
 * (libshared/h1parse.c, h1_request_parse): every split point of good and
 * hostile heads (the result at each prefix is MORE until the verdict, and
 * the verdict never changes as bytes are added), the buffer moving between
 * calls, what is refused with which status (bare LF, CR alone, obs-fold,
 * white space before the colon, conflicting or malformed framing, Host,
 * versions, control bytes, oversized heads), keep-alive and the fields. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "h1parse.h"

#define MAXH 16384

/* Parses `s` (len bytes) in one call. */
static int parse_all(h1_head *r, const char *s, size_t len)
{
    h1_request_init(r);
    return h1_request_parse(r, s, len, MAXH);
}

/* Feeds every prefix of `s` to one parser, each in a fresh heap copy (the
 * buffer moves, the old one is freed: a stale span is a use after free
 * under ASan). Checks that the prefixes before the verdict give MORE and
 * those after keep the verdict; returns it, with the copy of the whole
 * input in *keep (the caller frees it) for the spans. */
static int parse_splits(h1_head *r, const char *s, size_t len, char **keep)
{
    int verdict = H1_PARSE_MORE, status = 0;
    char *cur = NULL;

    h1_request_init(r);
    for (size_t n = 1; n <= len; n++) {
        char *copy = malloc(n);
        int rc;

        assert_non_null(copy);
        memcpy(copy, s, n);
        free(cur);
        cur = copy;
        rc = h1_request_parse(r, cur, n, MAXH);
        if (verdict != H1_PARSE_MORE) {
            assert_int_equal(rc, verdict);
            assert_int_equal(r->status, status);
        }
        verdict = rc;
        status = r->status;
    }
    *keep = cur;
    return verdict;
}

static const char GOOD[] = "GET /api/v1/bench/item?id=1&x=%2F HTTP/1.1\r\n"
                           "Host: gw.example:8080\r\n"
                           "User-Agent:  curl/8.0 \r\n"
                           "X-Empty:\r\n"
                           "Accept: */*\r\n"
                           "X-Tab:\tv\talue\t\r\n"
                           "\r\n";

static void good_head_every_split(void **state)
{
    h1_head r;
    char *copy;
    size_t len = strlen(GOOD), vl;
    const char *v;

    (void)state;
    assert_int_equal(parse_splits(&r, GOOD, len, &copy), H1_PARSE_DONE);
    assert_int_equal(r.head_len, len);
    assert_int_equal(r.mlen, 3);
    assert_memory_equal(r.method, "GET", 3);
    assert_int_equal(r.tlen, strlen("/api/v1/bench/item?id=1&x=%2F"));
    assert_memory_equal(r.target, "/api/v1/bench/item?id=1&x=%2F", r.tlen);
    assert_int_equal(r.minor, 1);
    assert_int_equal(r.nfields, 5);
    v = h1_request_field(&r, "user-agent", &vl);
    assert_non_null(v);
    assert_int_equal(vl, 8);
    assert_memory_equal(v, "curl/8.0", 8);
    v = h1_request_field(&r, "X-EMPTY", &vl);
    assert_non_null(v);
    assert_int_equal(vl, 0);
    v = h1_request_field(&r, "x-tab", &vl);
    assert_int_equal(vl, 6);
    assert_memory_equal(v, "v\talue", 6);
    assert_null(h1_request_field(&r, "Content-Length", NULL));
    assert_false(r.has_len);
    assert_false(r.chunked);
    assert_true(h1_request_keep_alive(&r));
    free(copy);
}

/* What follows the head (a body, the next request) is not the head's. */
static void pipelined_rest_not_taken(void **state)
{
    const char two[] = "DELETE /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: h\r\n\r\n";
    h1_head r;

    (void)state;
    assert_int_equal(parse_all(&r, two, strlen(two)), H1_PARSE_DONE);
    assert_int_equal(r.head_len, strlen("DELETE /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n"));
    assert_true(r.has_len);
    assert_int_equal(r.content_length, 3);
    /* Called again after DONE: the same verdict, nothing more read. */
    assert_int_equal(h1_request_parse(&r, two, strlen(two), MAXH), H1_PARSE_DONE);
    {
        const char *next = two + r.head_len + 3;

        assert_int_equal(parse_all(&r, next, strlen(next)), H1_PARSE_DONE);
        assert_memory_equal(r.target, "/b", 2);
    }
}

static void leading_empty_lines_and_http10(void **state)
{
    const char s[] = "\r\n\r\nGET / HTTP/1.0\r\n\r\n";
    const char ka[] = "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
    const char cl[] = "GET / HTTP/1.1\r\nHost: h\r\nConnection: foo, close\r\n\r\n";
    const char up[] = "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                      "Expect: 100-continue\r\nTransfer-Encoding: CHUNKED\r\n\r\n";
    h1_head r;
    char *b;

    (void)state;
    assert_int_equal(parse_splits(&r, s, strlen(s), &b), H1_PARSE_DONE);
    assert_int_equal(r.minor, 0);
    assert_int_equal(r.head_len, strlen(s));
    assert_false(h1_request_keep_alive(&r)); /* 1.0 without keep-alive */
    free(b);
    assert_int_equal(parse_all(&r, ka, strlen(ka)), H1_PARSE_DONE);
    assert_true(h1_request_keep_alive(&r));
    assert_int_equal(parse_all(&r, cl, strlen(cl)), H1_PARSE_DONE);
    assert_false(h1_request_keep_alive(&r));
    assert_int_equal(parse_all(&r, up, strlen(up)), H1_PARSE_DONE);
    assert_true(r.conn_upgrade);
    assert_true(r.upgrade);
    assert_true(r.expect);
    assert_true(r.chunked);
}

typedef struct {
    const char *in;
    int status;
} bad_case;

static const bad_case BAD[] = {
    /* line endings */
    {"GET / HTTP/1.1\nHost: h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost: h\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost: h\r\n\n", 400},
    {"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost: h\r\r\n\r\n", 400},
    {"GET /\r HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {"\n", 400},
    /* obs-fold, field syntax */
    {"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\n\tHost: h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\n: h\r\nHost: h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHo(st: h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost h\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost: h\r\nX: a\001b\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost: h\r\nX: a\177\r\n\r\n", 400},
    /* framing */
    {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1234567890123456789\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400},
    {"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
    {"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
    /* Host */
    {"GET / HTTP/1.1\r\n\r\n", 400},
    {"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
    /* request line */
    {"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400},
    {"GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {"GET /a\001b HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400},
    {"GET / http/1.1\r\nHost: h\r\n\r\n", 400},
    {"GET / HTTP/1.11\r\nHost: h\r\n\r\n", 400},
    {"GET / HTTP/11\r\nHost: h\r\n\r\n", 400},
    {"GET /\r\n\r\n", 400},
    {"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505},
    {"GET / HTTP/1.2\r\nHost: h\r\n\r\n", 505},
    {"GET / HTTP/0.9\r\nHost: h\r\n\r\n", 505},
};

static void hostile_heads_every_split(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(BAD) / sizeof(BAD[0]); i++) {
        size_t len = strlen(BAD[i].in);
        h1_head r;
        char *b;

        if (parse_splits(&r, BAD[i].in, len, &b) != H1_PARSE_ERROR || r.status != BAD[i].status)
            fail_msg("case %zu (%s): status %d, err %s", i, BAD[i].in, r.status, r.err);
        assert_true(r.err[0] != '\0');
        free(b);
    }
    {
        static const char nul[] = "GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n";
        h1_head r;
        char *b;

        assert_int_equal(parse_splits(&r, nul, sizeof(nul) - 1, &b), H1_PARSE_ERROR);
        assert_int_equal(r.status, 400);
        free(b);
    }
}

static void oversized_heads(void **state)
{
    h1_head r;
    char *s = malloc(3 * MAXH);
    size_t n;

    (void)state;
    assert_non_null(s);
    /* One line over H1_LINE_MAX: 431 before its end arrives. */
    n = (size_t)snprintf(s, 3 * MAXH, "GET / HTTP/1.1\r\nHost: h\r\nX: %0*d\r\n\r\n", H1_LINE_MAX, 0);
    assert_int_equal(parse_all(&r, s, n), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
    h1_request_init(&r);
    assert_int_equal(h1_request_parse(&r, s, 30 + H1_LINE_MAX, 3 * MAXH), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
    /* A request line over it too. */
    n = (size_t)snprintf(s, 3 * MAXH, "GET /%0*d HTTP/1.1\r\nHost: h\r\n\r\n", H1_LINE_MAX, 0);
    assert_int_equal(parse_all(&r, s, n), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
    /* The whole head over the caller's bound, each line short. */
    n = (size_t)snprintf(s, 3 * MAXH, "GET / HTTP/1.1\r\nHost: h\r\n");
    for (int i = 0; i < 30; i++)
        n += (size_t)snprintf(s + n, 3 * MAXH - n, "X-%d: %0600d\r\n", i, 0);
    n += (size_t)snprintf(s + n, 3 * MAXH - n, "\r\n");
    assert_true(n > MAXH);
    assert_int_equal(parse_all(&r, s, n), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
    /* Fed as it comes: 431 as soon as the bound is passed, not later. */
    h1_request_init(&r);
    assert_int_equal(h1_request_parse(&r, s, MAXH, MAXH), H1_PARSE_MORE);
    assert_int_equal(h1_request_parse(&r, s, MAXH + 1, MAXH), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
    /* Empty lines before the request line count towards the bound. */
    memset(s, 0, 3 * MAXH);
    for (n = 0; n + 2 <= MAXH + 2; n += 2)
        memcpy(s + n, "\r\n", 2);
    assert_int_equal(parse_all(&r, s, n), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
    free(s);
}

static void field_count_bound(void **state)
{
    h1_head r;
    char s[8192];
    size_t n = (size_t)snprintf(s, sizeof(s), "GET / HTTP/1.1\r\nHost: h\r\n");

    (void)state;
    for (int i = 1; i < H1_REQ_FIELDS_MAX; i++)
        n += (size_t)snprintf(s + n, sizeof(s) - n, "X-%d: v\r\n", i);
    memcpy(s + n, "\r\n", 3);
    assert_int_equal(parse_all(&r, s, n + 2), H1_PARSE_DONE);
    assert_int_equal(r.nfields, H1_REQ_FIELDS_MAX);
    n += (size_t)snprintf(s + n, sizeof(s) - n, "X-last: v\r\n\r\n");
    assert_int_equal(parse_all(&r, s, n), H1_PARSE_ERROR);
    assert_int_equal(r.status, 431);
}

/* An error is final: more bytes do not turn it into anything else. */
static void error_is_sticky(void **state)
{
    const char s[] = "GET / HTTP/1.1\nHost: h\r\n\r\n";
    h1_head r;

    (void)state;
    assert_int_equal(parse_all(&r, s, 15), H1_PARSE_ERROR);
    assert_int_equal(h1_request_parse(&r, s, strlen(s), MAXH), H1_PARSE_ERROR);
    assert_int_equal(r.status, 400);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(good_head_every_split),
        cmocka_unit_test(pipelined_rest_not_taken),
        cmocka_unit_test(leading_empty_lines_and_http10),
        cmocka_unit_test(hostile_heads_every_split),
        cmocka_unit_test(oversized_heads),
        cmocka_unit_test(field_count_bound),
        cmocka_unit_test(error_is_sticky),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
