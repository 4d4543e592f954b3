/* sse_routes: publishing to a client over HTTP (POST /internal/v1/sse/{id})
 * and the human-in-the-loop answers (POST /api/v1/events/{id}/response).
 * The stream itself is sse_hub.c's. */
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "apiutil.h"
#include "fmt.h"
#include "sse.h"

#define SSE_QUESTION_ID_MAX 256

/* Bearer $INTERNAL_TOKEN, compared in constant time. */
static int internal_auth(httpd_req *req, sse *s)
{
    const char *h = httpd_req_header(req, "Authorization");

    if (!h || strncmp(h, "Bearer ", 7) != 0 || !apiutil_secret_eq(h + 7, sse_cfg(s)->internal_token)) {
        httpd_respond_error(req, 401, "unauthorized", "Authorization: Bearer $INTERNAL_TOKEN is required", NULL);
        return -1;
    }
    return 0;
}

static void publish_handler(httpd_req *req, void *ud)
{
    sse *s = ud;
    const char *cid = httpd_req_param(req, "client_id");
    const char *key = httpd_req_header(req, "Idempotency-Key");
    cJSON *body = NULL, *type, *out;
    rconn *r;
    long long id;
    int replayed = 0;
    char ids[FMT_I64_MAX];

    if (internal_auth(req, s) < 0)
        return;
    if (!cid || !sse_client_id_ok(cid)) {
        httpd_respond_error(req, 400, "invalid_request", "client_id must be 1-128 of A-Z a-z 0-9 _ . -", NULL);
        return;
    }
    if (key && !sse_idem_key_ok(key)) {
        httpd_respond_error(req, 400, "invalid_request", "Idempotency-Key must be 1-255 printable ASCII characters",
                            NULL);
        return;
    }
    if (httpd_req_json(req, &body) < 0)
        return;
    type = cJSON_GetObjectItemCaseSensitive(body, "event_type");
    if (!cJSON_IsObject(body) || !cJSON_IsString(type) || !sse_event_type_ok(type->valuestring)) {
        cJSON *d = cJSON_CreateObject();

        cJSON_AddStringToObject(d, "event_type", "required: 1-64 of A-Z a-z 0-9 _ . : - (not heartbeat, "
                                                 "connection.established or stream.reset)");
        httpd_respond_error(req, 400, "invalid_request", "invalid event", d);
        cJSON_Delete(body);
        return;
    }
    r = sse_store_conn(s);
    if (!r || sse_publish(s, r, cid, type->valuestring, cJSON_GetObjectItemCaseSensitive(body, "data"), key, &id,
                          &replayed) < 0) {
        httpd_respond_error(req, 503, "unavailable", "the event store (Redis) is unavailable", NULL);
        cJSON_Delete(body);
        return;
    }
    cJSON_Delete(body);
    fmt_i64(ids, id);
    out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "id", ids);
    if (replayed) /* as Stripe and the IETF draft's examples say it: nothing new was stored */
        httpd_req_add_header(req, "Idempotent-Replayed", "true");
    httpd_respond_json(req, 202, out);
}

/* Object members sorted by name, recursively, so that two answers equal as
 * JSON are equal as text whatever their members' order. */
static void json_sort(cJSON *j)
{
    cJSON *sorted = NULL;

    if (!cJSON_IsObject(j) && !cJSON_IsArray(j))
        return;
    for (cJSON *c = j->child; c; c = c->next)
        json_sort(c);
    if (!cJSON_IsObject(j))
        return;
    /* Insertion sort of the member list: answers are small. */
    while (j->child) {
        cJSON *c = j->child, **pp = &sorted;

        j->child = c->next;
        while (*pp && strcmp((*pp)->string, c->string) <= 0)
            pp = &(*pp)->next;
        c->next = *pp;
        *pp = c;
    }
    j->child = sorted;
    for (cJSON *c = sorted, *prev = NULL; c; prev = c, c = c->next)
        c->prev = prev;
    if (sorted) {
        cJSON *lastc = sorted;

        while (lastc->next)
            lastc = lastc->next;
        sorted->prev = lastc; /* cJSON keeps the last member in the first's prev */
    }
}

static void response_handler(httpd_req *req, void *ud)
{
    sse *s = ud;
    const char *cid = httpd_req_param(req, "client_id");
    cJSON *body = NULL, *qid, *answer, *d;
    char *text;
    rconn *r;
    int rc;

    if (!cid || !sse_client_id_ok(cid)) {
        httpd_respond_error(req, 400, "invalid_request", "client_id must be 1-128 of A-Z a-z 0-9 _ . -", NULL);
        return;
    }
    if (httpd_req_json(req, &body) < 0)
        return;
    qid = cJSON_GetObjectItemCaseSensitive(body, "question_id");
    answer = cJSON_GetObjectItemCaseSensitive(body, "answer");
    d = cJSON_CreateObject();
    if (!cJSON_IsObject(body)) {
        cJSON_AddStringToObject(d, "body", "must be an object {question_id, answer}");
    } else {
        if (!cJSON_IsString(qid) || !qid->valuestring[0] || strlen(qid->valuestring) > SSE_QUESTION_ID_MAX)
            cJSON_AddStringToObject(d, "question_id", "required: a string of 1-256 bytes");
        if (!answer)
            cJSON_AddStringToObject(d, "answer", "required (any JSON value)");
    }
    if (d->child) {
        httpd_respond_error(req, 400, "invalid_request", "invalid response", d);
        cJSON_Delete(body);
        return;
    }
    cJSON_Delete(d);
    json_sort(answer);
    text = cJSON_PrintUnformatted(answer);
    r = sse_store_conn(s);
    rc = text && r ? sse_store_answer(s, r, cid, qid->valuestring, text, sse_hub_has(s, cid)) : SSE_ANSWER_FAILED;
    free(text);
    cJSON_Delete(body);
    switch (rc) {
    case SSE_ANSWER_STORED:
    case SSE_ANSWER_RETRY: {
        cJSON *o = cJSON_CreateObject();

        cJSON_AddStringToObject(o, "status", "ok");
        cJSON_AddStringToObject(o, "message", "Response received");
        httpd_respond_json(req, 200, o);
        break;
    }
    case SSE_ANSWER_CONFLICT:
        httpd_respond_error(req, 409, "conflict", "this question was already answered differently; the first answer stands",
                            NULL);
        break;
    case SSE_ANSWER_UNKNOWN_CLIENT:
        httpd_respond_error(req, 404, "not_found", "no such client: it is neither connected nor buffered", NULL);
        break;
    default:
        httpd_respond_error(req, 503, "unavailable", "the event store (Redis) is unavailable", NULL);
    }
}

int sse_routes(sse *s, httpd *srv)
{
    if (httpd_route(srv, "GET", "/api/v1/events/{client_id}", sse_stream_handler, s) < 0 ||
        httpd_route(srv, "POST", "/api/v1/events/{client_id}/response", response_handler, s) < 0 ||
        httpd_route(srv, "POST", "/internal/v1/sse/{client_id}", publish_handler, s) < 0)
        return -1;
    return 0;
}
