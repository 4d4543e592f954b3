/* metrics: a Prometheus registry and its text exposition (format 0.0.4,
 * accepted by `promtool check metrics`).
 *
 * Series are created once (get-or-create under the registry lock) and then
 * updated lock-free with relaxed C11 atomics, so the hot path of a server
 * costs one or two atomic operations. Callers cache the pointers a get
 * returns. The registry owns every series; pointers stay valid until
 * metrics_free(). */
#ifndef AE_METRICS_H
#define AE_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct metrics metrics;                 /* registry */
typedef struct metrics_counter metrics_counter; /* monotonic, uint64 */
typedef struct metrics_gauge metrics_gauge;     /* double */
typedef struct metrics_histogram metrics_histogram;

/* Content-Type for the exposition. */
#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* Creates an empty registry, or NULL on OOM. Free with metrics_free(), which
 * also frees every series in it; metrics_free(NULL) is a no-op. */
metrics *metrics_new(void);
void metrics_free(metrics *m);

/* The process-wide registry, created on first use (thread-safe). Never
 * freed. NULL only if that first allocation failed. */
metrics *metrics_default(void);

/* Get-or-create a series. `name` is the family name (e.g.
 * "http_requests_total"); `labels` is the rendered label set without braces
 * (e.g. "method=\"GET\",status=\"200\"") or NULL/"" for none, with values
 * escaped by metrics_escape_label() and the label names in the same order
 * on every call. `help` is used when the family is first created (NULL or ""
 * omits the HELP line, which promtool's linter reports, so give one). Same
 * name+labels returns the same pointer (cache it: lookups take a lock). The
 * registry owns the series. Returns NULL on OOM, on an invalid name or label
 * set, or when name is already registered with another type (or, for
 * histograms, other bounds; a histogram "x" also owns x_bucket, x_sum and
 * x_count). */
metrics_counter *metrics_counter_get(metrics *m, const char *name, const char *help, const char *labels);
metrics_gauge *metrics_gauge_get(metrics *m, const char *name, const char *help, const char *labels);
/* `bounds`: strictly ascending finite upper bounds (copied, at most 256),
 * +Inf added automatically (a trailing +Inf given is ignored). `labels` may
 * not use `le`. */
metrics_histogram *metrics_histogram_get(metrics *m, const char *name, const char *help, const char *labels,
                                         const double *bounds, size_t nbounds);

/* Updates: lock-free atomics, safe from any thread; NULL is a no-op (and
 * reads of NULL give 0). A NaN observation is dropped. */
void metrics_counter_add(metrics_counter *c, uint64_t n);
void metrics_counter_inc(metrics_counter *c);
uint64_t metrics_counter_value(const metrics_counter *c);
void metrics_gauge_set(metrics_gauge *g, double v);
void metrics_gauge_add(metrics_gauge *g, double d);
double metrics_gauge_value(const metrics_gauge *g);
void metrics_histogram_observe(metrics_histogram *h, double v);
/* Observations so far, and their sum. */
uint64_t metrics_histogram_count(const metrics_histogram *h);
double metrics_histogram_sum(const metrics_histogram *h);

/* Default latency buckets in seconds (0.0005 .. 10), for metrics_histogram_get. */
extern const double metrics_latency_buckets[];
extern const size_t metrics_latency_nbuckets;

/* Renders the exposition text (HELP and TYPE once per family, series grouped
 * by family in registration order, histogram _bucket{le=...} cumulative,
 * _sum, _count; HELP escaping). *out is malloc'd, NUL-terminated; the caller
 * frees it with free(). `len` (may be NULL) gets the length without the NUL.
 * Returns 0, or -1 on OOM. */
int metrics_render(metrics *m, char **out, size_t *len);

/* Escapes a label value (`\` → `\\`, `"` → `\"`, newline → `\n`) into `dst`
 * (always NUL-terminated, truncated to fit without splitting an escape).
 * Returns `dst` for use in arguments. */
char *metrics_escape_label(char *dst, size_t dstlen, const char *value);

#endif
