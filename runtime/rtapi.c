/* rtapi: helpers every handler file uses, and the health routes. */
#include "rt.h"

#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"
#include "jget.h"
#include "fmt.h"
#include "log.h"
#include "svc.h"

void rt_error(rt_resp *a, int status, const char *code, const char *message)
{
    a->status = status;
    a->json = cJSON_CreateObject();
    cJSON_AddStringToObject(a->json, "error", code);
    cJSON_AddStringToObject(a->json, "message", message);
}

void rt_db_unavailable(rt_resp *a)
{
    rt_error(a, 503, "unavailable", "the database is unavailable; retry");
}

void rt_db_error(rt_resp *a, const char *what, const char *id, const char *err)
{
    char eid[2 * RT_TOPIC_MAX], eerr[1024];

    /* The reason stays in the log, not in the answer: it may name tables
     * and values. The id is a client's and the reason the server's, so
     * both are escaped into their fields. */
    log_event(LOG_WARN, "database call failed", "\"what\":\"%s\",\"id\":\"%s\",\"error\":\"%s\"", what,
              log_escape(eid, sizeof(eid), id ? id : ""), log_escape(eerr, sizeof(eerr), err ? err : ""));
    rt_db_unavailable(a);
}

void rt_publish_refused(rt *r, const char *topic, long retry, rt_resp *a)
{
    khala_class cls = khala_topic_class(topic);

    rt_error(a, 429, "rate_limited", "khala publish rate limit exceeded");
    cJSON_AddStringToObject(a->json, "reason_code", "khala_publish_rate_limited");
    cJSON_AddNumberToObject(a->json, "retry_after_ms", (double)retry);
    cJSON_AddStringToObject(a->json, "topic", topic);
    cJSON_AddStringToObject(a->json, "topic_class", khala_class_name(cls));
    cJSON_AddNumberToObject(a->json, "max_publish_per_second", (double)r->cfg.limits[cls].publish_per_second);
    snprintf(a->retry_after, sizeof(a->retry_after), "1");
}

int rt_publish_check(rt *r, const char *topic, size_t payload_bytes, rt_resp *a, long long *rate_ms,
                         long *retry_ms)
{
    khala_class cls = khala_topic_class(topic);
    const khala_limits *l = &r->cfg.limits[cls];
    long long now = svc_now_ms();

    if ((long)payload_bytes > l->max_payload_bytes) {
        rt_error(a, 413, "payload_too_large", "khala frame payload exceeds configured limit");
        cJSON_AddStringToObject(a->json, "reason_code", "khala_frame_payload_too_large");
        cJSON_AddStringToObject(a->json, "topic", topic);
        cJSON_AddStringToObject(a->json, "topic_class", khala_class_name(cls));
        cJSON_AddNumberToObject(a->json, "payload_bytes", (double)payload_bytes);
        cJSON_AddNumberToObject(a->json, "max_payload_bytes", (double)l->max_payload_bytes);
        return 1;
    }
    if (khala_rate_take(r->rate, topic, l->publish_per_second, now, retry_ms) < 0)
        return -1;
    *rate_ms = now;
    return 0;
}

void rt_publish_give(rt *r, const char *topic, long long rate_ms)
{
    if (rate_ms)
        khala_rate_give(r->rate, topic, rate_ms);
}

int rt_writes_frozen(rt *r, rt_resp *a)
{
    if (r->cfg.writes_enabled)
        return 0;
    rt_error(a, 503, "write_path_frozen", "");
    cJSON_ReplaceItemInObject(a->json, "message",
                              cJSON_CreateString(strcmp(r->cfg.write_mode, "read_only") == 0
                                                     ? "runtime authority is read_only: writes are frozen"
                                                     : "runtime authority is shadow_only: writes are frozen"));
    return -1;
}

int rt_body_object(const rt_req *q, cJSON **out, int allow_empty, rt_resp *a)
{
    const char *why;
    char msg[160];
    size_t i;

    *out = NULL;
    for (i = 0; i < q->body_len && isspace((unsigned char)q->body[i]); i++)
        ;
    if (i == q->body_len) {
        if (allow_empty) {
            *out = cJSON_CreateObject();
            return 0;
        }
        rt_error(a, 400, "invalid_request", "request body is empty: expected a JSON object");
        return -1;
    }
    if (!(*out = jget_parse(q->body, q->body_len, &i, &why))) {
        snprintf(msg, sizeof(msg), "%s at byte %zu", why, i);
        rt_error(a, 400, "invalid_request", msg);
        return -1;
    }
    if (!cJSON_IsObject(*out)) {
        cJSON_Delete(*out);
        *out = NULL;
        rt_error(a, 400, "invalid_request", "request body must be a JSON object");
        return -1;
    }
    return 0;
}

