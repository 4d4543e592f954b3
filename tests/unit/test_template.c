/* Unit tests of the action-workers' pure modules: template rendering, the
 * target (SSRF) policy, the circuit breaker and the bounded buffer.
 *
 * The Makefile links unit tests against libshared only, so the modules'
 * sources are compiled into this binary directly. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <cmocka.h>

#include "breaker.h"
#include "../../action-workers/target.c"
#include "../../action-workers/template.c"

static cJSON *event(void)
{
    return cJSON_Parse("{\"id\":\"ev1\",\"agent_id\":42,\"score\":87,\"tag1\":\"a\\\"b\\\\c\\n\",\"tag2\":null,"
                       "\"ratio\":0.5,\"ok\":true,\"meta\":{\"k\":1},\"under\":\"x_y*z\"}");
}

static void render_fields(void **state)
{
    cJSON *ev = event();
    template_ctx ctx = {ev, "My trigger", "t1", "j1"};
    char *s;

    (void)state;
    s = template_render("agent {{agent_id}} score {{ score }} {{trigger.name}} {{missing}}|{{tag2}}|{{event.agent_id}}"
                        "|{{ratio}}|{{ok}}|{{meta}}|{{job.id}}|{{trigger.id}}|{{event_id}}",
                        &ctx, TEMPLATE_RAW, 0);
    assert_string_equal(s, "agent 42 score 87 My trigger ||42|0.5|true|{\"k\":1}|j1|t1|ev1");
    free(s);
    cJSON_Delete(ev);
}

static void render_json_escapes(void **state)
{
    cJSON *ev = event(), *parsed;
    template_ctx ctx = {ev, "q\"uote", NULL, NULL};
    char *s;

    (void)state;
    s = template_render("{\"t\":\"{{tag1}}\",\"n\":\"{{trigger.name}}\",\"s\":{{score}}}", &ctx, TEMPLATE_JSON, 0);
    assert_string_equal(s, "{\"t\":\"a\\\"b\\\\c\\n\",\"n\":\"q\\\"uote\",\"s\":87}");
    parsed = cJSON_Parse(s);
    assert_non_null(parsed);
    assert_string_equal(cJSON_GetObjectItem(parsed, "t")->valuestring, "a\"b\\c\n");
    cJSON_Delete(parsed);
    free(s);
    cJSON_Delete(ev);
}

static void render_markdown_and_edges(void **state)
{
    cJSON *ev = event();
    template_ctx ctx = {ev, NULL, NULL, NULL};
    char *s;

    (void)state;
    /* Inside a legacy Markdown entity there is no escape: the closing mark
     * is written as close, escaped mark, reopen. */
    s = template_render("*{{under}}*", &ctx, TEMPLATE_MARKDOWN, 0);
    assert_string_equal(s, "*x_y*\\**z*");
    free(s);
    s = template_render("open {{agent_id and {{ }} {{trigger.name}}", &ctx, TEMPLATE_RAW, 0);
    assert_string_equal(s, "open {{agent_id and {{ }} ");
    free(s);
    s = template_render(NULL, &ctx, TEMPLATE_RAW, 0);
    assert_string_equal(s, "");
    free(s);
    s = template_render("{{agent_id}}{{agent_id}}{{agent_id}}", &ctx, TEMPLATE_RAW, 4);
    assert_string_equal(s, "4242");
    free(s);
    cJSON_Delete(ev);
}

static void render_json_tree(void **state)
{
    cJSON *ev = event();
    template_ctx ctx = {ev, "T", NULL, NULL};
    cJSON *tpl = cJSON_Parse("{\"agent\":\"{{agent_id}}\",\"text\":\"score {{score}} {{tag1}}\",\"list\":[\"{{ok}}\",3],"
                             "\"name\":\"{{trigger.name}}\"}");
    cJSON *out = template_render_json(tpl, &ctx);
    char *s = cJSON_PrintUnformatted(out);

    (void)state;
    assert_string_equal(s, "{\"agent\":42,\"text\":\"score 87 a\\\"b\\\\c\\n\",\"list\":[true,3],\"name\":\"T\"}");
    free(s);
    cJSON_Delete(out);
    cJSON_Delete(tpl);
    cJSON_Delete(ev);
}

