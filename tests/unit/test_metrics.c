/* Unit tests for metrics: values, get-or-create identity, type clashes, the
 * exact exposition text, label escaping, and exact sums under concurrent
 * updates from several threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>

#include <cmocka.h>

#include "metrics.h"

static metrics *fresh(void)
{
    metrics *m = metrics_new();
    assert_non_null(m);
    return m;
}

static char *render(metrics *m)
{
    char *out = NULL;
    size_t len = 0;

    assert_int_equal(metrics_render(m, &out, &len), 0);
    assert_non_null(out);
    assert_int_equal(strlen(out), len);
    return out;
}

/* Asserts `line` appears in `text` as a whole line, exactly `times` times. */
static void assert_line(const char *text, const char *line, int times)
{
    size_t n = strlen(line);
    int found = 0;

    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (len == n && memcmp(p, line, n) == 0)
            found++;
        p += len + (eol ? 1 : 0);
    }
    if (found != times)
        fail_msg("line '%s' found %d times, expected %d, in:\n%s", line, found, times, text);
}

static void test_counter(void **state)
{
    metrics *m = fresh();
    metrics_counter *c = metrics_counter_get(m, "jobs_total", "Jobs.", NULL);

    (void)state;
    assert_non_null(c);
    assert_int_equal(metrics_counter_value(c), 0);
    metrics_counter_inc(c);
    metrics_counter_add(c, 41);
    assert_int_equal(metrics_counter_value(c), 42);
    metrics_counter_add(c, UINT64_C(10000000000));
    assert_true(metrics_counter_value(c) == UINT64_C(10000000042));
    /* NULL is a no-op. */
    metrics_counter_inc(NULL);
    metrics_counter_add(NULL, 5);
    assert_int_equal(metrics_counter_value(NULL), 0);
    metrics_free(m);
    metrics_free(NULL);
}

static void test_gauge(void **state)
{
    metrics *m = fresh();
    metrics_gauge *g = metrics_gauge_get(m, "queue_depth", "Depth.", "queue=\"a\"");

    (void)state;
    assert_non_null(g);
    assert_true(metrics_gauge_value(g) == 0.0);
    metrics_gauge_set(g, 2.5);
    assert_true(metrics_gauge_value(g) == 2.5);
    metrics_gauge_add(g, -4.0);
    assert_true(metrics_gauge_value(g) == -1.5);
    metrics_gauge_add(g, 0.25);
    assert_true(metrics_gauge_value(g) == -1.25);
    metrics_gauge_set(NULL, 1);
    metrics_gauge_add(NULL, 1);
    assert_true(metrics_gauge_value(NULL) == 0.0);
    metrics_free(m);
}

static void test_histogram_values(void **state)
{
    metrics *m = fresh();
    static const double b[] = {0.1, 0.5, 1};
    metrics_histogram *h = metrics_histogram_get(m, "lat_seconds", "Latency.", NULL, b, 3);

    (void)state;
    assert_non_null(h);
    metrics_histogram_observe(h, 0.05);
    metrics_histogram_observe(h, 0.1); /* le is inclusive */
    metrics_histogram_observe(h, 0.3);
    metrics_histogram_observe(h, 2);
    metrics_histogram_observe(h, NAN); /* dropped */
    metrics_histogram_observe(NULL, 1);
    assert_int_equal(metrics_histogram_count(h), 4);
    assert_true(fabs(metrics_histogram_sum(h) - 2.45) < 1e-12);
    assert_int_equal(metrics_histogram_count(NULL), 0);

    char *out = render(m);
    assert_line(out, "lat_seconds_bucket{le=\"0.1\"} 2", 1);
    assert_line(out, "lat_seconds_bucket{le=\"0.5\"} 3", 1);
    assert_line(out, "lat_seconds_bucket{le=\"1\"} 3", 1);
    assert_line(out, "lat_seconds_bucket{le=\"+Inf\"} 4", 1);
    assert_line(out, "lat_seconds_count 4", 1);
    assert_line(out, "lat_seconds_sum 2.45", 1);
    free(out);
    metrics_free(m);
}

