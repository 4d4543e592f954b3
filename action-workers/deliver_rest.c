/* deliver_rest: webhooks. config {method, url, headers{}, body_template?,
 * timeout_ms=30000}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "aw.h"
#include "fmt.h"
#include "jsonstr.h"
#include "sig.h"
#include "template.h"

#define REST_DEFAULT_TIMEOUT_MS 30000

static long rest_timeout(const job *j)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j->config, "timeout_ms");

    if (cJSON_IsNumber(t) && t->valuedouble >= 1 && t->valuedouble <= 300000)
        return (long)t->valuedouble;
    return REST_DEFAULT_TIMEOUT_MS;
}

/* Whether the body is JSON: unless the action's headers name another
 * Content-Type, it is (application/json is what we send then). */
static int json_body(const cJSON *hs)
{
    for (const cJSON *h = cJSON_IsObject(hs) ? hs->child : NULL; h; h = h->next)
        if (cJSON_IsString(h) && !strcasecmp(h->string, "Content-Type"))
            return strcasestr(h->valuestring, "json") != NULL; /* application/json, +json types */
    return 1;
}

/* The body in *out: body_template rendered (a string: values placed for
 * where they stand in the JSON text, see template.h, and the result checked
 * to be JSON; with a Content-Type that is not JSON, values as they are), or
 * a JSON template whose strings are rendered (an object), else the job's
 * own description of what happened. Returns 0, -1 on OOM, or -2 with the
 * reason in why when the rendered body is not JSON. */
static int rest_body(aw *app, job *j, const cJSON *hs, char **out, char *why, size_t whylen)
{
    const cJSON *bt = cJSON_GetObjectItemCaseSensitive(j->config, "body_template");
    template_ctx ctx = {j->event, NULL, j->trigger_id, j->id};

    *out = NULL;
    if (cJSON_IsString(bt)) {
        int json = json_body(hs);
        const char *end = NULL;
        cJSON *check;

        if (strstr(bt->valuestring, "trigger"))
            ctx.trigger_name = deliver_trigger_name(app, j);
        *out = template_render(bt->valuestring, &ctx, json ? TEMPLATE_JSON : TEMPLATE_RAW, 0);
        if (!*out)
            return -1;
        if (!json)
            return 0;
        /* A template that is not JSON itself would send a body the peer
         * cannot read; nothing is sent then. */
        check = cJSON_ParseWithOpts(*out, &end, 1);
        if (check) {
            cJSON_Delete(check);
            return 0;
        }
        snprintf(why, whylen, "body_template does not render to JSON (at byte %ld)",
                 end ? (long)(end - *out) : 0L);
        free(*out);
        *out = NULL;
        return -2;
    }
    if (cJSON_IsObject(bt) || cJSON_IsArray(bt)) {
        cJSON *r;

        ctx.trigger_name = deliver_trigger_name(app, j);
        r = template_render_json(bt, &ctx);
        *out = r ? cJSON_PrintUnformatted(r) : NULL;
        cJSON_Delete(r);
        return *out ? 0 : -1;
    }
    {
        cJSON *o = cJSON_CreateObject();
        const char *tn = deliver_trigger_name(app, j);

        if (!o)
            return -1;
        cJSON_AddStringToObject(o, "job_id", j->id);
        cJSON_AddStringToObject(o, "trigger_id", j->trigger_id ? j->trigger_id : "");
        if (tn)
            cJSON_AddStringToObject(o, "trigger_name", tn);
        cJSON_AddStringToObject(o, "event_id", j->event_id ? j->event_id : "");
        cJSON_AddItemToObject(o, "event", j->event ? cJSON_Duplicate(j->event, 1) : cJSON_CreateNull());
        *out = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        return *out ? 0 : -1;
    }
}

static int header_ok(const char *s)
{
    return !strpbrk(s, "\r\n");
}

/* The length of the URL's scheme and "://" when h1.c can carry it
 * (HTTP_CLIENT=native): http://, and https:// when h1 has a TLS context,
 * without user info; 0 when the request stays with libcurl, as does a
 * request target too long for target_info's copy. */
static size_t native_ok(const aw *app, const char *url, const target_info *ti)
{
    size_t skip = !strncasecmp(url, "http://", 7) ? 7 : app->tls && !strncasecmp(url, "https://", 8) ? 8 : 0;
    const char *a = url + skip;

    if (!skip || ti->addrlen == 0 || !ti->path[0] || memchr(a, '@', strcspn(a, "/?#")))
        return 0;
    return skip;
}

#define NATIVE_REQ_MAX (256u * 1024 * 1024)
/* Bytes of a response body kept in response_data. */
#define BODY_KEPT 4096

/* Appends "name: value\r\n", cut like deliver_header's 2048-byte line
 * would cut it, so both paths send the same bytes. */
static int put_header(buf *b, const char *name, const char *value)
{
    size_t nl = strlen(name), vl = strlen(value);

    if (nl > 2045)
        nl = 2045;
    if (nl + 2 + vl > 2047)
        vl = 2047 - nl - 2;
    return buf_append(b, name, nl) < 0 || buf_append(b, ": ", 2) < 0 || buf_append(b, value, vl) < 0 ||
                   buf_append(b, "\r\n", 2) < 0
               ? -1
               : 0;
}