static int restricted(const char *ip)
{
    struct sockaddr_storage ss;

    memset(&ss, 0, sizeof(ss));
    if (inet_pton(AF_INET, ip, &((struct sockaddr_in *)&ss)->sin_addr) == 1)
        ss.ss_family = AF_INET;
    else if (inet_pton(AF_INET6, ip, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1)
        ss.ss_family = AF_INET6;
    return target_addr_restricted((struct sockaddr *)&ss);
}

static void target_ranges(void **state)
{
    (void)state;
    assert_true(restricted("127.0.0.1"));
    assert_true(restricted("10.0.0.5"));
    assert_true(restricted("172.20.1.1"));
    assert_true(restricted("192.168.1.1"));
    assert_true(restricted("169.254.169.254"));
    assert_true(restricted("100.64.0.1"));
    assert_true(restricted("0.0.0.0"));
    assert_true(restricted("::1"));
    assert_true(restricted("fe80::1"));
    assert_true(restricted("fd00::1"));
    assert_true(restricted("::ffff:127.0.0.1"));
    assert_false(restricted("8.8.8.8"));
    assert_false(restricted("172.32.0.1"));
    assert_false(restricted("2001:4860::8888"));
}

/* Issue 9.3: the request target comes from target_check's curl_url()
 * parse, as libcurl would send it, not from a second parse by hand. */
static void target_request_path(void **state)
{
    static const struct {
        const char *url, *path;
    } v[] = {
        {"http://127.0.0.1", "/"},
        {"http://127.0.0.1:81?q=1", "/?q=1"},
        {"http://127.0.0.1/a/b?x=1&y=%20#frag", "/a/b?x=1&y=%20"},
        {"http://127.0.0.1/a/../b/./c", "/b/c"},
        {"http://user:pw@127.0.0.1/p?", "/p?"},
        {"http://127.0.0.1/#only-fragment", "/"},
    };
    char err[300], url[600];
    target_info ti;
    target_policy *p = target_policy_new("127.0.0.1", err, sizeof(err));

    (void)state;
    assert_non_null(p);
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        assert_int_equal(target_check(p, v[i].url, &ti, err, sizeof(err)), 0);
        assert_string_equal(ti.path, v[i].path);
    }
    /* Too long for target_info: left empty (h1 then leaves it to libcurl). */
    snprintf(url, sizeof(url), "http://127.0.0.1/%0300d", 7);
    assert_int_equal(target_check(p, url, &ti, err, sizeof(err)), 0);
    assert_string_equal(ti.path, "");
    target_policy_free(p);
}

static void target_policy_checks(void **state)
{
    char err[300];
    target_info ti;
    target_policy *p = target_policy_new("127.0.0.1, 10.9.0.0/16,example.internal", err, sizeof(err));

    (void)state;
    assert_non_null(p);
    assert_int_equal(target_check(p, "http://127.0.0.1:8080/x", &ti, err, sizeof(err)), 0);
    assert_string_equal(ti.host, "127.0.0.1");
    assert_int_equal(ti.port, 8080);
    assert_string_equal(ti.resolve, "");
    assert_string_equal(ti.path, "/x");
    assert_int_equal(target_check(p, "http://10.9.3.4/x", &ti, err, sizeof(err)), 0);
    assert_int_equal(target_check(p, "https://10.10.3.4/x", &ti, err, sizeof(err)), -1);
    assert_int_equal(target_check(p, "http://127.0.0.2/x", &ti, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "ALLOWED_TARGETS"));
    assert_int_equal(target_check(p, "http://[::1]:80/", &ti, err, sizeof(err)), -1);
    assert_int_equal(target_check(p, "file:///etc/passwd", &ti, err, sizeof(err)), -1);
    assert_int_equal(target_check(p, "not a url", &ti, err, sizeof(err)), -1);
    target_policy_free(p);
    assert_null(target_policy_new("10.0.0.0/99", err, sizeof(err)));
    assert_null(target_policy_new("bad host!", err, sizeof(err)));
    p = target_policy_new("", err, sizeof(err));
    assert_non_null(p);
    assert_int_equal(target_check(p, "http://127.0.0.1/", &ti, err, sizeof(err)), -1);
    target_policy_free(p);
}

