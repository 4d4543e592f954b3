/* Unit tests for httpd: routing with parameters, 404/405, the error body,
 * request ids, the body limit, JSON errors with positions and CORS. The
 * server runs for real on a loopback port; libcurl is the client. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <curl/curl.h>

#include "httpd.h"
#include "log.h"

typedef struct {
    long status;
    char body[8192];
    size_t len;
    char headers[8192];
    size_t hlen;
} reply;

static httpd *srv;
static char name_item[] = "item", name_delete[] = "delete", name_list[] = "list", name_files[] = "files";
static char base[64];

static size_t on_body(char *d, size_t s, size_t n, void *ud)
{
    reply *r = ud;
    size_t len = s * n;

    if (r->len + len < sizeof(r->body)) {
        memcpy(r->body + r->len, d, len);
        r->len += len;
        r->body[r->len] = '\0';
    }
    return len;
}

static size_t on_header(char *d, size_t s, size_t n, void *ud)
{
    reply *r = ud;
    size_t len = s * n;

    if (r->hlen + len < sizeof(r->headers)) {
        memcpy(r->headers + r->hlen, d, len);
        r->hlen += len;
        r->headers[r->hlen] = '\0';
    }
    return len;
}

/* `headers` is a NULL-terminated list of "Name: value". */
static void request(const char *method, const char *path, const char *body, const char *const *headers, reply *r)
{
    CURL *h = curl_easy_init();
    struct curl_slist *list = NULL;
    char url[512];

    memset(r, 0, sizeof(*r));
    snprintf(url, sizeof(url), "%s%s", base, path);
    for (int i = 0; headers && headers[i]; i++)
        list = curl_slist_append(list, headers[i]);
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    if (body)
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, body);
    assert_int_equal(curl_easy_perform(h), CURLE_OK);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
    curl_slist_free_all(list);
    curl_easy_cleanup(h);
}

static void echo_param(httpd_req *req, void *ud)
{
    cJSON *o = cJSON_CreateObject();
    const char *q = httpd_req_query(req, "q");

    cJSON_AddStringToObject(o, "route", ud);
    cJSON_AddStringToObject(o, "id", httpd_req_param(req, "id") ? httpd_req_param(req, "id") : "");
    cJSON_AddStringToObject(o, "rest", httpd_req_param(req, "rest") ? httpd_req_param(req, "rest") : "");
    cJSON_AddStringToObject(o, "q", q ? q : "");
    httpd_respond_json(req, 200, o);
}

static void parse_body(httpd_req *req, void *ud)
{
    cJSON *in;

    (void)ud;
    if (httpd_req_json(req, &in) < 0)
        return;
    httpd_respond_json(req, 201, in);
}

static void no_answer(httpd_req *req, void *ud)
{
    (void)req;
    (void)ud;
}

static int setup(void **state)
{
    httpd_opts o = {0};
    char err[256];

    (void)state;
    o.service = "test";
    o.host = "127.0.0.1";
    o.port = 0;
    o.threads = 2;
    o.max_body = 1024;
    o.cors_origins = "http://localhost*, https://app.example.com";
    srv = httpd_new(&o, err, sizeof(err));
    assert_non_null(srv);
    assert_int_equal(httpd_route(srv, "GET", "/items/{id}", echo_param, name_item), 0);
    assert_int_equal(httpd_route(srv, "DELETE", "/items/{id}", echo_param, name_delete), 0);
    assert_int_equal(httpd_route(srv, "GET", "/items", echo_param, name_list), 0);
    assert_int_equal(httpd_route(srv, "GET", "/files/{rest...}", echo_param, name_files), 0);
    assert_int_equal(httpd_route(srv, "POST", "/json", parse_body, NULL), 0);
    assert_int_equal(httpd_route(srv, "GET", "/silent", no_answer, NULL), 0);
    assert_int_equal(httpd_route(srv, "GET", "bad-pattern", echo_param, NULL), -1);
    assert_int_equal(httpd_route_metrics(srv), 0);
    assert_int_equal(httpd_start(srv, err, sizeof(err)), 0);
    snprintf(base, sizeof(base), "http://127.0.0.1:%d", httpd_port(srv));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    httpd_free(srv);
    return 0;
}

