/* deliver: what every kind of action shares: the libcurl request set-up,
 * the HTTP outcome rules and the dispatch to the kind's own module. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "aw.h"
#include "log.h"
#include "queue.h"

/* CA_BUNDLE, set once by deliver_init before the threads start. */
static char ca_bundle[1024];

void deliver_init(const char *path)
{
    snprintf(ca_bundle, sizeof(ca_bundle), "%s", path ? path : "");
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud)
{
    job *j = ud;

    /* Past the buffer's maximum, bytes are counted and dropped: the
     * response is read to its end so the connection stays reusable. */
    if (buf_append(&j->resp, data, size * nmemb) < 0)
        return 0;
    return size * nmemb;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ud)
{
    job *j = ud;
    size_t n = size * nmemb, k;
    const char *v;
    char *dst = NULL;
    size_t dstlen = 0;

    if (n > 14 && !strncasecmp(data, "content-type:", 13)) {
        v = data + 13;
        dst = j->ctype;
        dstlen = sizeof(j->ctype);
    } else if (n > 15 && !strncasecmp(data, "mcp-session-id:", 15)) {
        v = data + 15;
        dst = j->session;
        dstlen = sizeof(j->session);
    } else if (n > 12 && !strncasecmp(data, "retry-after:", 12)) {
        char tmp[32], *end;
        long s;

        v = data + 12;
        while (v < data + n && *v == ' ')
            v++;
        k = (size_t)(data + n - v);
        if (k >= sizeof(tmp))
            k = sizeof(tmp) - 1;
        memcpy(tmp, v, k);
        tmp[k] = '\0';
        s = strtol(tmp, &end, 10);
        if (end != tmp && s >= 0 && s < 86400)
            j->retry_after_hdr = s;
        return n;
    } else {
        return n;
    }
    while (v < data + n && (*v == ' ' || *v == '\t'))
        v++;
    k = (size_t)(data + n - v);
    while (k && (v[k - 1] == '\r' || v[k - 1] == '\n' || v[k - 1] == ' '))
        k--;
    if (k >= dstlen)
        k = dstlen - 1;
    memcpy(dst, v, k);
    dst[k] = '\0';
    return n;
}

void deliver_header_line(void *job_ptr, const char *line, size_t n)
{
    on_header((char *)(uintptr_t)line, 1, n, job_ptr);
}

void deliver_reset_request(job *j)
{
    curl_slist_free_all(j->hdrs);
    j->hdrs = NULL;
    free(j->body);
    j->body = NULL;
    buf_reset(&j->resp);
    j->status = 0;
    j->ctype[0] = '\0';
    j->retry_after_hdr = -1;
    j->curl_err[0] = '\0';
    buf_free(&j->req);
    j->native = 0;
    j->tls = 0;
}

int deliver_header(job *j, const char *fmt, ...)
{
    char line[2048];
    struct curl_slist *n;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    n = curl_slist_append(j->hdrs, line);
    if (!n)
        return -1;
    j->hdrs = n;
    return 0;
}

int deliver_setup(job *j, const char *method, const char *url, const char *body, long timeout_ms,
                  const char *resolve, size_t max_resp)
{
    CURL *e = j->easy;
    struct curl_slist *res = NULL;

    if (!e) {
        e = j->easy = curl_easy_init();
        if (!e)
            return -1;
    } else {
        curl_easy_reset(e);
    }
    buf_free(&j->resp);
    buf_init(&j->resp, max_resp);
    j->status = 0;
    j->ctype[0] = '\0';
    j->retry_after_hdr = -1;
    j->curl_err[0] = '\0';
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, j->curl_err);
    curl_easy_setopt(e, CURLOPT_PRIVATE, j);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 10000 ? timeout_ms : 10000L);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, j);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, j);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "erc8004-action-workers/" AW_VERSION);
    /* Redirects are not followed: the target check would not see where they
     * lead. A 3xx is reported like any other non-2xx answer. */
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    /* Peers are verified, always: there is no setting that turns this off
     * (a private CA goes in CA_BUNDLE instead). These are libcurl's
     * defaults, set here so that no default elsewhere can change them. */
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    if (ca_bundle[0])
        curl_easy_setopt(e, CURLOPT_CAINFO, ca_bundle);
    /* No proxy, whatever http_proxy/https_proxy/ALL_PROXY say: a proxy
     * would connect to the host by name, not to the address the target
     * check pinned. */
    curl_easy_setopt(e, CURLOPT_PROXY, "");    if (resolve && *resolve) {
        res = curl_slist_append(NULL, resolve);
        if (!res)
            return -1;
        curl_easy_setopt(e, CURLOPT_RESOLVE, res);
    }
    if (!strcmp(method, "GET"))
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    else if (!strcmp(method, "POST") || body) {
        curl_easy_setopt(e, CURLOPT_POST, 1L);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, body ? body : "");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)(body ? strlen(body) : 0));
        if (strcmp(method, "POST"))
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    } else if (!strcmp(method, "HEAD"))
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    else
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, j->hdrs);
    if (res) {
        /* The list must stay valid until the transfer is done. */
        curl_slist_free_all(j->resolve_list);
        j->resolve_list = res;
    }
    return 0;
}