static void breaker_cycle(void **state)
{
    breaker *b = breaker_new(2, 1000);

    (void)state;
    assert_int_equal(breaker_allow(b, "h:1", 0), 0);
    breaker_report(b, "h:1", 0, 0);
    assert_int_equal(breaker_allow(b, "h:1", 10), 0);
    breaker_report(b, "h:1", 0, 10);
    assert_int_equal(breaker_allow(b, "h:1", 20), 990);     /* open */
    assert_int_equal(breaker_allow(b, "other:1", 20), 0);   /* per host */
    assert_int_equal(breaker_open_count(b, 20), 1);
    assert_int_equal(breaker_allow(b, "h:1", 1010), 0);     /* half-open probe */
    assert_true(breaker_allow(b, "h:1", 1011) > 0);         /* one probe only */
    breaker_report(b, "h:1", 0, 1020);                      /* probe failed */
    assert_true(breaker_allow(b, "h:1", 1030) > 0);
    assert_int_equal(breaker_allow(b, "h:1", 2030), 0);
    breaker_report(b, "h:1", 1, 2040);                      /* probe succeeded */
    assert_int_equal(breaker_allow(b, "h:1", 2050), 0);
    assert_int_equal(breaker_open_count(b, 2050), 0);
    breaker_free(b);
    breaker_free(NULL);
}

static void buf_bounds(void **state)
{
    buf b;
    char *s;

    (void)state;
    buf_init(&b, 5);
    assert_int_equal(buf_puts(&b, "abc"), 0);
    assert_int_equal(buf_puts(&b, "defg"), 0);
    assert_string_equal(buf_str(&b), "abcde");
    assert_int_equal(b.truncated, 2);
    s = buf_take(&b);
    assert_string_equal(s, "abcde");
    free(s);
    assert_string_equal(buf_str(&b), "");
    buf_free(&b);
}

static void utf8_case(const char *in, size_t n, const char *want, size_t wn)
{
    buf b;

    buf_init(&b, 0);
    assert_int_equal(buf_append_utf8(&b, in, n), 0);
    assert_int_equal(b.len, wn);
    assert_memory_equal(b.p, want, wn);
    buf_free(&b);
}

#define UTF8_CASE(in, want) utf8_case(in, sizeof(in) - 1, want, sizeof(want) - 1)

/* Well-formed text passes as is; each longest ill-formed prefix becomes
 * one U+FFFD (the results Python's "replace" gives). */
static void buf_utf8_repairs(void **state)
{
#define R "\xEF\xBF\xBD"
    (void)state;
    UTF8_CASE("plain \x01 ascii", "plain \x01 ascii");
    UTF8_CASE("\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF",
              "\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF");
    UTF8_CASE("ok \xFF\xFE \xC3( \xE2\x82", "ok " R R " " R "( " R);
    UTF8_CASE("\xC0\xAF", R R);                 /* overlong */
    UTF8_CASE("\xE0\x80\xAF", R R R);          /* overlong, 3 bytes */
    UTF8_CASE("\xED\xA0\x80", R R R);          /* a surrogate */
    UTF8_CASE("\xF4\x90\x80\x80", R R R R);   /* past U+10FFFF */
    UTF8_CASE("\xF0\x9F\x98", R);              /* cut short */
    UTF8_CASE("\x80x", R "x");                   /* stray continuation */
    UTF8_CASE("a\0b", "a\0b");
#undef R
}

