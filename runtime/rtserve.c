/* rtserve over libshared's httpd (libmicrohttpd): handlers run on its
 * worker threads, which may block on the database. */
#include "rtserve.h"

#include <stdlib.h>
#include <string.h>

#include "httpd.h"
#include "rtroutes.h"

struct rtserve {
    rt *r;
    httpd *http;
};

typedef struct {
    rt_req q;
    httpd_req *hr;
    rt_params pp;
} glue;

static const char *g_header(const rt_req *q, const char *name)
{
    return httpd_req_header(((const glue *)q)->hr, name);
}

static const char *g_query(const rt_req *q, const char *name)
{
    return httpd_req_query(((const glue *)q)->hr, name);
}

static const char *g_param(const rt_req *q, const char *name)
{
    const glue *g = (const glue *)q;

    return g->pp.name && strcmp(g->pp.name, name) == 0 ? g->pp.value : NULL;
}

static void send_answer(httpd_req *hr, rt_resp *a)
{
    if (a->retry_after[0])
        httpd_req_add_header(hr, "Retry-After", a->retry_after);
    if (a->json) {
        if (a->status >= 400 && cJSON_GetObjectItemCaseSensitive(a->json, "error") &&
            !cJSON_GetObjectItemCaseSensitive(a->json, "request_id"))
            cJSON_AddStringToObject(a->json, "request_id", httpd_req_id(hr));
        httpd_respond_json(hr, a->status, a->json);
    } else if (a->raw) {
        httpd_respond_take(hr, a->status, a->ctype ? a->ctype : "application/octet-stream", a->raw, a->raw_len);
    } else {
        httpd_respond_error(hr, 500, "internal", "handler did not answer", NULL);
    }
}

static void dispatch(httpd_req *hr, void *ud)
{
    rtserve *s = ud;
    glue g;
    rt_resp a;
    const rt_route *route;
    int status = 404;

    memset(&a, 0, sizeof(a));
    route = rt_route_match(httpd_req_method(hr), httpd_req_path(hr), &g.pp, &status);
    if (!route) {
        httpd_respond_error(hr, status, NULL, status == 405 ? "method not allowed here" : "no such route", NULL);
        return;
    }
    g.q.header = g_header;
    g.q.query = g_query;
    g.q.param = g_param;
    g.q.body = httpd_req_body(hr, &g.q.body_len);
    g.q.tr = hr;
    g.hr = hr;
    route->fn(s->r, &g.q, &a);
    send_answer(hr, &a);
}

rtserve *rtserve_new(rt *r, const char *host, int port, int threads, char *err, size_t errlen)
{
    rtserve *s = calloc(1, sizeof(*s));
    httpd_opts ho;
    static const char *const methods[] = {"GET", "POST", "PUT", "PATCH", "DELETE"};
    size_t i;

    if (!s)
        return NULL;
    memset(&ho, 0, sizeof(ho));
    ho.service = "runtime";
    ho.host = host;
    ho.port = port;
    ho.threads = threads;
    ho.access_log = 1;
    ho.metrics = r->m;
    s->r = r;
    s->http = httpd_new(&ho, err, errlen);
    if (!s->http || httpd_route_metrics(s->http) < 0)
        goto fail;
    for (i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
        if (httpd_route(s->http, methods[i], "/{path...}", dispatch, s) < 0)
            goto fail;
    return s;
fail:
    rtserve_free(s);
    return NULL;
}

int rtserve_start(rtserve *s, char *err, size_t errlen)
{
    return httpd_start(s->http, err, errlen);
}

int rtserve_port(const rtserve *s)
{
    return httpd_port(s->http);
}

void rtserve_stop(rtserve *s, int grace_ms)
{
    httpd_stop(s->http, grace_ms);
}

void rtserve_free(rtserve *s)
{
    if (!s)
        return;
    httpd_free(s->http);
    free(s);
}