static void test_same_pointer(void **state)
{
    metrics *m = fresh();

    (void)state;
    metrics_counter *a = metrics_counter_get(m, "req_total", "Requests.", "code=\"200\"");
    metrics_counter *b = metrics_counter_get(m, "req_total", "other help", "code=\"200\"");
    metrics_counter *c = metrics_counter_get(m, "req_total", "Requests.", "code=\"500\"");
    metrics_counter *d = metrics_counter_get(m, "req_total", "Requests.", NULL);
    metrics_counter *e = metrics_counter_get(m, "req_total", "Requests.", "");
    assert_non_null(a);
    assert_ptr_equal(a, b);
    assert_non_null(c);
    assert_ptr_not_equal(a, c);
    assert_non_null(d);
    assert_ptr_equal(d, e);
    assert_ptr_not_equal(d, a);
    metrics_gauge *g1 = metrics_gauge_get(m, "temp", "T.", NULL);
    assert_ptr_equal(g1, metrics_gauge_get(m, "temp", "T.", NULL));
    metrics_histogram *h1 = metrics_histogram_get(m, "h_seconds", "H.", NULL, metrics_latency_buckets,
                                                  metrics_latency_nbuckets);
    assert_non_null(h1);
    assert_ptr_equal(h1, metrics_histogram_get(m, "h_seconds", "H.", NULL, metrics_latency_buckets,
                                               metrics_latency_nbuckets));
    /* Many series: the lookup table grows and every pointer stays put. */
    metrics_counter *many[500];
    for (int i = 0; i < 500; i++) {
        char l[32];
        snprintf(l, sizeof(l), "n=\"%d\"", i);
        many[i] = metrics_counter_get(m, "many_total", "Many.", l);
        assert_non_null(many[i]);
        metrics_counter_add(many[i], (uint64_t)i);
    }
    for (int i = 0; i < 500; i++) {
        char l[32];
        snprintf(l, sizeof(l), "n=\"%d\"", i);
        assert_ptr_equal(many[i], metrics_counter_get(m, "many_total", "Many.", l));
        assert_int_equal(metrics_counter_value(many[i]), i);
    }
    assert_ptr_equal(a, metrics_counter_get(m, "req_total", NULL, "code=\"200\""));
    metrics_free(m);
}

static void test_type_clash(void **state)
{
    metrics *m = fresh();
    static const double b1[] = {1, 2}, b2[] = {1, 3};

    (void)state;
    assert_non_null(metrics_counter_get(m, "x_total", "X.", NULL));
    assert_null(metrics_gauge_get(m, "x_total", "X.", NULL));
    assert_null(metrics_gauge_get(m, "x_total", "X.", "a=\"1\""));
    assert_null(metrics_histogram_get(m, "x_total", "X.", NULL, b1, 2));
    assert_non_null(metrics_gauge_get(m, "g", "G.", NULL));
    assert_null(metrics_counter_get(m, "g", "G.", NULL));
    /* Histogram bounds are part of the family's type. */
    assert_non_null(metrics_histogram_get(m, "h", "H.", NULL, b1, 2));
    assert_null(metrics_histogram_get(m, "h", "H.", NULL, b2, 2));
    assert_null(metrics_histogram_get(m, "h", "H.", "a=\"1\"", b2, 2));
    assert_null(metrics_histogram_get(m, "h", "H.", "a=\"1\"", b1, 1));
    assert_non_null(metrics_histogram_get(m, "h", "H.", "a=\"1\"", b1, 2));
    /* A histogram's derived series names are taken. */
    assert_null(metrics_counter_get(m, "h_count", "C.", NULL));
    assert_null(metrics_gauge_get(m, "h_sum", "S.", NULL));
    assert_non_null(metrics_counter_get(m, "y_bucket", "Y.", NULL));
    assert_null(metrics_histogram_get(m, "y", "Y.", NULL, b1, 2));
    /* The registry still renders after refusals. */
    char *out = render(m);
    assert_line(out, "# TYPE x_total counter", 1);
    assert_line(out, "# TYPE h histogram", 1);
    free(out);
    metrics_free(m);
}