/* Values that anyone can put on chain, for every Telegram parse mode
 * (issue 10, item 4): they must neither add markup (a link our bot would
 * send) nor break the template's own (a 400 that loses the message). */
static cJSON *hostile(void)
{
    return cJSON_Parse("{\"agent_id\":42,"
                       "\"evil\":\"[Claim your reward](https://evil.example)\","
                       "\"under\":\"x_y*z\",\"code\":\"a`b\",\"pre\":\"``` x\","
                       "\"html\":\"<b>&\\\"'\",\"v2\":\"1.5-2! #{a}|~>+=\\\\\","
                       "\"sp\":\"a b)c\"}");
}

static void expect(const char *tpl, template_mode mode, const char *want)
{
    cJSON *ev = hostile();
    template_ctx ctx = {ev, "T_1", NULL, NULL};
    char *s = template_render(tpl, &ctx, mode, 0);

    assert_non_null(s);
    assert_string_equal(s, want);
    free(s);
    cJSON_Delete(ev);
}

static void telegram_markdown_values(void **state)
{
    (void)state;
    /* Outside an entity: _ * ` [ escaped; the fake link is text. */
    expect("Tag: {{evil}} by {{trigger.name}}", TEMPLATE_MARKDOWN,
           "Tag: \\[Claim your reward](https://evil.example) by T\\_1");
    expect("{{under}} {{code}}", TEMPLATE_MARKDOWN, "x\\_y\\*z a\\`b");
    /* The template's own markup stays; inside it, values close and reopen. */
    expect("*{{under}}* _{{under}}_ `{{code}}`", TEMPLATE_MARKDOWN, "*x_y*\\**z* _x_\\__y*z_ `a`\\``b`");
    expect("```{{pre}}```", TEMPLATE_MARKDOWN, "```\x60\xe2\x80\x8b\x60\xe2\x80\x8b\x60\xe2\x80\x8b x```");
    /* A link: "]" cannot end its text, ")" or a space cannot end its URL. */
    expect("[{{evil}}](https://ok.example/?q={{sp}}) after {{under}}", TEMPLATE_MARKDOWN,
           "[[Claim your reward\xef\xbc\xbd(https://evil.example)](https://ok.example/?q=a%20b%29c) after x\\_y\\*z");
    /* Escapes in the template's text are its own. */
    expect("\\*{{under}}", TEMPLATE_MARKDOWN, "\\*x\\_y\\*z");
}

static void telegram_markdown_v2_values(void **state)
{
    (void)state;
    expect("{{evil}}", TEMPLATE_MARKDOWN_V2, "\\[Claim your reward\\]\\(https://evil\\.example\\)");
    expect("*{{under}}* ||{{v2}}||", TEMPLATE_MARKDOWN_V2,
           "*x\\_y\\*z* ||1\\.5\\-2\\! \\#\\{a\\}\\|\\~\\>\\+\\=\\\\||");
    expect("`{{code}}` ```{{v2}}```", TEMPLATE_MARKDOWN_V2, "`a\\`b` ```1.5-2! #{a}|~>+=\\\\```");
    expect("[{{under}}](https://ok.example/{{sp}}) \\({{trigger.name}}\\)", TEMPLATE_MARKDOWN_V2,
           "[x\\_y\\*z](https://ok.example/a b\\)c) \\(T\\_1\\)");
}

static void telegram_html_values(void **state)
{
    (void)state;
    expect("<b>{{html}}</b> <a href=\"https://ok.example/?t={{html}}\">{{evil}}</a>", TEMPLATE_HTML,
           "<b>&lt;b&gt;&amp;&quot;&#39;</b> <a href=\"https://ok.example/?t=&lt;b&gt;&amp;&quot;&#39;\">"
           "[Claim your reward](https://evil.example)</a>");
}

