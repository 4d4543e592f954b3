#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "fmt.h"
#include "jsonstr.h"

#define LOG_LINE_MAX 8192

static char log_service[64] = "ae";
static int log_threshold = LOG_INFO;
static int log_json = 1;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

int log_level_parse(const char *name)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp(name, level_names[i]) == 0)
            return i;
    if (strcasecmp(name, "warning") == 0)
        return LOG_WARN;
    return -1;
}

int log_init(const char *service, const char *level, const char *format)
{
    int lvl = log_threshold, json = log_json;

    if (level) {
        lvl = log_level_parse(level);
        if (lvl < 0)
            return -1;
    }
    if (format) {
        if (strcasecmp(format, "json") == 0)
            json = 1;
        else if (strcasecmp(format, "text") == 0 || strcasecmp(format, "pretty") == 0)
            json = 0;
        else
            return -1;
    }
    if (service)
        snprintf(log_service, sizeof(log_service), "%s", service);
    log_threshold = lvl;
    log_json = json;
    return 0;
}

int log_enabled(log_level lvl)
{
    return (int)lvl <= log_threshold;
}

char *log_escape(char *dst, size_t dstlen, const char *src)
{
    return jsonstr_into(dst, dstlen, src);
}

/* Clamps snprintf's would-be length to what the buffer holds. */
static size_t log_advance(size_t used, int added, size_t cap)
{
    if (added < 0)
        return used;
    used += (size_t)added;
    return used >= cap ? cap - 1 : used;
}

static void log_vwrite(log_level lvl, const char *msg, const char *fields_fmt, va_list ap)
{
    char line[LOG_LINE_MAX], ts[40], emsg[2048];
    size_t n = 0, cap = sizeof(line) - 2;

    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    if (log_json) {
        n = log_advance(n, snprintf(line, cap, "{\"ts\":\"%s\",\"level\":\"%s\",\"service\":\"%s\",\"msg\":\"%s\"",
                                    ts, level_names[lvl], log_service,
                                    log_escape(emsg, sizeof(emsg), msg)), cap);
        if (fields_fmt && *fields_fmt) {
            line[n] = ',';
            n = log_advance(n + 1, vsnprintf(line + n + 1, cap - n - 1, fields_fmt, ap), cap);
        }
        line[n++] = '}';
    } else {
        n = log_advance(n, snprintf(line, cap, "%s %-5s %s: %s", ts, level_names[lvl], log_service, msg), cap);
        if (fields_fmt && *fields_fmt) {
            line[n] = ' ';
            n = log_advance(n + 1, vsnprintf(line + n + 1, cap - n - 1, fields_fmt, ap), cap);
        }
    }
    line[n++] = '\n';
    /* One write keeps concurrent lines whole; a short write is not retried
     * because logging must never block the service on a full pipe. */
    if (write(STDERR_FILENO, line, n) < 0)
        return;
}

void log_event(log_level lvl, const char *msg, const char *fields_fmt, ...)
{
    va_list ap;

    if (!log_enabled(lvl))
        return;
    va_start(ap, fields_fmt);
    log_vwrite(lvl, msg, fields_fmt, ap);
    va_end(ap);
}

void log_msgf(log_level lvl, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;

    if (!log_enabled(lvl))
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    log_event(lvl, msg, NULL);
}
