/* metrics: Prometheus registry.
 *
 * The registry lock guards only the structure (families, series, the lookup
 * table); values are C11 atomics updated with relaxed ordering, because a
 * scrape needs each number to be whole, not a consistent cut across numbers.
 * Doubles live in uint64 bit patterns so that every update is a lock-free
 * integer CAS. A histogram keeps one non-cumulative counter per bucket and
 * no separate count: the count is the sum of the buckets, so the rendered
 * le="+Inf" bucket always equals _count. */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hash.h"

/* Bounds on what a caller can make the registry hold. */
#define METRICS_MAX_BOUNDS 256
#define METRICS_MAX_RENDER (64u << 20)

enum mtype { MT_COUNTER, MT_GAUGE, MT_HISTOGRAM };

struct metrics_counter {
    _Atomic uint64_t v;
};

struct metrics_gauge {
    _Atomic uint64_t bits;
};

struct metrics_histogram {
    const double *bounds; /* the family's, nbounds finite ascending values */
    size_t nbounds;
    _Atomic uint64_t sum_bits;
    _Atomic uint64_t *buckets; /* nbounds + 1, the last is +Inf */
};

struct family;

struct series {
    struct family *fam;
    char *labels; /* "" when none */
    uint64_t hash;
    struct series *hnext; /* lookup chain */
    struct series *fnext; /* family order */
    union {
        struct metrics_counter c;
        struct metrics_gauge g;
        struct metrics_histogram h;
    } u;
};

struct family {
    char *name;
    char *help;
    enum mtype type;
    double *bounds;
    size_t nbounds;
    struct series *first, *last;
    struct family *next;
};

struct metrics {
    pthread_mutex_t mu;
    struct family *families, *last_family;
    struct series **table;
    size_t nbuckets, nseries;
};

const double metrics_latency_buckets[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                          0.1,    0.25,  0.5,    1,     2.5,  5,     10};
const size_t metrics_latency_nbuckets = sizeof(metrics_latency_buckets) / sizeof(metrics_latency_buckets[0]);

static uint64_t dbits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u;
}

static double bitsd(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

/* ---- registry ---- */

metrics *metrics_new(void)
{
    metrics *m = calloc(1, sizeof(*m));

    if (m == NULL)
        return NULL;
    m->nbuckets = 64;
    m->table = calloc(m->nbuckets, sizeof(*m->table));
    if (m->table == NULL || pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m->table);
        free(m);
        return NULL;
    }
    return m;
}

void metrics_free(metrics *m)
{
    struct family *f, *fn;
    struct series *s, *sn;

    if (m == NULL)
        return;
    for (f = m->families; f; f = fn) {
        fn = f->next;
        for (s = f->first; s; s = sn) {
            sn = s->fnext;
            if (f->type == MT_HISTOGRAM)
                free(s->u.h.buckets);
            free(s->labels);
            free(s);
        }
        free(f->name);
        free(f->help);
        free(f->bounds);
        free(f);
    }
    free(m->table);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static metrics *default_registry;
static pthread_once_t default_once = PTHREAD_ONCE_INIT;

static void default_init(void)
{
    default_registry = metrics_new();
}

metrics *metrics_default(void)
{
    pthread_once(&default_once, default_init);
    return default_registry;
}

/* FNV-1a over name, a separator and labels. */
static uint64_t key_hash(const char *name, const char *labels)
{
    uint32_t h = hash_fnv1a_add(HASH_FNV1A_INIT, name, strlen(name));

    h = hash_fnv1a_add(h, "\xff", 1);
    return hash_fnv1a_add(h, labels, strlen(labels));
}

static int name_ok(const char *s, int allow_colon)
{
    if (s == NULL || *s == '\0' || (*s >= '0' && *s <= '9'))
        return 0;
    for (; *s; s++) {
        char c = *s;
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
              (allow_colon && c == ':')))
            return 0;
    }
    return 1;
}

/* Checks a rendered label set: name="value" pairs separated by commas, the
 * values using only the \\ \" \n escapes, no raw newline, no duplicate
 * names and, for histograms, no `le`. Anything else could produce an
 * exposition that scrapers reject, so it is refused at registration. */
