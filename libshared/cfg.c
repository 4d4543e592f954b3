#include "cfg.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "redact.h"

#define CFG_ERR_MAX 4096
#define CFG_LINE_MAX 8192
/* Shortest secret accepted in production: 256 bits for an HS256 key. */
#define CFG_SECRET_MIN 32

struct cfg {
    char service[64];
    int failures;
    size_t errlen;
    char errbuf[CFG_ERR_MAX];
};

cfg *cfg_new(const char *service)
{
    cfg *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    snprintf(c->service, sizeof(c->service), "%s", service ? service : "ae");
    return c;
}

void cfg_free(cfg *c)
{
    free(c);
}

void cfg_error(cfg *c, const char *name, const char *value, const char *expected)
{
    char shown[1024];
    int n;

    c->failures++;
    if (c->errlen >= sizeof(c->errbuf) - 1)
        return;
    /* A URL or conninfo may carry a password or a token: every problem
     * report shows it masked, whichever variable it came from. */
    if (value && (strstr(value, "://") || strcasestr(value, "password") || strchr(value, '=')))
        value = redact_url(shown, sizeof(shown), value);
    n = snprintf(c->errbuf + c->errlen, sizeof(c->errbuf) - c->errlen,
                 "%s%s=\"%s\" is invalid: expected %s", c->errlen ? "\n" : "", name,
                 value ? value : "", expected);
    if (n > 0)
        c->errlen += (size_t)n;
    if (c->errlen >= sizeof(c->errbuf))
        c->errlen = sizeof(c->errbuf) - 1;
}

int cfg_failed(const cfg *c)
{
    return c->failures > 0;
}

const char *cfg_errstr(const cfg *c)
{
    return c->errbuf;
}

const char *cfg_str(cfg *c, const char *name, const char *def)
{
    const char *v = getenv(name);

    (void)c;
    return (v && *v) ? v : def;
}

static int cfg_parse_long(const char *s, long *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s)
        return -1;
    while (isspace((unsigned char)*end))
        end++;
    if (*end)
        return -1;
    *out = v;
    return 0;
}

long cfg_int(cfg *c, const char *name, long def, long min, long max)
{
    const char *v = cfg_str(c, name, NULL);
    char expected[96];
    long n;

    if (!v)
        return def;
    if (cfg_parse_long(v, &n) == 0 && n >= min && n <= max)
        return n;
    snprintf(expected, sizeof(expected), "an integer from %ld to %ld", min, max);
    cfg_error(c, name, v, expected);
    return def;
}

int cfg_bool(cfg *c, const char *name, int def)
{
    static const char *const yes[] = {"1", "true", "yes", "on", NULL};
    static const char *const no[] = {"0", "false", "no", "off", NULL};
    const char *v = cfg_str(c, name, NULL);

    if (!v)
        return def;
    for (int i = 0; yes[i]; i++)
        if (strcasecmp(v, yes[i]) == 0)
            return 1;
    for (int i = 0; no[i]; i++)
        if (strcasecmp(v, no[i]) == 0)
            return 0;
    cfg_error(c, name, v, "true or false (1/0, yes/no, on/off)");
    return def;
}

const char *cfg_enum(cfg *c, const char *name, const char *def, const char *const *allowed)
{
    const char *v = cfg_str(c, name, NULL);
    char expected[256];
    size_t n = 0;

    if (!v)
        return def;
    for (int i = 0; allowed[i]; i++)
        if (strcasecmp(v, allowed[i]) == 0)
            return allowed[i];
    expected[0] = '\0';
    for (int i = 0; allowed[i] && n < sizeof(expected); i++) {
        int w = snprintf(expected + n, sizeof(expected) - n, "%s%s", i ? "|" : "one of ", allowed[i]);
        if (w < 0)
            break;
        n += (size_t)w;
    }
    cfg_error(c, name, v, expected);
    return def;
}

long cfg_duration_ms(cfg *c, const char *name, long def_ms, long bare_unit_ms)
{
    const char *v = cfg_str(c, name, NULL);
    char *end;
    long n, mult;

    if (!v)
        return def_ms;
    errno = 0;
    n = strtol(v, &end, 10);
    if (errno || end == v || n < 0)
        goto bad;
    if (*end == '\0')
        mult = bare_unit_ms;
    else if (strcmp(end, "ms") == 0)
        mult = 1;
    else if (strcmp(end, "s") == 0)
        mult = 1000;
    else if (strcmp(end, "m") == 0)
        mult = 60000;
    else if (strcmp(end, "h") == 0)
        mult = 3600000;
    else
        goto bad;
    if (n > 0 && mult > 0 && n > 365L * 24 * 3600000 / mult)
        goto bad;
    return n * mult;
bad:
    cfg_error(c, name, v, "a duration such as 500ms, 30s, 5m or 2h");
    return def_ms;
}

int cfg_production(cfg *c)
{
    const char *env = cfg_str(c, "APP_ENV", "development");

    return strcasecmp(env, "production") == 0 || strcasecmp(env, "prod") == 0;
}

/* A placeholder that someone copied from an example file. */
static int cfg_placeholder(const char *v)
{
    return strcasestr(v, "change-me") || strcasestr(v, "changeme") || strcasestr(v, "change_me");
}

