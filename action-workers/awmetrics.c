/* awmetrics: the action-workers' Prometheus series, kept in the default
 * registry that GET /metrics serves:
 *   action_jobs_delivered_total{action_type}  deliveries that succeeded
 *   action_jobs_failed_total{action_type}     attempts that failed for good (4xx, refused, tool error)
 *   action_jobs_retried_total{action_type}    failed attempts scheduled again
 *   action_jobs_dead_total{action_type}       jobs sent to action_jobs_dlq
 *   action_jobs_in_flight                     deliveries in progress
 *   action_delivery_duration_seconds{action_type}  attempt latency histogram
 *   action_jobs_deferred_total, action_jobs_reaped_total, action_jobs_invalid_total */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "aw.h"
#include "metrics.h"

static const char *const kinds[ACT_NKINDS] = {"rest", "telegram", "mcp"};

static struct {
    metrics_counter *delivered[ACT_NKINDS], *failed[ACT_NKINDS], *retried[ACT_NKINDS], *dead[ACT_NKINDS];
    metrics_histogram *latency[ACT_NKINDS];
    metrics_gauge *inflight;
    metrics_counter *deferred, *reaped, *invalid;
} m;

int awm_init(void)
{
    metrics *reg = metrics_default();

    for (int k = 0; k < ACT_NKINDS; k++) {
        char labels[64];

        snprintf(labels, sizeof(labels), "action_type=\"%s\"", kinds[k]);
        m.delivered[k] = metrics_counter_get(reg, "action_jobs_delivered_total", "Deliveries that succeeded.", labels);
        m.failed[k] = metrics_counter_get(reg, "action_jobs_failed_total",
                                          "Attempts that failed for good (4xx, refused target, tool error).", labels);
        m.retried[k] = metrics_counter_get(reg, "action_jobs_retried_total", "Failed attempts scheduled again.", labels);
        m.dead[k] = metrics_counter_get(reg, "action_jobs_dead_total", "Jobs moved to action_jobs_dlq.", labels);
        m.latency[k] = metrics_histogram_get(reg, "action_delivery_duration_seconds", "Delivery attempt latency.",
                                             labels, metrics_latency_buckets, metrics_latency_nbuckets);
        if (!m.delivered[k] || !m.failed[k] || !m.retried[k] || !m.dead[k] || !m.latency[k])
            return -1;
    }
    m.inflight = metrics_gauge_get(reg, "action_jobs_in_flight", "Deliveries in progress.", NULL);
    m.deferred = metrics_counter_get(reg, "action_jobs_deferred_total",
                                     "Jobs put back without an attempt (open breaker, chat pacing).", NULL);
    m.reaped = metrics_counter_get(reg, "action_jobs_reaped_total", "Jobs requeued after their lease expired.", NULL);
    m.invalid = metrics_counter_get(reg, "action_jobs_invalid_total", "Malformed jobs dead-lettered.", NULL);
    return m.inflight && m.deferred && m.reaped && m.invalid ? 0 : -1;
}

void awm_outcome(act_kind kind, const char *status, double seconds)
{
    if (kind < 0 || kind >= ACT_NKINDS || !m.latency[kind])
        return;
    metrics_histogram_observe(m.latency[kind], seconds);
    if (!strcmp(status, "success"))
        metrics_counter_inc(m.delivered[kind]);
    else if (!strcmp(status, "retrying"))
        metrics_counter_inc(m.retried[kind]);
    else if (!strcmp(status, "dead"))
        metrics_counter_inc(m.dead[kind]);
    else
        metrics_counter_inc(m.failed[kind]);
}

void awm_inflight_add(long delta)
{
    if (m.inflight)
        metrics_gauge_add(m.inflight, (double)delta);
}

void awm_event(const char *name, long n)
{
    metrics_counter *c = !strcmp(name, "deferred") ? m.deferred : !strcmp(name, "reaped") ? m.reaped : m.invalid;

    if (c)
        metrics_counter_add(c, (uint64_t)(n > 0 ? n : 0));
}