static int labels_ok(const char *l, int histogram)
{
    const char *names[32];
    size_t lens[32], n = 0;

    if (*l == '\0')
        return 1;
    for (;;) {
        const char *start = l;
        if (!((*l >= 'a' && *l <= 'z') || (*l >= 'A' && *l <= 'Z') || *l == '_'))
            return 0;
        while ((*l >= 'a' && *l <= 'z') || (*l >= 'A' && *l <= 'Z') || (*l >= '0' && *l <= '9') || *l == '_')
            l++;
        if (n == sizeof(names) / sizeof(names[0]))
            return 0;
        for (size_t i = 0; i < n; i++)
            if (lens[i] == (size_t)(l - start) && memcmp(names[i], start, lens[i]) == 0)
                return 0;
        names[n] = start;
        lens[n++] = (size_t)(l - start);
        if (histogram && l - start == 2 && memcmp(start, "le", 2) == 0)
            return 0;
        if (*l++ != '=' || *l++ != '"')
            return 0;
        while (*l != '"') {
            if (*l == '\0' || *l == '\n')
                return 0;
            if (*l == '\\') {
                l++;
                if (*l != '\\' && *l != '"' && *l != 'n')
                    return 0;
            }
            l++;
        }
        l++;
        if (*l == '\0')
            return 1;
        if (*l++ != ',')
            return 0;
        /* Prometheus accepts a trailing comma; the text is ours to keep
         * tidy, so it is not. */
    }
}

static struct series *lookup(metrics *m, const char *name, const char *labels, uint64_t h)
{
    for (struct series *s = m->table[h % m->nbuckets]; s; s = s->hnext)
        if (s->hash == h && strcmp(s->fam->name, name) == 0 && strcmp(s->labels, labels) == 0)
            return s;
    return NULL;
}

static void grow_table(metrics *m)
{
    size_t nb = m->nbuckets * 2;
    struct series **t = calloc(nb, sizeof(*t));

    /* Failing to grow only makes chains longer. */
    if (t == NULL)
        return;
    for (size_t i = 0; i < m->nbuckets; i++) {
        struct series *s = m->table[i], *next;
        for (; s; s = next) {
            next = s->hnext;
            s->hnext = t[s->hash % nb];
            t[s->hash % nb] = s;
        }
    }
    free(m->table);
    m->table = t;
    m->nbuckets = nb;
}

/* Nonzero when family name `other` collides with the series names of
 * histogram `hist`, which also writes hist_bucket, hist_sum and hist_count. */
static int derived_clash(const char *hist, const char *other)
{
    size_t n = strlen(hist);

    return strncmp(other, hist, n) == 0 &&
           (strcmp(other + n, "_bucket") == 0 || strcmp(other + n, "_sum") == 0 ||
            strcmp(other + n, "_count") == 0);
}

static struct family *find_family(metrics *m, const char *name, enum mtype type, int *clash)
{
    for (struct family *f = m->families; f; f = f->next) {
        if (strcmp(f->name, name) == 0) {
            if (f->type != type)
                *clash = 1;
            return f;
        }
        if ((f->type == MT_HISTOGRAM && derived_clash(f->name, name)) ||
            (type == MT_HISTOGRAM && derived_clash(name, f->name))) {
            *clash = 1;
            return NULL;
        }
    }
    return NULL;
}

static struct family *new_family(metrics *m, const char *name, const char *help, enum mtype type,
                                 const double *bounds, size_t nbounds)
{
    struct family *f = calloc(1, sizeof(*f));

    if (f == NULL)
        return NULL;
    f->type = type;
    f->name = strdup(name);
    f->help = strdup(help ? help : "");
    if (f->name == NULL || f->help == NULL)
        goto fail;
    if (type == MT_HISTOGRAM && nbounds > 0) {
        f->bounds = malloc(nbounds * sizeof(*bounds));
        if (f->bounds == NULL)
            goto fail;
        memcpy(f->bounds, bounds, nbounds * sizeof(*bounds));
    }
    f->nbounds = nbounds;
    if (m->last_family)
        m->last_family->next = f;
    else
        m->families = f;
    m->last_family = f;
    return f;

fail:
    free(f->name);
    free(f->help);
    free(f);
    return NULL;
}