static void test_bad_arguments(void **state)
{
    metrics *m = fresh();
    static const double desc[] = {1, 0.5}, dup[] = {1, 1}, nan_b[] = {NAN}, inf_last[] = {1, INFINITY};

    (void)state;
    assert_null(metrics_counter_get(NULL, "a_total", "A.", NULL));
    assert_null(metrics_counter_get(m, NULL, "A.", NULL));
    assert_null(metrics_counter_get(m, "", "A.", NULL));
    assert_null(metrics_counter_get(m, "1abc", "A.", NULL));
    assert_null(metrics_counter_get(m, "a-b", "A.", NULL));
    assert_null(metrics_counter_get(m, "a b", "A.", NULL));
    assert_non_null(metrics_counter_get(m, "ns:sub_total", "A.", NULL));
    /* Label sets that would break the exposition. */
    static const char *const badl[] = {"a=1", "a=\"1", "a=\"x\"y\"", "a=\"x\n\"", "1a=\"x\"", "a=\"\\q\"",
                                       "a=\"1\",", "a=\"1\",a=\"2\"", "a=\"1\" ", "{a=\"1\"}", "a-b=\"1\""};
    for (size_t i = 0; i < sizeof(badl) / sizeof(badl[0]); i++)
        if (metrics_counter_get(m, "l_total", "L.", badl[i]) != NULL)
            fail_msg("label set '%s' was accepted", badl[i]);
    assert_non_null(metrics_counter_get(m, "l_total", "L.", "a=\"1\",b_2=\"x\\\\y\\\"z\\n\",_c=\"\""));
    assert_null(metrics_histogram_get(m, "hb", "H.", "le=\"1\"", metrics_latency_buckets, 3));
    assert_null(metrics_histogram_get(m, "hb", "H.", NULL, desc, 2));
    assert_null(metrics_histogram_get(m, "hb", "H.", NULL, dup, 2));
    assert_null(metrics_histogram_get(m, "hb", "H.", NULL, nan_b, 1));
    assert_null(metrics_histogram_get(m, "hb", "H.", NULL, NULL, 2));
    /* A trailing +Inf is the implicit one; no bounds at all is allowed. */
    metrics_histogram *h = metrics_histogram_get(m, "hi", "H.", NULL, inf_last, 2);
    assert_non_null(h);
    assert_ptr_equal(h, metrics_histogram_get(m, "hi", "H.", NULL, inf_last, 1));
    metrics_histogram *h0 = metrics_histogram_get(m, "h0", "H.", NULL, NULL, 0);
    assert_non_null(h0);
    metrics_histogram_observe(h0, 3);
    char *out = render(m);
    assert_line(out, "h0_bucket{le=\"+Inf\"} 1", 1);
    assert_line(out, "hi_bucket{le=\"+Inf\"} 0", 1);
    assert_line(out, "hi_bucket{le=\"1\"} 0", 1);
    free(out);
    assert_int_equal(metrics_render(NULL, &out, NULL), -1);
    assert_null(out);
    metrics_free(m);
}

