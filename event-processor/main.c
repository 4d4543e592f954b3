/* event-processor: matches committed chain events against the users'
 * triggers and queues one job per matched action in Redis (SPEC 3). See
 * docs/event-processor.md. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "deps.h"
#include "ep.h"
#include "health_http.h"
#include "log.h"
#include "migrate.h"
#include "svc.h"
#include "tindex.h"

static void copy_setting(char *dst, size_t len, const char *value)
{
    snprintf(dst, len, "%s", value ? value : "");
}

static void config_read(cfg *c, ep_config *o)
{
    const char *q;

    memset(o, 0, sizeof(*o));
    dbpool_conninfo_from_cfg(c, o->conninfo, sizeof(o->conninfo));
    rconn_opts_from_cfg(c, &o->redis);
    if (migrate_default_dir(o->migrations_dir, sizeof(o->migrations_dir)) < 0)
        cfg_error(c, "MIGRATIONS_DIR", cfg_str(c, "MIGRATIONS_DIR", ""), "a readable directory of migrations");
    copy_setting(o->metrics_host, sizeof(o->metrics_host), cfg_str(c, "METRICS_HOST", "0.0.0.0"));
    o->metrics_port = (int)cfg_int(c, "METRICS_PORT", 9101, 0, 65535);
    o->poll_ms = cfg_int(c, "POLL_INTERVAL_MS", 1000, 1, 3600000);
    o->batch_size = (int)cfg_int(c, "BATCH_SIZE", 2000, 1, 10000);
    o->seen_ttl_s = cfg_int(c, "BATCH_KEY_TTL_SECONDS", 86400, 60, 86400L * 365);
    q = cfg_str(c, "ACTION_QUEUE", "action_jobs");
    if (!q[0] || strlen(q) >= sizeof(o->queue))
        cfg_error(c, "ACTION_QUEUE", q, "a Redis key name shorter than 128 bytes");
    copy_setting(o->queue, sizeof(o->queue), q);
}

static int app_open(ep *app, char *err, size_t errlen)
{
    static const double bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
    metrics *m = metrics_default();

    app->db = dbpool_new(app->cfg.conninfo, 3); /* two work connections and the health check */
    app->health = health_new(1000);
    app->health_rconn = rconn_new(&app->cfg.redis, 2000);
    app->push = rconn_new(&app->cfg.redis, 5000);
    app->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    app->pgmig = app->db ? deps_pgmig_new(app->db, app->cfg.migrations_dir) : NULL;
    if (!app->db || !app->pgmig || !app->health || !app->health_rconn || !app->push || !m || app->wake_fd < 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    app->m_processed = metrics_counter_get(m, "events_processed_total", "Events taken from the queue and matched", NULL);
    app->m_matches = metrics_counter_get(m, "trigger_matches_total", "Trigger matches (one per trigger and event)", NULL);
    app->m_enqueued = metrics_counter_get(m, "jobs_enqueued_total", "Jobs pushed to the Redis action queue", NULL);
    app->m_errors = metrics_counter_get(m, "event_processor_errors_total", "Failed batches, loads and pushes", NULL);
    app->m_lag = metrics_gauge_get(m, "event_processor_lag_events", "Committed events not yet processed (queue depth)", NULL);
    app->m_reload_full = metrics_counter_get(m, "event_processor_trigger_reloads_total",
                                             "Trigger index updates: whole loads, and triggers read again on trigger_changed",
                                             "kind=\"full\"");
    app->m_reload_changed = metrics_counter_get(m, "event_processor_trigger_reloads_total",
                                                "Trigger index updates: whole loads, and triggers read again on trigger_changed",
                                                "kind=\"changed\"");
    app->m_triggers = metrics_gauge_get(m, "event_processor_triggers", "Enabled triggers in the index", NULL);
    app->m_batch = metrics_histogram_get(m, "event_processor_batch_duration_seconds",
                                         "Time to process one batch, push included", NULL, bounds,
                                         sizeof(bounds) / sizeof(bounds[0]));
    if (!app->m_processed || !app->m_matches || !app->m_enqueued || !app->m_errors || !app->m_lag ||
        !app->m_triggers || !app->m_batch) {
        snprintf(err, errlen, "cannot register the metrics");
        return -1;
    }
    health_add(app->health, "postgresql", deps_check_pg_migrate, app->pgmig);
    health_add(app->health, "redis", deps_check_redis, app->health_rconn);
    app->health_listen = health_add(app->health, "listen", ep_listen_check, app);
    app->http = health_http_serve("event-processor", EP_VERSION, app->cfg.metrics_host, app->cfg.metrics_port,
                                  app->health, NULL, NULL, err, errlen);
    return app->http ? 0 : -1;
}

int main(void)
{
    static ep app;
    pthread_t th;
    int started = 0, rc = 1;
    char err[512];
    cfg *c;

    if (svc_init() < 0)
        return 1;
    c = cfg_boot("event-processor");
    if (!c)
        return 2;
    config_read(c, &app.cfg);
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    app.wake_fd = -1;
    if (app_open(&app, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    if (pthread_create(&th, NULL, ep_run, &app) != 0) {
        log_error("cannot start the processing thread");
        goto out;
    }
    started = 1;
    log_event(LOG_INFO, "started", "\"metrics_port\":%d,\"batch_size\":%d,\"poll_ms\":%ld,\"version\":\"%s\"",
              httpd_port(app.http), app.cfg.batch_size, app.cfg.poll_ms, EP_VERSION);
    while (svc_wait(1000) == 0 || !svc_stopping())
        ;
    log_info("stopping: finishing the batch in hand");
    rc = 0;
out:
    if (started) {
        uint64_t one = 1;

        if (write(app.wake_fd, &one, sizeof(one)) < 0)
            log_warn("cannot wake the processing thread");
        pthread_join(th, NULL);
    }
    httpd_stop(app.http, 1000);
    httpd_free(app.http);
    health_free(app.health);
    rconn_free(app.health_rconn);
    rconn_free(app.push);
    tindex_free(app.index);
    deps_pgmig_free(app.pgmig);
    dbpool_free(app.db);
    if (app.wake_fd >= 0)
        close(app.wake_fd);
    log_info("stopped");
    return rc;
}