static void test_route_params(void **state)
{
    reply r;

    (void)state;
    request("GET", "/items/abc-1?q=x%20y", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\"route\":\"item\""));
    assert_non_null(strstr(r.body, "\"id\":\"abc-1\""));
    assert_non_null(strstr(r.body, "\"q\":\"x y\""));
    request("GET", "/items", NULL, NULL, &r);
    assert_non_null(strstr(r.body, "\"route\":\"list\""));
    request("GET", "/items/", NULL, NULL, &r);
    assert_non_null(strstr(r.body, "\"route\":\"list\""));
    request("DELETE", "/items/7", NULL, NULL, &r);
    assert_non_null(strstr(r.body, "\"route\":\"delete\""));
    request("GET", "/files/a/b/c.txt", NULL, NULL, &r);
    assert_non_null(strstr(r.body, "\"rest\":\"a/b/c.txt\""));
}

static void test_not_found_body(void **state)
{
    reply r;

    (void)state;
    request("GET", "/items/1/extra", NULL, NULL, &r);
    assert_int_equal(r.status, 404);
    cJSON *j = cJSON_Parse(r.body);
    assert_non_null(j);
    assert_string_equal(cJSON_GetObjectItem(j, "error")->valuestring, "not_found");
    assert_true(cJSON_IsString(cJSON_GetObjectItem(j, "message")));
    const char *rid = cJSON_GetObjectItem(j, "request_id")->valuestring;
    assert_true(strlen(rid) >= 16);
    assert_non_null(strstr(r.headers, rid));
    assert_non_null(strcasestr(r.headers, "content-type: application/json"));
    cJSON_Delete(j);
}

static void test_method_not_allowed(void **state)
{
    reply r;

    (void)state;
    request("PUT", "/items/1", "{}", NULL, &r);
    assert_int_equal(r.status, 405);
    assert_non_null(strstr(r.body, "\"error\":\"invalid_request\""));
    assert_non_null(strcasestr(r.headers, "Allow: GET, DELETE"));
}

static void test_request_id(void **state)
{
    static const char *const good[] = {"X-Request-Id: trace-123.abc", NULL};
    static const char *const evil[] = {"X-Request-Id: bad id\"<script>", NULL};
    reply r;

    (void)state;
    request("GET", "/items/1", NULL, good, &r);
    assert_non_null(strcasestr(r.headers, "X-Request-Id: trace-123.abc"));
    request("GET", "/nope", NULL, evil, &r);
    assert_null(strstr(r.headers, "script"));
    assert_null(strstr(r.body, "script"));
    assert_non_null(strcasestr(r.headers, "X-Request-Id: "));
}

static void test_body_limit(void **state)
{
    char big[4096];
    reply r;

    (void)state;
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    request("POST", "/json", big, NULL, &r);
    assert_int_equal(r.status, 413);
    assert_non_null(strstr(r.body, "\"error\":\"payload_too_large\""));
    request("POST", "/json", "{\"ok\":true}", NULL, &r);
    assert_int_equal(r.status, 201);
    assert_string_equal(r.body, "{\"ok\":true}");
}

static void test_malformed_json(void **state)
{
    reply r;

    (void)state;
    request("POST", "/json", "{\"a\":1,\n \"b\": tru}", NULL, &r);
    assert_int_equal(r.status, 400);
    cJSON *j = cJSON_Parse(r.body);
    assert_non_null(j);
    cJSON *d = cJSON_GetObjectItem(j, "details");
    assert_non_null(d);
    assert_int_equal(cJSON_GetObjectItem(d, "line")->valueint, 2);
    assert_true(cJSON_GetObjectItem(d, "position")->valueint >= 13);
    assert_non_null(strstr(cJSON_GetObjectItem(j, "message")->valuestring, "position"));
    cJSON_Delete(j);
    request("POST", "/json", "", NULL, &r);
    assert_int_equal(r.status, 400);
    assert_non_null(strstr(r.body, "empty"));
}

static void test_handler_without_answer(void **state)
{
    reply r;

    (void)state;
    request("GET", "/silent", NULL, NULL, &r);
    assert_int_equal(r.status, 500);
    assert_non_null(strstr(r.body, "\"error\":\"internal\""));
}