static void test_render_exact(void **state)
{
    metrics *m = fresh();
    static const double b[] = {0.005, 0.25, 1};
    char esc[128], labels[160];

    (void)state;
    metrics_counter *get200 = metrics_counter_get(m, "http_requests_total", "HTTP requests.",
                                                  "method=\"GET\",status=\"200\"");
    metrics_gauge *conns = metrics_gauge_get(m, "connections", "Open connections\nwith a \\ in help.", NULL);
    metrics_histogram *lat = metrics_histogram_get(m, "http_request_duration_seconds", "Request latency.",
                                                   "route=\"/a\"", b, 3);
    metrics_counter *post500 = metrics_counter_get(m, "http_requests_total", "HTTP requests.",
                                                   "method=\"POST\",status=\"500\"");
    metrics_escape_label(esc, sizeof(esc), "say \"hi\"\\now\nbye");
    assert_string_equal(esc, "say \\\"hi\\\"\\\\now\\nbye");
    snprintf(labels, sizeof(labels), "path=\"%s\"", esc);
    metrics_counter *odd = metrics_counter_get(m, "http_requests_total", "HTTP requests.", labels);
    metrics_histogram *lat_b = metrics_histogram_get(m, "http_request_duration_seconds", "Request latency.",
                                                     "route=\"/b\"", b, 3);
    assert_non_null(get200);
    assert_non_null(conns);
    assert_non_null(lat);
    assert_non_null(post500);
    assert_non_null(odd);
    assert_non_null(lat_b);

    metrics_counter_add(get200, 7);
    metrics_counter_inc(post500);
    metrics_counter_inc(odd);
    metrics_gauge_set(conns, 3);
    metrics_histogram_observe(lat, 0.001);
    metrics_histogram_observe(lat, 0.2);
    metrics_histogram_observe(lat, 0.25);
    metrics_histogram_observe(lat, 7);
    metrics_histogram_observe(lat_b, 0.5);

    char *out = render(m);
    static const char expect[] =
        "# HELP http_requests_total HTTP requests.\n"
        "# TYPE http_requests_total counter\n"
        "http_requests_total{method=\"GET\",status=\"200\"} 7\n"
        "http_requests_total{method=\"POST\",status=\"500\"} 1\n"
        "http_requests_total{path=\"say \\\"hi\\\"\\\\now\\nbye\"} 1\n"
        "# HELP connections Open connections\\nwith a \\\\ in help.\n"
        "# TYPE connections gauge\n"
        "connections 3\n"
        "# HELP http_request_duration_seconds Request latency.\n"
        "# TYPE http_request_duration_seconds histogram\n"
        "http_request_duration_seconds_bucket{route=\"/a\",le=\"0.005\"} 1\n"
        "http_request_duration_seconds_bucket{route=\"/a\",le=\"0.25\"} 3\n"
        "http_request_duration_seconds_bucket{route=\"/a\",le=\"1\"} 3\n"
        "http_request_duration_seconds_bucket{route=\"/a\",le=\"+Inf\"} 4\n"
        "http_request_duration_seconds_sum{route=\"/a\"} 7.451\n"
        "http_request_duration_seconds_count{route=\"/a\"} 4\n"
        "http_request_duration_seconds_bucket{route=\"/b\",le=\"0.005\"} 0\n"
        "http_request_duration_seconds_bucket{route=\"/b\",le=\"0.25\"} 0\n"
        "http_request_duration_seconds_bucket{route=\"/b\",le=\"1\"} 1\n"
        "http_request_duration_seconds_bucket{route=\"/b\",le=\"+Inf\"} 1\n"
        "http_request_duration_seconds_sum{route=\"/b\"} 0.5\n"
        "http_request_duration_seconds_count{route=\"/b\"} 1\n";
    assert_string_equal(out, expect);
    assert_line(out, "# TYPE http_requests_total counter", 1);
    assert_line(out, "# HELP http_requests_total HTTP requests.", 1);
    free(out);
    metrics_free(m);
}

static void test_render_numbers(void **state)
{
    metrics *m = fresh();
    metrics_gauge *g = metrics_gauge_get(m, "g", "G.", NULL);
    char *out;

    (void)state;
    metrics_gauge_set(g, 0.1);
    out = render(m);
    assert_line(out, "g 0.1", 1);
    free(out);
    metrics_gauge_set(g, -INFINITY);
    out = render(m);
    assert_line(out, "g -Inf", 1);
    free(out);
    metrics_gauge_set(g, NAN);
    out = render(m);
    assert_line(out, "g NaN", 1);
    free(out);
    metrics_gauge_set(g, 1e-7);
    out = render(m);
    assert_line(out, "g 1e-07", 1);
    free(out);
    /* The shortest spelling that reads back exactly. */
    metrics_gauge_set(g, 0.1 + 0.2);
    out = render(m);
    assert_line(out, "g 0.30000000000000004", 1);
    free(out);
    metrics_gauge_set(g, 123456789012.0);
    out = render(m);
    assert_line(out, "g 123456789012", 1);
    free(out);
    metrics_free(m);
}

static void test_escape_label(void **state)
{
    char small[6];

    (void)state;
    assert_string_equal(metrics_escape_label(small, sizeof(small), "abc"), "abc");
    /* Truncation never leaves half an escape. */
    assert_string_equal(metrics_escape_label(small, sizeof(small), "abcd\"e"), "abcd");
    assert_string_equal(metrics_escape_label(small, sizeof(small), "abc\"e"), "abc\\\"");
    assert_string_equal(metrics_escape_label(small, sizeof(small), NULL), "");
    assert_string_equal(metrics_escape_label(small, 1, "abc"), "");
}