static void telegram_escape_places(void **state)
{
    buf b;

    (void)state;
    buf_init(&b, 0);
    assert_int_equal(template_escape(&b, "a*b_c", TEMPLATE_MARKDOWN, TEMPLATE_AT_BOLD), 0);
    assert_int_equal(template_escape(&b, "|a*b_c.", TEMPLATE_MARKDOWN_V2, TEMPLATE_AT_BOLD), 0);
    assert_int_equal(template_escape(&b, "|x y)", TEMPLATE_MARKDOWN, TEMPLATE_AT_URL), 0);
    assert_int_equal(template_escape(&b, "|x y)", TEMPLATE_MARKDOWN_V2, TEMPLATE_AT_URL), 0);
    assert_int_equal(template_escape(&b, "|<&>", TEMPLATE_HTML, TEMPLATE_AT_TEXT), 0);
    assert_int_equal(template_escape(&b, "|*_", TEMPLATE_RAW, TEMPLATE_AT_TEXT), 0);
    assert_string_equal(buf_str(&b), "a*\\**b_c\\|a\\*b\\_c\\.|x%20y%29|x y\\)|&lt;&amp;&gt;|*_");
    buf_free(&b);
}

/* A placeholder outside a JSON string is a JSON value of its own (issue 10,
 * item 5): a string field can no longer add members. */
static void json_values_outside_strings(void **state)
{
    cJSON *ev = cJSON_Parse("{\"agent_id\":42,\"ratio\":0.5,\"ok\":false,\"meta\":{\"k\":[1]},\"nul\":null,"
                            "\"tag1\":\"1,\\\"admin\\\":true\",\"num_text\":\"17\"}");
    template_ctx ctx = {ev, "n\"ame", "t1", NULL};
    char *s;
    cJSON *parsed;

    (void)state;
    s = template_render("{\"agent\":{{agent_id}},\"tag\":{{tag1}},\"r\":{{ratio}},\"ok\":{{ok}},\"m\":{{meta}},"
                        "\"n\":{{nul}},\"x\":{{missing}},\"s\":{{num_text}},\"tr\":{{trigger.name}},"
                        "\"in\":\"<{{tag1}}>\",\"br\":\"}{{agent_id}}\\\"{{agent_id}}\",\"arr\":[{{agent_id}},{{tag1}}]}",
                        &ctx, TEMPLATE_JSON, 0);
    assert_string_equal(s, "{\"agent\":42,\"tag\":\"1,\\\"admin\\\":true\",\"r\":0.5,\"ok\":false,\"m\":{\"k\":[1]},"
                           "\"n\":\"\",\"x\":\"\",\"s\":\"17\",\"tr\":\"n\\\"ame\","
                           "\"in\":\"<1,\\\"admin\\\":true>\",\"br\":\"}42\\\"42\",\"arr\":[42,\"1,\\\"admin\\\":true\"]}");
    parsed = cJSON_Parse(s);
    assert_non_null(parsed);
    assert_null(cJSON_GetObjectItem(parsed, "admin"));
    assert_string_equal(cJSON_GetObjectItem(parsed, "tag")->valuestring, "1,\"admin\":true");
    cJSON_Delete(parsed);
    free(s);
    /* The README's example. */
    s = template_render("{\"agent\":{{agent_id}}}", &ctx, TEMPLATE_JSON, 0);
    assert_string_equal(s, "{\"agent\":42}");
    free(s);
    cJSON_Delete(ev);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(buf_utf8_repairs),
        cmocka_unit_test(render_fields),        cmocka_unit_test(render_json_escapes),
        cmocka_unit_test(render_markdown_and_edges), cmocka_unit_test(render_json_tree),
        cmocka_unit_test(target_ranges),        cmocka_unit_test(target_policy_checks),
        cmocka_unit_test(target_request_path),
        cmocka_unit_test(breaker_cycle),        cmocka_unit_test(buf_bounds),
        cmocka_unit_test(telegram_markdown_values), cmocka_unit_test(telegram_markdown_v2_values),
        cmocka_unit_test(telegram_html_values), cmocka_unit_test(telegram_escape_places),
        cmocka_unit_test(json_values_outside_strings),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
