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

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Copies a segment of n bytes, %XX decoded. Returns -1 when it does not
 * fit, is empty, or decodes to a NUL or a '/'. */
static int decode(const char *s, size_t n, char *out, size_t outlen)
{
    size_t i, j = 0;

    if (n == 0)
        return -1;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            int hi = i + 1 < n ? hexval(s[i + 1]) : -1, lo = i + 2 < n ? hexval(s[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return -1;
            c = (char)(hi * 16 + lo);
            if (c == '\0')
                return -1;
            i += 2;
        }
        if (j + 1 >= outlen)
            return -1;
        out[j++] = c;
    }
    out[j] = '\0';
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
            if (decode(path, n, pp->value, sizeof(pp->value)) < 0)
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
    return decode(path + plen, n - plen - 3, topic, topiclen);
}