static void test_default_registry(void **state)
{
    (void)state;
    metrics *d = metrics_default();
    assert_non_null(d);
    assert_ptr_equal(d, metrics_default());
    metrics_counter *c = metrics_counter_get(d, "default_test_total", "D.", NULL);
    metrics_counter_inc(c);
    assert_ptr_equal(c, metrics_counter_get(metrics_default(), "default_test_total", "D.", NULL));
    assert_int_equal(metrics_counter_value(c), 1);
}

#define NTHREADS 4
#define NITER 200000

struct worker {
    metrics *m;
    metrics_counter *c;
    metrics_gauge *g;
    metrics_histogram *h;
    int id;
    int errors; /* cmocka's asserts must not run off the main thread */
};

static void *work(void *arg)
{
    struct worker *w = arg;

    for (int i = 0; i < NITER; i++) {
        metrics_counter_inc(w->c);
        metrics_gauge_add(w->g, 1.0);
        /* Integers keep the double sum exact. */
        metrics_histogram_observe(w->h, (double)(i % 4));
        if (i % 20000 == 0) {
            /* Lookups and renders race with the updates. */
            char l[32];
            snprintf(l, sizeof(l), "t=\"%d\",i=\"%d\"", w->id, i);
            char *out = NULL;
            if (metrics_counter_get(w->m, "side_total", "S.", l) == NULL)
                w->errors++;
            if (metrics_counter_get(w->m, "conc_total", "C.", NULL) != w->c)
                w->errors++;
            if (metrics_render(w->m, &out, NULL) != 0 || strstr(out, "conc_total ") == NULL)
                w->errors++;
            free(out);
        }
    }
    return NULL;
}

static void test_concurrent(void **state)
{
    metrics *m = fresh();
    static const double b[] = {0.5, 1.5, 2.5};
    pthread_t t[NTHREADS];
    struct worker w[NTHREADS];

    (void)state;
    metrics_counter *c = metrics_counter_get(m, "conc_total", "C.", NULL);
    metrics_gauge *g = metrics_gauge_get(m, "conc_gauge", "G.", NULL);
    metrics_histogram *h = metrics_histogram_get(m, "conc_hist", "H.", NULL, b, 3);
    for (int i = 0; i < NTHREADS; i++) {
        w[i] = (struct worker){m, c, g, h, i, 0};
        assert_int_equal(pthread_create(&t[i], NULL, work, &w[i]), 0);
    }
    for (int i = 0; i < NTHREADS; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(w[i].errors, 0);
    }
    assert_int_equal(metrics_counter_value(c), NTHREADS * NITER);
    assert_true(metrics_gauge_value(g) == (double)NTHREADS * NITER);
    assert_int_equal(metrics_histogram_count(h), NTHREADS * NITER);
    /* Each thread observed 0,1,2,3 in turn: sum 6 per 4 observations. */
    assert_true(metrics_histogram_sum(h) == 6.0 * NTHREADS * NITER / 4);
    char *out = render(m);
    char line[128];
    snprintf(line, sizeof(line), "conc_hist_bucket{le=\"0.5\"} %d", NTHREADS * NITER / 4);
    assert_line(out, line, 1);
    snprintf(line, sizeof(line), "conc_hist_bucket{le=\"2.5\"} %d", NTHREADS * NITER / 4 * 3);
    assert_line(out, line, 1);
    snprintf(line, sizeof(line), "conc_total %d", NTHREADS * NITER);
    assert_line(out, line, 1);
    free(out);
    metrics_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counter),
        cmocka_unit_test(test_gauge),
        cmocka_unit_test(test_histogram_values),
        cmocka_unit_test(test_same_pointer),
        cmocka_unit_test(test_type_clash),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_render_exact),
        cmocka_unit_test(test_render_numbers),
        cmocka_unit_test(test_escape_label),
        cmocka_unit_test(test_default_registry),
        cmocka_unit_test(test_concurrent),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
