/* runtime-smoke: checks a running runtime from outside, as a deploy step
 * would: healthz, readyz, create a run, append an event, read it back.
 * Exits 0 only when every step passes. */
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "cfg.h"
#include "log.h"

#define SMOKE_BODY_MAX (256 * 1024)

typedef struct {
    char buf[SMOKE_BODY_MAX];
    size_t len;
} smoke_body;

static size_t smoke_write(char *data, size_t size, size_t n, void *ud)
{
    smoke_body *b = ud;
    size_t len = size * n;

    if (b->len + len >= sizeof(b->buf))
        return 0;
    memcpy(b->buf + b->len, data, len);
    b->len += len;
    b->buf[b->len] = '\0';
    return len;
}

/* Performs one request; returns the HTTP status or -1. */
static long smoke_request(const char *base, const char *method, const char *path, const char *json, smoke_body *out)
{
    char url[2048];
    long status = -1;
    struct curl_slist *hdrs = NULL;
    CURL *h = curl_easy_init();

    if (!h)
        return -1;
    out->len = 0;
    out->buf[0] = '\0';
    snprintf(url, sizeof(url), "%s%s", base, path);
    hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, smoke_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, out);
    if (json)
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, json);
    if (curl_easy_perform(h) == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(hdrs);
    curl_easy_cleanup(h);
    return status;
}

static int smoke_step(const char *name, long status, long want, const smoke_body *b)
{
    if (status == want) {
        printf("ok   %s\n", name);
        return 0;
    }
    printf("FAIL %s: HTTP %ld (want %ld) %.200s\n", name, status, want, b->buf);
    return -1;
}

int main(void)
{
    static smoke_body body;
    char path[512], run_id[128] = "";
    const char *base;
    int failures = 0;
    cfg *c = cfg_boot("runtime-smoke");

    if (!c)
        return 2;
    base = cfg_str(c, "SMOKE_BASE_URL", "http://127.0.0.1:4100");
    curl_global_init(CURL_GLOBAL_DEFAULT);
    failures += smoke_step("healthz", smoke_request(base, "GET", "/healthz", NULL, &body), 200, &body) < 0;
    failures += smoke_step("readyz", smoke_request(base, "GET", "/readyz", NULL, &body), 200, &body) < 0;
    if (smoke_step("create run", smoke_request(base, "POST", "/internal/v1/runs", "{}", &body), 201, &body) == 0) {
        cJSON *json = cJSON_Parse(body.buf);
        const cJSON *id = cJSON_GetObjectItem(cJSON_GetObjectItem(json, "run"), "id");
        if (cJSON_IsString(id))
            snprintf(run_id, sizeof(run_id), "%s", id->valuestring);
        cJSON_Delete(json);
    }
    if (!run_id[0]) {
        failures++;
    } else {
        snprintf(path, sizeof(path), "/internal/v1/runs/%s/events", run_id);
        failures += smoke_step("append", smoke_request(base, "POST", path, "{\"event_type\":\"run.progress\"}", &body),
                               200, &body) < 0;
        snprintf(path, sizeof(path), "/internal/v1/runs/%s", run_id);
        failures += smoke_step("read back", smoke_request(base, "GET", path, NULL, &body), 200, &body) < 0;
    }
    curl_global_cleanup();
    cfg_free(c);
    printf("%s\n", failures ? "smoke: FAILED" : "smoke: passed");
    return failures ? 1 : 0;
}
