/* deliver_rest: webhooks. config {method, url, headers{}, body_template?,
 * timeout_ms=30000}. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "aw.h"
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

/* The body: body_template rendered with JSON-escaped values (a string), or
 * a JSON template whose strings are rendered (an object), else the job's
 * own description of what happened. */
static char *rest_body(aw *app, job *j)
{
    const cJSON *bt = cJSON_GetObjectItemCaseSensitive(j->config, "body_template");
    template_ctx ctx = {j->event, NULL, j->trigger_id, j->id};
    char *out;

    if (cJSON_IsString(bt)) {
        if (strstr(bt->valuestring, "trigger"))
            ctx.trigger_name = deliver_trigger_name(app, j);
        return template_render(bt->valuestring, &ctx, TEMPLATE_JSON, 0);
    }
    if (cJSON_IsObject(bt) || cJSON_IsArray(bt)) {
        cJSON *r;

        ctx.trigger_name = deliver_trigger_name(app, j);
        r = template_render_json(bt, &ctx);
        out = r ? cJSON_PrintUnformatted(r) : NULL;
        cJSON_Delete(r);
        return out;
    }
    {
        cJSON *o = cJSON_CreateObject();
        const char *tn = deliver_trigger_name(app, j);

        if (!o)
            return NULL;
        cJSON_AddStringToObject(o, "job_id", j->id);
        cJSON_AddStringToObject(o, "trigger_id", j->trigger_id ? j->trigger_id : "");
        if (tn)
            cJSON_AddStringToObject(o, "trigger_name", tn);
        cJSON_AddStringToObject(o, "event_id", j->event_id ? j->event_id : "");
        cJSON_AddItemToObject(o, "event", j->event ? cJSON_Duplicate(j->event, 1) : cJSON_CreateNull());
        out = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        return out;
    }
}

static int header_ok(const char *s)
{
    return !strpbrk(s, "\r\n");
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

    if (!cJSON_IsString(url)) {
        deliver_fail(j, OUT_FINAL, "config.url is missing");
        return 1;
    }
    if (cJSON_IsString(m) && m->valuestring[0]) {
        snprintf(method, sizeof(method), "%s", m->valuestring);
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
    snprintf(j->host, sizeof(j->host), "%s:%d", ti.host, ti.port);
    wait = breaker_allow(app->br, j->host, j->t0);
    if (wait > 0) {
        deliver_fail(j, OUT_DEFER, "circuit open for %s", j->host);
        j->delay_ms = wait;
        return 1;
    }
    deliver_reset_request(j);
    if (strcmp(method, "GET") && strcmp(method, "HEAD") && strcmp(method, "DELETE")) {
        j->body = rest_body(app, j);
        if (!j->body) {
            deliver_fail(j, OUT_RETRY, "out of memory");
            return 1;
        }
    }
    if (cJSON_IsObject(hs)) {
        cJSON_ArrayForEach(h, hs) {
            if (!cJSON_IsString(h) || !header_ok(h->string) || !header_ok(h->valuestring) ||
                strchr(h->string, ':') || !strcasecmp(h->string, "X-Idempotency-Key") ||
                !strcasecmp(h->string, "X-Signature") || !strcasecmp(h->string, "Content-Length") ||
                !strcasecmp(h->string, "Host"))
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

int deliver_rest_done(aw *app, job *j, CURLcode rc)
{
    (void)app;
    deliver_classify(j, rc, rest_timeout(j));
    cJSON_Delete(j->response);
    j->response = cJSON_CreateObject();
    if (j->response) {
        if (j->status)
            cJSON_AddNumberToObject(j->response, "status", (double)j->status);
        if (j->resp.len)
            cJSON_AddItemToObject(j->response, "body", deliver_body_json(j, 4096));
    }
    return 1;
}