void deliver_fail(job *j, outcome out, const char *fmt, ...)
{
    va_list ap;

    j->out = out;
    va_start(ap, fmt);
    vsnprintf(j->err, sizeof(j->err), fmt, ap);
    va_end(ap);
}

void deliver_classify(job *j, CURLcode rc, long timeout_ms)
{
    if (rc != CURLE_OK) {
        size_t n = strlen(j->curl_err);

        while (n && (j->curl_err[n - 1] == '\n' || j->curl_err[n - 1] == ' '))
            j->curl_err[--n] = '\0';
        if (rc == CURLE_OPERATION_TIMEDOUT)
            deliver_fail(j, OUT_RETRY, "timeout after %ld ms", timeout_ms);
        else if (rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CACERT_BADFILE)
            /* The detail says which check failed (unknown CA, host name,
             * expiry); the generic text alone does not. */
            deliver_fail(j, OUT_RETRY, "TLS certificate not verified: %s",
                         n ? j->curl_err : curl_easy_strerror(rc));
        else if (n)
            deliver_fail(j, OUT_RETRY, "%s: %s", curl_easy_strerror(rc), j->curl_err);
        else
            deliver_fail(j, OUT_RETRY, "%s", curl_easy_strerror(rc));
        j->breaker_fail = 1;
        return;
    }
    /* h1 requests carry their status in j->status already. */
    if (!j->native)
        curl_easy_getinfo(j->easy, CURLINFO_RESPONSE_CODE, &j->status);
    if (j->status >= 200 && j->status < 300) {
        j->out = OUT_SUCCESS;
        j->err[0] = '\0';
        j->breaker_fail = -1;
    } else if (j->status == 408 || j->status == 429 || j->status >= 500) {
        deliver_fail(j, OUT_RETRY, "HTTP %ld", j->status);
        j->breaker_fail = j->status == 429 ? 0 : 1;
        if (j->retry_after_hdr >= 0)
            j->delay_ms = j->retry_after_hdr * 1000;
    } else {
        deliver_fail(j, OUT_FINAL, "HTTP %ld", j->status);
        j->breaker_fail = -1;
    }
}

cJSON *deliver_body_json(const job *j, size_t max)
{
    cJSON *v = NULL;
    const char *s = buf_str(&j->resp);

    if (j->resp.len && !j->resp.truncated)
        v = cJSON_Parse(s);
    if (!v) {
        char *tmp;

        if (j->resp.len <= max)
            return cJSON_CreateString(s);
        tmp = strndup(s, max);
        v = cJSON_CreateString(tmp ? tmp : "");
        free(tmp);
    }
    return v;
}

const char *deliver_trigger_name(aw *app, job *j)
{
    const cJSON *t;
    PGconn *c;

    if (j->trigger_name)
        return j->trigger_name;
    t = cJSON_GetObjectItemCaseSensitive(j->doc, "trigger_name");
    if (!cJSON_IsString(t)) {
        const cJSON *tr = cJSON_GetObjectItemCaseSensitive(j->doc, "trigger");

        t = cJSON_IsObject(tr) ? cJSON_GetObjectItemCaseSensitive(tr, "name") : NULL;
    }
    if (cJSON_IsString(t)) {
        j->trigger_name = strdup(t->valuestring);
        return j->trigger_name;
    }
    if (!j->trigger_id || !app->db)
        return NULL;
    c = dbpool_acquire(app->db, 1000);
    if (c) {
        const char *p[1] = {j->trigger_id};
        PGresult *r = dbpool_exec(c, "SELECT name FROM triggers WHERE id::text = $1", 1, p, NULL, 0);

        if (r && PQntuples(r) == 1 && !PQgetisnull(r, 0, 0))
            j->trigger_name = strdup(PQgetvalue(r, 0, 0));
        if (r)
            PQclear(r);
        dbpool_release(app->db, c);
    }
    return j->trigger_name;
}

int deliver_begin(aw *app, queue *q, job *j, long long now)
{
    j->t0 = now;
    switch (j->kind) {
    case ACT_REST:
        return deliver_rest_begin(app, j);
    case ACT_TELEGRAM:
        return deliver_telegram_begin(app, q, j, now);
    case ACT_MCP:
        return deliver_mcp_begin(app, j);
    default:
        deliver_fail(j, OUT_INVALID, "unknown action type");
        return 1;
    }
}

int deliver_done(aw *app, queue *q, job *j, CURLcode rc, long long now)
{
    switch (j->kind) {
    case ACT_REST:
        return deliver_rest_done(app, j, rc);
    case ACT_TELEGRAM:
        return deliver_telegram_done(app, q, j, rc, now);
    case ACT_MCP:
        return deliver_mcp_done(app, j, rc);
    default:
        return 1;
    }
}
