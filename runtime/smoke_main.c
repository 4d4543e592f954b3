/* runtime-smoke: checks a running runtime from outside, as a deploy step
 * would: healthz, readyz, create a run, append run.started and another
 * event, read the run back and check its receipt against the events.
 * Prints each step; stops with exit 1 at the first failure. */
#include <stdio.h>
#include <string.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>

#include "canonjson.h"
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

/* One step whose answer is JSON: returns it parsed (cJSON_Delete), or
 * NULL after printing the failure. */
static cJSON *smoke_json(const char *base, const char *name, const char *method, const char *path, const char *json,
                         long want, smoke_body *b)
{
    cJSON *out;

    if (smoke_step(name, smoke_request(base, method, path, json, b), want, b) < 0)
        return NULL;
    if (!(out = cJSON_Parse(b->buf)))
        printf("FAIL %s: the answer is not JSON: %.200s\n", name, b->buf);
    return out;
}

/* The trajectory hash recomputed from the events read back, as a client
 * would check a receipt. */
static int smoke_hash(const cJSON *run, char out[CANONJSON_HASH_LEN])
{
    const cJSON *e;
    cJSON *list = cJSON_CreateArray();
    int rc;

    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(run, "events")) {
        cJSON *x = cJSON_CreateObject();
        static const char *const keys[] = {"seq", "event_type", "payload", "idempotency_key", "recorded_at"};
        size_t i;

        for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
            cJSON_AddItemToObject(x, keys[i], cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(e, keys[i]), 1));
        cJSON_AddItemToArray(list, x);
    }
    rc = canonjson_sha256(list, out);
    cJSON_Delete(list);
    return rc;
}

int main(void)
{
    static smoke_body body;
    char path[512], run_id[128] = "", hash[CANONJSON_HASH_LEN] = "";
    const char *base;
    cJSON *json = NULL;
    const cJSON *id, *th, *count;
    int rc = 1;
    cfg *c = cfg_boot("runtime-smoke");

    if (!c)
        return 2;
    base = cfg_str(c, "SMOKE_BASE_URL", "http://127.0.0.1:4100");
    curl_global_init(CURL_GLOBAL_DEFAULT);
    if (smoke_step("healthz", smoke_request(base, "GET", "/healthz", NULL, &body), 200, &body) < 0 ||
        smoke_step("readyz", smoke_request(base, "GET", "/readyz", NULL, &body), 200, &body) < 0 ||
        smoke_step("create run", smoke_request(base, "POST", "/internal/v1/runs", "{\"metadata\":{\"smoke\":true}}",
                                               &body), 201, &body) < 0)
        goto out;
    json = cJSON_Parse(body.buf);
    id = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(json, "run"), "id");
    if (!cJSON_IsString(id) || strlen(id->valuestring) >= sizeof(run_id)) {
        printf("FAIL create run: no run id in %.200s\n", body.buf);
        goto out;
    }
    snprintf(run_id, sizeof(run_id), "%s", id->valuestring);
    snprintf(path, sizeof(path), "/internal/v1/runs/%s/events", run_id);
    if (smoke_step("append run.started", smoke_request(base, "POST", path,
                                                       "{\"event_type\":\"run.started\",\"payload\":{\"smoke\":1},"
                                                       "\"expected_previous_seq\":1}", &body), 200, &body) < 0 ||
        smoke_step("append event", smoke_request(base, "POST", path,
                                                 "{\"event_type\":\"smoke.step\",\"payload\":{\"ok\":true},"
                                                 "\"idempotency_key\":\"smoke-1\",\"expected_previous_seq\":2}",
                                                 &body), 200, &body) < 0)
        goto out;
    snprintf(path, sizeof(path), "/internal/v1/runs/%s", run_id);
    cJSON_Delete(json);
    if (!(json = smoke_json(base, "read back", "GET", path, NULL, 200, &body)))
        goto out;
    if (cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(json, "run"), "events")) != 3 ||
        smoke_hash(cJSON_GetObjectItemCaseSensitive(json, "run"), hash) < 0) {
        printf("FAIL read back: expected 3 events, got %.200s\n", body.buf);
        goto out;
    }
    snprintf(path, sizeof(path), "/internal/v1/runs/%s/receipt", run_id);
    cJSON_Delete(json);
    if (!(json = smoke_json(base, "receipt", "GET", path, NULL, 200, &body)))
        goto out;
    th = cJSON_GetObjectItemCaseSensitive(json, "trajectory_hash");
    count = cJSON_GetObjectItemCaseSensitive(json, "event_count");
    if (!cJSON_IsString(th) || strcmp(th->valuestring, hash) != 0 || !cJSON_IsNumber(count) || count->valuedouble != 3) {
        printf("FAIL receipt check: want trajectory_hash %s and 3 events, got %.300s\n", hash, body.buf);
        goto out;
    }
    printf("ok   receipt check\n");
    rc = 0;
out:
    cJSON_Delete(json);
    curl_global_cleanup();
    cfg_free(c);
    printf("%s\n", rc ? "smoke: FAILED" : "smoke: passed");
    return rc;
}