/* Validates histogram bounds; a trailing +Inf is dropped (it is implicit).
 * Returns the number of finite bounds to keep, or -1. */
static long bounds_check(const double *bounds, size_t nbounds)
{
    if (nbounds > 0 && bounds == NULL)
        return -1;
    if (nbounds > 0 && isinf(bounds[nbounds - 1]) && bounds[nbounds - 1] > 0)
        nbounds--;
    if (nbounds > METRICS_MAX_BOUNDS)
        return -1;
    for (size_t i = 0; i < nbounds; i++) {
        if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1])))
            return -1;
    }
    return (long)nbounds;
}

static struct series *get_series(metrics *m, const char *name, const char *help, const char *labels,
                                 enum mtype type, const double *bounds, size_t nbounds)
{
    struct series *s = NULL;
    struct family *f;
    uint64_t h;
    int clash = 0;

    if (m == NULL || !name_ok(name, 1))
        return NULL;
    if (labels == NULL)
        labels = "";
    h = key_hash(name, labels);

    pthread_mutex_lock(&m->mu);
    s = lookup(m, name, labels, h);
    if (s != NULL) {
        if (s->fam->type != type ||
            (type == MT_HISTOGRAM && (s->fam->nbounds != nbounds ||
                                      (nbounds && memcmp(s->fam->bounds, bounds, nbounds * sizeof(*bounds))))))
            s = NULL;
        goto out;
    }
    if (!labels_ok(labels, type == MT_HISTOGRAM))
        goto out;
    f = find_family(m, name, type, &clash);
    if (clash)
        goto out;
    if (f && type == MT_HISTOGRAM &&
        (f->nbounds != nbounds || (nbounds && memcmp(f->bounds, bounds, nbounds * sizeof(*bounds)) != 0)))
        goto out;
    if (f == NULL) {
        f = new_family(m, name, help, type, bounds, nbounds);
        if (f == NULL)
            goto out;
    }

    s = calloc(1, sizeof(*s));
    if (s == NULL)
        goto out;
    s->labels = strdup(labels);
    if (s->labels == NULL)
        goto fail;
    if (type == MT_HISTOGRAM) {
        s->u.h.buckets = calloc(nbounds + 1, sizeof(*s->u.h.buckets));
        if (s->u.h.buckets == NULL)
            goto fail;
        for (size_t i = 0; i <= nbounds; i++)
            atomic_init(&s->u.h.buckets[i], 0);
        s->u.h.bounds = f->bounds;
        s->u.h.nbounds = nbounds;
        atomic_init(&s->u.h.sum_bits, dbits(0.0));
    } else if (type == MT_GAUGE) {
        atomic_init(&s->u.g.bits, dbits(0.0));
    } else {
        atomic_init(&s->u.c.v, 0);
    }
    s->fam = f;
    s->hash = h;
    s->hnext = m->table[h % m->nbuckets];
    m->table[h % m->nbuckets] = s;
    if (f->last)
        f->last->fnext = s;
    else
        f->first = s;
    f->last = s;
    if (++m->nseries > m->nbuckets)
        grow_table(m);
    goto out;

fail:
    free(s->labels);
    free(s);
    s = NULL;
    /* An empty family left behind by OOM renders as HELP/TYPE only, which
     * is still valid exposition. */
out:
    pthread_mutex_unlock(&m->mu);
    return s;
}

metrics_counter *metrics_counter_get(metrics *m, const char *name, const char *help, const char *labels)
{
    struct series *s = get_series(m, name, help, labels, MT_COUNTER, NULL, 0);
    return s ? &s->u.c : NULL;
}

metrics_gauge *metrics_gauge_get(metrics *m, const char *name, const char *help, const char *labels)
{
    struct series *s = get_series(m, name, help, labels, MT_GAUGE, NULL, 0);
    return s ? &s->u.g : NULL;
}

