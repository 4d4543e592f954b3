/* rtroutes: see rtroutes.h. */
#include "rtroutes.h"

#include <string.h>

static const rt_route routes[] = {
    {"GET", "/healthz", rt_h_healthz},
    {"GET", "/readyz", rt_h_readyz},
    {"POST", "/internal/v1/runs", rt_h_run_create},
    {"GET", "/internal/v1/runs/{id}", rt_h_run_get},
    {"POST", "/internal/v1/runs/{id}/events", rt_h_run_append},
    {"GET", "/internal/v1/runs/{id}/receipt", rt_h_run_receipt},
    {"GET", "/internal/v1/runs/{id}/replay", rt_h_run_replay},
    {"GET", "/internal/v1/projectors/run-summary/{id}", rt_h_run_summary},
    {"GET", "/internal/v1/projectors/checkpoints/{id}", rt_h_run_checkpoint},
    {"GET", "/internal/v1/projectors/drift", rt_h_drift},
    {"POST", "/internal/v1/workers", rt_h_worker_register},
    {"GET", "/internal/v1/workers", rt_h_worker_list},
    {"GET", "/internal/v1/workers/{id}", rt_h_worker_get},
    {"POST", "/internal/v1/workers/{id}/heartbeat", rt_h_worker_heartbeat},
    {"POST", "/internal/v1/workers/{id}/status", rt_h_worker_status},
    {"GET", "/internal/v1/workers/{id}/checkpoint", rt_h_worker_checkpoint},
    {"GET", "/internal/v1/khala/topics/{topic}/messages", rt_h_khala_poll},
};

/* Copies a segment of n bytes. libwebsockets has %XX-decoded the path
 * already (a %2F is a '/' by now, so a segment never holds one); decoding
 * it again made a%2541 the worker aA instead of a%41, and a%25b a byte
 * that is not UTF-8. Returns -1 when it is empty or does not fit. */
static int copy_segment(const char *s, size_t n, char *out, size_t outlen)
{
    if (n == 0 || n >= outlen)
        return -1;
    memcpy(out, s, n);
    out[n] = '\0';
    return 0;
}

/* Matches path against pattern; 1 on a match (capture in pp). */
static int match(const char *pattern, const char *path, rt_params *pp)
{
    while (*pattern && *path) {
        if (*pattern == '{') {
            const char *close = strchr(pattern, '}');
            const char *seg_end = strchr(path, '/');
            size_t n = seg_end ? (size_t)(seg_end - path) : strlen(path);

            if (!close)
                return 0;
            pp->name = pattern[1] == 'i' ? "id" : "topic";
            if (copy_segment(path, n, pp->value, sizeof(pp->value)) < 0)
                return 0;
            pattern = close + 1;
            path += n;
            continue;
        }
        if (*pattern != *path)
            return 0;
        pattern++;
        path++;
    }
    return *pattern == '\0' && *path == '\0';
}

const rt_route *rt_route_match(const char *method, const char *path, rt_params *pp, int *status)
{
    size_t i;
    int path_seen = 0;
    const char *m = strcmp(method, "HEAD") == 0 ? "GET" : method;

    pp->name = NULL;
    pp->value[0] = '\0';
    for (i = 0; i < sizeof(routes) / sizeof(routes[0]); i++) {
        if (!match(routes[i].pattern, path, pp))
            continue;
        if (strcmp(routes[i].method, m) == 0)
            return &routes[i];
        path_seen = 1;
    }
    *status = path_seen ? 405 : 404;
    return NULL;
}

int rt_route_ws_topic(const char *path, char *topic, size_t topiclen)
{
    static const char prefix[] = "/internal/v1/khala/topics/";
    size_t n = strlen(path), plen = sizeof(prefix) - 1;

    if (n <= plen + 3 || strncmp(path, prefix, plen) != 0 || strcmp(path + n - 3, "/ws") != 0)
        return -1;
    if (memchr(path + plen, '/', n - plen - 3))
        return -1;
    return copy_segment(path + plen, n - plen - 3, topic, topiclen);
}