static void test_cors(void **state)
{
    static const char *const ok[] = {"Origin: http://localhost:3000", "Access-Control-Request-Method: POST", NULL};
    static const char *const bad[] = {"Origin: https://evil.example", "Access-Control-Request-Method: POST", NULL};
    static const char *const simple[] = {"Origin: https://app.example.com", NULL};
    reply r;

    (void)state;
    request("OPTIONS", "/json", NULL, ok, &r);
    assert_int_equal(r.status, 204);
    assert_non_null(strcasestr(r.headers, "Access-Control-Allow-Origin: http://localhost:3000"));
    assert_non_null(strcasestr(r.headers, "Access-Control-Allow-Methods:"));
    request("OPTIONS", "/json", NULL, bad, &r);
    assert_int_equal(r.status, 403);
    assert_null(strcasestr(r.headers, "Access-Control-Allow-Origin"));
    request("GET", "/items/1", NULL, simple, &r);
    assert_non_null(strcasestr(r.headers, "Access-Control-Allow-Origin: https://app.example.com"));
}

/* Look-alike origins of a trailing-'*' entry are refused; "*" alone admits
 * everything but never with credentials; an explicit entry wins over it. */
static void test_cors_match(void **state)
{
    static const char *const lookalikes[] = {
        "http://localhost.evil.com", "http://localhostevil.com", "http://127.0.0.1.nip.io",
        "http://localhost:3000.evil.com", "http://localhost:", "http://localhost:abc",
        "http://localhost:1234567", "http://localhost@evil.com", "http://127.0.0.1:80/x", NULL};
    const char *list = "http://localhost*, http://127.0.0.1*,https://app.example.com";

    (void)state;
    assert_int_equal(httpd_cors_match(list, "http://localhost"), HTTPD_CORS_CREDENTIALS);
    assert_int_equal(httpd_cors_match(list, "http://localhost:3000"), HTTPD_CORS_CREDENTIALS);
    assert_int_equal(httpd_cors_match(list, "http://127.0.0.1:8080"), HTTPD_CORS_CREDENTIALS);
    assert_int_equal(httpd_cors_match(list, "https://app.example.com"), HTTPD_CORS_CREDENTIALS);
    for (int i = 0; lookalikes[i]; i++) {
        print_message("origin %s\n", lookalikes[i]);
        assert_int_equal(httpd_cors_match(list, lookalikes[i]), HTTPD_CORS_NO);
    }
    assert_int_equal(httpd_cors_match(list, "https://app.example.com.evil"), HTTPD_CORS_NO);
    assert_int_equal(httpd_cors_match("*", "https://anything.example"), HTTPD_CORS_ANY);
    assert_int_equal(httpd_cors_match("*, https://app.example.com", "https://app.example.com"),
                     HTTPD_CORS_CREDENTIALS);
    assert_int_equal(httpd_cors_match("https://app.example.com,*", "http://localhost.evil.com"), HTTPD_CORS_ANY);
    assert_int_equal(httpd_cors_match("", "http://localhost"), HTTPD_CORS_NO);
}

static void test_metrics_route(void **state)
{
    reply r;

    (void)state;
    request("GET", "/items/1", NULL, NULL, &r);
    request("GET", "/metrics", NULL, NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "# TYPE http_requests_total counter"));
    assert_non_null(strstr(r.body, "http_requests_total{method=\"GET\",status=\"200\"}"));
    assert_non_null(strstr(r.body, "http_request_duration_seconds_bucket{le=\"+Inf\"}"));
}

static void test_status_codes(void **state)
{
    (void)state;
    assert_string_equal(httpd_status_code(401), "unauthorized");
    assert_string_equal(httpd_status_code(429), "rate_limited");
    assert_string_equal(httpd_status_code(503), "unavailable");
    assert_string_equal(httpd_status_code(504), "gateway_timeout");
    assert_string_equal(httpd_status_code(500), "internal");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_params),      cmocka_unit_test(test_not_found_body),
        cmocka_unit_test(test_method_not_allowed), cmocka_unit_test(test_request_id),
        cmocka_unit_test(test_body_limit),        cmocka_unit_test(test_malformed_json),
        cmocka_unit_test(test_handler_without_answer), cmocka_unit_test(test_cors),
        cmocka_unit_test(test_cors_match),
        cmocka_unit_test(test_metrics_route),     cmocka_unit_test(test_status_codes),
    };
    log_init("test", "error", "json");
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    curl_global_cleanup();
    return rc;
}