metrics_histogram *metrics_histogram_get(metrics *m, const char *name, const char *help, const char *labels,
                                         const double *bounds, size_t nbounds)
{
    long n = bounds_check(bounds, nbounds);
    struct series *s;

    if (n < 0)
        return NULL;
    s = get_series(m, name, help, labels, MT_HISTOGRAM, bounds, (size_t)n);
    return s ? &s->u.h : NULL;
}

/* ---- hot path ---- */

void metrics_counter_add(metrics_counter *c, uint64_t n)
{
    if (c)
        atomic_fetch_add_explicit(&c->v, n, memory_order_relaxed);
}

void metrics_counter_inc(metrics_counter *c)
{
    if (c)
        atomic_fetch_add_explicit(&c->v, 1, memory_order_relaxed);
}

uint64_t metrics_counter_value(const metrics_counter *c)
{
    /* C11 as first published declares atomic_load on a non-const pointer
     * (fixed by DR 459); the cast only drops the qualifier for the call. */
    return c ? atomic_load_explicit((_Atomic uint64_t *)&c->v, memory_order_relaxed) : 0;
}

static void atomic_add_double(_Atomic uint64_t *bits, double d)
{
    uint64_t old = atomic_load_explicit(bits, memory_order_relaxed);

    while (!atomic_compare_exchange_weak_explicit(bits, &old, dbits(bitsd(old) + d), memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
}

void metrics_gauge_set(metrics_gauge *g, double v)
{
    if (g)
        atomic_store_explicit(&g->bits, dbits(v), memory_order_relaxed);
}

void metrics_gauge_add(metrics_gauge *g, double d)
{
    if (g)
        atomic_add_double(&g->bits, d);
}

double metrics_gauge_value(const metrics_gauge *g)
{
    return g ? bitsd(atomic_load_explicit((_Atomic uint64_t *)&g->bits, memory_order_relaxed)) : 0.0;
}

void metrics_histogram_observe(metrics_histogram *h, double v)
{
    size_t lo = 0, hi;

    /* A NaN would poison _sum for the life of the process; it is dropped. */
    if (h == NULL || isnan(v))
        return;
    /* First bucket whose upper bound is >= v; nbounds means +Inf. */
    hi = h->nbounds;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v <= h->bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    atomic_fetch_add_explicit(&h->buckets[lo], 1, memory_order_relaxed);
    atomic_add_double(&h->sum_bits, v);
}

uint64_t metrics_histogram_count(const metrics_histogram *h)
{
    uint64_t n = 0;

    if (h)
        for (size_t i = 0; i <= h->nbounds; i++)
            n += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
    return n;
}

double metrics_histogram_sum(const metrics_histogram *h)
{
    return h ? bitsd(atomic_load_explicit((_Atomic uint64_t *)&h->sum_bits, memory_order_relaxed)) : 0.0;
}

/* ---- exposition ---- */

char *metrics_escape_label(char *dst, size_t dstlen, const char *src)
{
    size_t o = 0;

    if (dstlen == 0)
        return dst;
    for (; src && *src; src++) {
        const char *rep = NULL;
        char one[2] = {*src, '\0'};
        if (*src == '\\')
            rep = "\\\\";
        else if (*src == '"')
            rep = "\\\"";
        else if (*src == '\n')
            rep = "\\n";
        else
            rep = one;
        size_t n = strlen(rep);
        /* Never split an escape sequence at the truncation point. */
        if (o + n >= dstlen)
            break;
        memcpy(dst + o, rep, n);
        o += n;
    }
    dst[o] = '\0';
    return dst;
}

struct buf {
    char *p;
    size_t len, cap;
    int oom;
};

static void buf_reserve(struct buf *b, size_t extra)
{
    size_t cap;
    char *p;

    if (b->oom || b->len + extra + 1 <= b->cap)
        return;
    if (b->len + extra + 1 > METRICS_MAX_RENDER) {
        b->oom = 1;
        return;
    }
    cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra + 1)
        cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void buf_put(struct buf *b, const char *s, size_t n)
{
    buf_reserve(b, n);
    if (b->oom)
        return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void buf_str(struct buf *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void buf_printf(struct buf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    /* Only numbers go through here; they always fit. */
    if (n > 0 && (size_t)n < sizeof(tmp))
        buf_put(b, tmp, (size_t)n);
}

/* A float in the exposition's spelling: the shortest of %.15g/%.17g that
 * reads back exactly, and +Inf, -Inf, NaN. */
static void fmt_double(char *out, size_t outlen, double v)
{
    if (isnan(v)) {
        snprintf(out, outlen, "NaN");
    } else if (isinf(v)) {
        snprintf(out, outlen, "%s", v > 0 ? "+Inf" : "-Inf");
    } else {
        snprintf(out, outlen, "%.15g", v);
        if (strtod(out, NULL) != v)
            snprintf(out, outlen, "%.17g", v);
    }
}

/* HELP text escapes only backslash and newline. */
static void put_help(struct buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            buf_str(b, "\\\\");
        else if (*s == '\n')
            buf_str(b, "\\n");
        else
            buf_put(b, s, 1);
    }
}

/* name+suffix, then {labels[,le="x"]} when there is any label. */
static void put_series_name(struct buf *b, const char *name, const char *suffix, const char *labels,
                            const char *le)
{
    buf_str(b, name);
    buf_str(b, suffix);
    if (*labels == '\0' && le == NULL)
        return;
    buf_str(b, "{");
    buf_str(b, labels);
    if (le) {
        if (*labels)
            buf_str(b, ",");
        buf_str(b, "le=\"");
        buf_str(b, le);
        buf_str(b, "\"");
    }
    buf_str(b, "}");
}

static void put_histogram(struct buf *b, const struct family *f, const struct series *s)
{
    const struct metrics_histogram *h = &s->u.h;
    char num[64];
    uint64_t cum = 0;
    double sum = metrics_histogram_sum(h);

    for (size_t i = 0; i <= h->nbounds; i++) {
        cum += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
        if (i < h->nbounds)
            fmt_double(num, sizeof(num), h->bounds[i]);
        else
            snprintf(num, sizeof(num), "+Inf");
        put_series_name(b, f->name, "_bucket", s->labels, num);
        buf_printf(b, " %llu\n", (unsigned long long)cum);
    }
    put_series_name(b, f->name, "_sum", s->labels, NULL);
    fmt_double(num, sizeof(num), sum);
    buf_printf(b, " %s\n", num);
    put_series_name(b, f->name, "_count", s->labels, NULL);
    buf_printf(b, " %llu\n", (unsigned long long)cum);
}

int metrics_render(metrics *m, char **out, size_t *len)
{
    static const char *const tname[] = {"counter", "gauge", "histogram"};
    struct buf b = {0};
    char num[64];

    if (out == NULL)
        return -1;
    *out = NULL;
    if (len)
        *len = 0;
    if (m == NULL)
        return -1;
    buf_reserve(&b, 0);

    pthread_mutex_lock(&m->mu);
    for (const struct family *f = m->families; f; f = f->next) {
        if (f->help[0]) {
            buf_str(&b, "# HELP ");
            buf_str(&b, f->name);
            buf_str(&b, " ");
            put_help(&b, f->help);
            buf_str(&b, "\n");
        }
        buf_str(&b, "# TYPE ");
        buf_str(&b, f->name);
        buf_str(&b, " ");
        buf_str(&b, tname[f->type]);
        buf_str(&b, "\n");
        for (const struct series *s = f->first; s; s = s->fnext) {
            if (f->type == MT_HISTOGRAM) {
                put_histogram(&b, f, s);
                continue;
            }
            put_series_name(&b, f->name, "", s->labels, NULL);
            if (f->type == MT_COUNTER) {
                buf_printf(&b, " %llu\n", (unsigned long long)metrics_counter_value(&s->u.c));
            } else {
                fmt_double(num, sizeof(num), metrics_gauge_value(&s->u.g));
                buf_printf(&b, " %s\n", num);
            }
        }
    }
    pthread_mutex_unlock(&m->mu);

    if (b.oom) {
        free(b.p);
        return -1;
    }
    *out = b.p;
    if (len)
        *len = b.len;
    return 0;
}