static int usable_header(const cJSON *h)
{
    return cJSON_IsString(h) && header_ok(h->string) && header_ok(h->valuestring) && !strchr(h->string, ':') &&
           strcasecmp(h->string, "X-Idempotency-Key") && strcasecmp(h->string, "X-Signature") &&
           strcasecmp(h->string, "Content-Length") && strcasecmp(h->string, "Host");
}

/* The request for h1, written straight into j->req: the same bytes as
 * deliver_header's list followed by native_setup, without building the
 * list (a malloc'd node and line per header). Returns 0 or -1 (OOM). */
static int native_build(aw *app, job *j, const char *method, const char *url, size_t skip, const target_info *ti,
                        const cJSON *hs, long timeout_ms, size_t max_resp)
{
    size_t blen = j->body ? strlen(j->body) : 0;
    buf *b = &j->req;
    const cJSON *h;
    char num[1 + FMT_I64_MAX];
    int bad = 0, ipv6, has_ctype = 0, has_ua = 0, has_accept = 0;

    buf_free(b);
    buf_init(b, NATIVE_REQ_MAX);
    if (buf_reserve(b, 512 + strlen(url) + blen) < 0)
        return -1;
    if (cJSON_IsObject(hs))
        cJSON_ArrayForEach(h, hs) {
            if (!usable_header(h))
                continue;
            has_ctype |= !strcasecmp(h->string, "Content-Type");
            has_ua |= !strcasecmp(h->string, "User-Agent");
            has_accept |= !strcasecmp(h->string, "Accept");
        }
    bad |= buf_puts(b, method);
    bad |= buf_puts(b, " ");
    bad |= buf_puts(b, ti->path);
    /* Built piece by piece: snprintf's format parsing cost more than the
     * copying, once per delivery. */
    ipv6 = strchr(ti->host, ':') != NULL;
    bad |= buf_puts(b, ipv6 ? " HTTP/1.1\r\nHost: [" : " HTTP/1.1\r\nHost: ");
    bad |= buf_puts(b, ti->host);
    bad |= ipv6 ? buf_puts(b, "]") : 0;
    if (ti->port != (skip == 8 ? 443 : 80)) {
        num[0] = ':';
        bad |= buf_append(b, num, 1 + fmt_i64(num + 1, ti->port));
    }
    bad |= buf_puts(b, "\r\n");
    if (!has_ua)
        bad |= buf_puts(b, "User-Agent: erc8004-action-workers/" AW_VERSION "\r\n");
    if (!has_accept)
        bad |= buf_puts(b, "Accept: */*\r\n");
    if (cJSON_IsObject(hs))
        cJSON_ArrayForEach(h, hs) {
            /* Framing headers are ours; a blank value removes a header in
             * libcurl, so it is not sent. */
            if (!usable_header(h) || !strcasecmp(h->string, "Connection") ||
                !strcasecmp(h->string, "Transfer-Encoding") || !h->valuestring[strspn(h->valuestring, " \t")])
                continue;
            bad |= put_header(b, h->string, h->valuestring);
        }
    if (!has_ctype && j->body)
        bad |= buf_puts(b, "Content-Type: application/json\r\n");
    bad |= put_header(b, "X-Idempotency-Key", j->id);
    if (app->sig) {
        char hex[65];

        if (sig_hex(app->sig, j->body ? j->body : "", blen, hex) < 0)
            return -1;
        bad |= buf_puts(b, "X-Signature: sha256=");
        bad |= buf_append(b, hex, 64);
        bad |= buf_puts(b, "\r\n");
    }
    if (j->body) {
        bad |= buf_puts(b, "Content-Length: ");
        bad |= buf_append(b, num, fmt_i64(num, (long long)blen));
        bad |= buf_puts(b, "\r\n");
    }
    bad |= buf_puts(b, "Connection: keep-alive\r\n\r\n");
    if (j->body)
        bad |= buf_append(b, j->body, blen);
    if (bad || b->truncated)
        return -1;
    buf_free(&j->resp);
    buf_init(&j->resp, max_resp);
    j->status = 0;
    j->ctype[0] = '\0';
    j->retry_after_hdr = -1;
    j->ti = *ti;
    j->timeout_ms = timeout_ms;
    j->head_only = !strcmp(method, "HEAD");
    j->native = 1;
    j->tls = skip == 8;
    return 0;
}