int rt_is_uuid(const char *s)
{
    int i;

    if (!s || strlen(s) != 36)
        return 0;
    for (i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return 0;
        } else if (!isxdigit((unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

void rt_topic_canonical(char *topic)
{
    char id[37];
    int i;

    if (strlen(topic) != 4 + 36 + 7 || strncmp(topic, "run:", 4) != 0 || strcmp(topic + 40, ":events") != 0)
        return;
    memcpy(id, topic + 4, 36);
    id[36] = '\0';
    if (!rt_is_uuid(id))
        return;
    for (i = 4; i < 40; i++)
        topic[i] = (char)tolower((unsigned char)topic[i]);
}

/* Event types are chosen by clients: the first 64 get their own series,
 * the rest share "other", so a client cannot grow the registry. */
#define RT_TYPES_MAX 64

void rt_count_append(rt *r, const char *event_type)
{
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static char names[RT_TYPES_MAX][64];
    static metrics_counter *counters[RT_TYPES_MAX];
    static metrics_counter *other;
    static int n;
    metrics_counter *c = NULL;
    char labels[160], esc[128];
    int i;

    pthread_mutex_lock(&mu);
    for (i = 0; i < n; i++)
        if (strcmp(names[i], event_type) == 0) {
            c = counters[i];
            break;
        }
    if (!c && n < RT_TYPES_MAX && strlen(event_type) < sizeof(names[0])) {
        snprintf(labels, sizeof(labels), "event_type=\"%s\"", metrics_escape_label(esc, sizeof(esc), event_type));
        c = metrics_counter_get(r->m, "runtime_appends_total", "Events appended to run logs, by event type.", labels);
        if (c) {
            fmt_copy(names[n], sizeof(names[0]), event_type);
            counters[n++] = c;
        }
    }
    if (!c) {
        if (!other)
            other = metrics_counter_get(r->m, "runtime_appends_total", "Events appended to run logs, by event type.",
                                        "event_type=\"other\"");
        c = other;
    }
    pthread_mutex_unlock(&mu);
    metrics_counter_inc(c);
}

void rt_h_healthz(rt *r, const rt_req *q, rt_resp *a)
{
    (void)q;
    a->status = 200;
    a->json = cJSON_CreateObject();
    cJSON_AddStringToObject(a->json, "status", "ok");
    cJSON_AddStringToObject(a->json, "service", r->cfg.service_name);
    cJSON_AddStringToObject(a->json, "build_sha", r->cfg.build_sha);
    cJSON_AddNumberToObject(a->json, "uptime_seconds", (double)((svc_now_ms() - r->started_ms) / 1000));
    cJSON_AddStringToObject(a->json, "authority_write_mode", r->cfg.write_mode);
    cJSON_AddBoolToObject(a->json, "authority_writer_active", r->cfg.writes_enabled);
    cJSON_AddStringToObject(a->json, "fanout_driver", "postgres");
    cJSON_AddBoolToObject(a->json, "db_configured", 1);
}

void rt_h_readyz(rt *r, const rt_req *q, rt_resp *a)
{
    int ok = health_ok(r->health);

    (void)q;
    a->status = ok ? 200 : 503;
    a->json = cJSON_CreateObject();
    cJSON_AddStringToObject(a->json, "status", ok ? "ready" : "not_ready");
    /* Every part of the authority lives in PostgreSQL: each is ready when
     * the database answers. */
    cJSON_AddBoolToObject(a->json, "authority_ready", ok);
    cJSON_AddBoolToObject(a->json, "projector_ready", ok);
    cJSON_AddBoolToObject(a->json, "workers_ready", ok);
    cJSON_AddBoolToObject(a->json, "authority_writer_active", r->cfg.writes_enabled);
    cJSON_AddStringToObject(a->json, "fanout_driver", "postgres");
    cJSON_AddStringToObject(a->json, "database", ok ? "connected" : "disconnected");
}