const char *cfg_secret(cfg *c, const char *name, const char *dev_default)
{
    const char *v = cfg_str(c, name, NULL);
    char shown[64];

    if (!v || strcmp(v, dev_default) == 0) {
        if (cfg_production(c)) {
            cfg_error(c, name, "<default>", "a secret of its own when APP_ENV=production");
            return dev_default;
        }
        log_warn("%s is not set: using the development default (never do this in production)", name);
        return dev_default;
    }
    /* The value itself is never shown, only its length. */
    snprintf(shown, sizeof(shown), "(%zu bytes, not shown)", strlen(v));
    if (cfg_production(c)) {
        if (strlen(v) < CFG_SECRET_MIN)
            cfg_error(c, name, shown, "a secret of at least 32 bytes when APP_ENV=production");
        else if (cfg_placeholder(v))
            cfg_error(c, name, shown, "a real secret, not a change-me placeholder, when APP_ENV=production");
    } else if (strlen(v) < CFG_SECRET_MIN || cfg_placeholder(v)) {
        log_warn("%s is shorter than %d bytes or a change-me placeholder: APP_ENV=production refuses it", name,
                 CFG_SECRET_MIN);
    }
    return v;
}

/* Removes surrounding quotes and resolves escapes in place. Returns -1 on
 * an unterminated quote. */
static int cfg_unquote(char *v)
{
    size_t len = strlen(v);
    char *o = v;

    if (len == 0)
        return 0;
    if (v[0] == '\'') {
        if (len < 2 || v[len - 1] != '\'')
            return -1;
        memmove(v, v + 1, len - 2);
        v[len - 2] = '\0';
        return 0;
    }
    if (v[0] != '"') {
        /* An unquoted value ends at " #" so trailing comments work. */
        char *hash = strstr(v, " #");
        if (hash)
            *hash = '\0';
        for (len = strlen(v); len && isspace((unsigned char)v[len - 1]); len--)
            v[len - 1] = '\0';
        return 0;
    }
    if (len < 2 || v[len - 1] != '"')
        return -1;
    v[len - 1] = '\0';
    for (const char *s = v + 1; *s; s++) {
        if (*s == '\\' && s[1]) {
            s++;
            *o++ = *s == 'n' ? '\n' : *s == 't' ? '\t' : *s;
        } else {
            *o++ = *s;
        }
    }
    *o = '\0';
    return 0;
}

static int cfg_dotenv_line(char *line, const char *path, int lineno, char *err, size_t errlen)
{
    char *p = line, *eq, *key, *val;
    size_t len = strlen(line);

    while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        line[--len] = '\0';
    while (isspace((unsigned char)*p))
        p++;
    if (*p == '\0' || *p == '#')
        return 0;
    if (strncmp(p, "export ", 7) == 0)
        p += 7;
    eq = strchr(p, '=');
    if (!eq)
        goto bad;
    *eq = '\0';
    key = p;
    val = eq + 1;
    for (len = strlen(key); len && isspace((unsigned char)key[len - 1]); len--)
        key[len - 1] = '\0';
    if (*key == '\0')
        goto bad;
    for (const char *k = key; *k; k++)
        if (!isalnum((unsigned char)*k) && *k != '_')
            goto bad;
    while (isspace((unsigned char)*val))
        val++;
    if (cfg_unquote(val) < 0)
        goto bad;
    setenv(key, val, 0);
    return 0;
bad:
    snprintf(err, errlen, "%s:%d: expected KEY=VALUE", path, lineno);
    return -1;
}

int cfg_read_dotenv(FILE *f, const char *path, char *err, size_t errlen)
{
    char line[CFG_LINE_MAX];
    int lineno = 0;

    while (fgets(line, sizeof(line), f)) {
        lineno++;
        if (cfg_dotenv_line(line, path, lineno, err, errlen) < 0)
            return -1;
    }
    return 0;
}

int cfg_load_dotenv(const char *path, char *err, size_t errlen)
{
    int rc;
    FILE *f = fopen(path, "r");

    if (!f) {
        if (errno == ENOENT)
            return 0;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    rc = cfg_read_dotenv(f, path, err, errlen);
    fclose(f);
    return rc;
}

cfg *cfg_boot(const char *service)
{
    static const char *const levels[] = {"error", "warn", "info", "debug", NULL};
    static const char *const formats[] = {"json", "text", NULL};
    char err[512];
    cfg *c;

    log_init(service, NULL, NULL);
    if (cfg_load_dotenv(".env", err, sizeof(err)) < 0) {
        log_error("cannot read .env: %s", err);
        return NULL;
    }
    c = cfg_new(service);
    if (!c)
        return NULL;
    log_init(NULL, cfg_enum(c, "LOG_LEVEL", "info", levels), cfg_enum(c, "LOG_FORMAT", "json", formats));
    return c;
}

int cfg_finish(cfg *c)
{
    const char *line = cfg_errstr(c);

    if (!cfg_failed(c))
        return 0;
    while (*line) {
        const char *nl = strchr(line, '\n');
        int len = nl ? (int)(nl - line) : (int)strlen(line);

        log_error("configuration: %.*s", len, line);
        line += len + (nl ? 1 : 0);
    }
    return -1;
}