int deliver_rest_begin(aw *app, job *j)
{
    const cJSON *url = cJSON_GetObjectItemCaseSensitive(j->config, "url");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(j->config, "method");
    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(j->config, "headers"), *h;
    char method[16] = "POST", err[300];
    target_info ti;
    long wait;
    int has_ctype = 0;
    size_t skip;

    if (!cJSON_IsString(url)) {
        deliver_fail(j, OUT_FINAL, "config.url is missing");
        return 1;
    }
    if (cJSON_IsString(m) && m->valuestring[0]) {
        fmt_copy(method, sizeof(method), m->valuestring);
        for (char *p = method; *p; p++)
            if (*p >= 'a' && *p <= 'z')
                *p = (char)(*p - 'a' + 'A');
        if (strspn(method, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") != strlen(method)) {
            deliver_fail(j, OUT_FINAL, "config.method is not a method");
            return 1;
        }
    }
    if (target_check_cached(app->targets, j->tcache, url->valuestring, j->t0, &ti, err, sizeof(err)) < 0) {
        deliver_fail(j, OUT_FINAL, "refused: %s", err);
        return 1;
    }
    {
        /* host:port, the breaker's key (no snprintf: once per delivery). */
        size_t hl = fmt_copy(j->host, sizeof(j->host) - FMT_I64_MAX - 1, ti.host);

        j->host[hl] = ':';
        fmt_i64(j->host + hl + 1, ti.port);
    }
    wait = breaker_allow(app->br, j->host, j->t0);
    if (wait > 0) {
        deliver_fail(j, OUT_DEFER, "circuit open for %s", j->host);
        j->delay_ms = wait;
        return 1;
    }
    deliver_reset_request(j);
    if (strcmp(method, "GET") && strcmp(method, "HEAD") && strcmp(method, "DELETE")) {
        int rc = rest_body(app, j, hs, &j->body, err, sizeof(err));

        if (rc == -2) {
            deliver_fail(j, OUT_FINAL, "%s", err);
            return 1;
        }
        if (rc < 0) {
            deliver_fail(j, OUT_RETRY, "out of memory");
            return 1;
        }
    }
    if (app->cfg.native_http && (skip = native_ok(app, url->valuestring, &ti)) > 0) {
        if (native_build(app, j, method, url->valuestring, skip, &ti, hs, rest_timeout(j),
                         (size_t)app->cfg.response_max) < 0)
            goto oom;
        j->attempted = 1;
        return 0;
    }
    if (cJSON_IsObject(hs)) {
        cJSON_ArrayForEach(h, hs) {
            if (!usable_header(h))
                continue;
            if (!strcasecmp(h->string, "Content-Type"))
                has_ctype = 1;
            if (deliver_header(j, "%s: %s", h->string, h->valuestring) < 0)
                goto oom;
        }
    }
    if (!has_ctype && j->body && deliver_header(j, "Content-Type: application/json") < 0)
        goto oom;
    if (deliver_header(j, "X-Idempotency-Key: %s", j->id) < 0 || deliver_header(j, "Expect:") < 0)
        goto oom;
    if (app->sig) {
        char hex[65];

        if (sig_hex(app->sig, j->body ? j->body : "", j->body ? strlen(j->body) : 0, hex) < 0 ||
            deliver_header(j, "X-Signature: sha256=%s", hex) < 0)
            goto oom;
    }
    if (deliver_setup(j, method, url->valuestring, j->body, rest_timeout(j), ti.resolve,
                      (size_t)app->cfg.response_max) < 0)
        goto oom;
    j->attempted = 1;
    return 0;
oom:
    deliver_fail(j, OUT_RETRY, "out of memory");
    return 1;
}

/* A body that cannot start a JSON value, which deliver_body_json would
 * keep as a string: most sinks answer "ok" or an HTML page. */
static int plain_body(const job *j)
{
    const char *s = buf_str(&j->resp);

    s += strspn(s, " \t\r\n");
    return j->resp.len && !strchr("{[\"-0123456789tfn", *s);
}

/* response_data of such a body as JSON text, written directly: building,
 * printing and freeing a cJSON object for it cost more than the rest of
 * the result. The same text deliver_body_json's string would print. */
static char *plain_response(const job *j)
{
    char num[FMT_I64_MAX];
    size_t max = BODY_KEPT;
    buf b;
    char *cut = j->resp.len > max ? strndup(buf_str(&j->resp), max) : NULL;
    int bad = j->resp.len > max && !cut;

    buf_init(&b, 0);
    bad |= buf_puts(&b, "{");
    if (j->status) {
        bad |= buf_puts(&b, "\"status\":");
        bad |= buf_append(&b, num, fmt_i64(num, j->status));
        bad |= buf_puts(&b, ",");
    }
    bad |= buf_puts(&b, "\"body\":\"");
    bad |= jsonstr_puts(&b, cut ? cut : buf_str(&j->resp));
    bad |= buf_puts(&b, "\"}");
    free(cut);
    if (bad || b.truncated) {
        buf_free(&b);
        return NULL; /* the cJSON way then */
    }
    return buf_take(&b);
}

int deliver_rest_done(aw *app, job *j, CURLcode rc)
{
    (void)app;
    deliver_classify(j, rc, rest_timeout(j));
    free(j->response_text);
    j->response_text = NULL;
    if (plain_body(j) && (j->response_text = plain_response(j)))
        return 1;
    cJSON_Delete(j->response);
    j->response = cJSON_CreateObject();
    if (j->response) {
        if (j->status)
            cJSON_AddNumberToObject(j->response, "status", (double)j->status);
        if (j->resp.len)
            cJSON_AddItemToObject(j->response, "body", deliver_body_json(j, BODY_KEPT));
    }
    return 1;
}
