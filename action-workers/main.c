/* action-workers: delivers the jobs the event-processor queues in Redis to
 * Telegram, webhooks and MCP servers (SPEC 4). See docs/action-workers.md. */
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/crypto.h>
#include <openssl/x509.h>

#include "aw.h"
#include "deps.h"
#include "h1.h"
#include "health_http.h"
#include "jarena.h"
#include "log.h"
#include "metrics.h"
#include "sig.h"
#include "svc.h"

#define MAX_THREADS 64

static void copy_setting(char *dst, size_t len, const char *value)
{
    snprintf(dst, len, "%s", value ? value : "");
}

/* Nonzero when `path` is a PEM file holding at least one certificate, so a
 * wrong CA_BUNDLE stops the start instead of failing every https delivery. */
static int ca_bundle_ok(const char *path)
{
    X509_STORE *st = X509_STORE_new();
    int ok = st && X509_STORE_load_file(st, path) == 1;

    X509_STORE_free(st);
    return ok;
}

static void config_read(cfg *c, aw_config *o)
{
    const char *base;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

    memset(o, 0, sizeof(*o));
    o->concurrency = (int)cfg_int(c, "WORKER_CONCURRENCY", 64, 1, 100000);
    /* Two event loops on two cores, one per two cores on bigger machines.
     * Once a delivery cost the loop about 14 us of CPU (session 3), a
     * second loop on 2 cores gave about 10% more deliveries/s (ten
     * interleaved runs of the benchmark: ratio 0.57 against 0.52 on
     * average): a loop waiting for its answers no longer leaves its core
     * idle while nginx, Redis and PostgreSQL run on the other. Before
     * that, when the loop itself was the bottleneck, a second one only
     * added CPU per delivery. */
    o->threads = (int)cfg_int(c, "WORKER_THREADS", ncpu >= 4 ? ncpu / 2 : ncpu >= 2 ? 2 : 1, 1, MAX_THREADS);
    o->visibility_ms = cfg_duration_ms(c, "JOB_VISIBILITY_TIMEOUT", 60000, 1000);
    o->retry_base_ms = cfg_int(c, "RETRY_BASE_MS", 1000, 1, 3600000);
    o->retry_max_ms = cfg_int(c, "RETRY_MAX_DELAY_MS", 300000, 1, 86400000);
    o->max_attempts = (int)cfg_int(c, "RETRY_MAX_ATTEMPTS", 5, 1, 1000);
    o->poll_ms = cfg_int(c, "WORKER_POLL_MS", 20, 1, 10000);
    o->shutdown_grace_ms = cfg_duration_ms(c, "SHUTDOWN_GRACE_MS", 10000, 1);
    o->pace_ms = cfg_int(c, "TELEGRAM_CHAT_INTERVAL_MS", 1000, 0, 600000);
    o->pace_hold_ms = cfg_int(c, "TELEGRAM_PACE_HOLD_MS", 3000, 0, 600000);
    o->breaker_failures = (int)cfg_int(c, "BREAKER_FAILURES", 5, 0, 100000);
    o->breaker_cooldown_ms = cfg_duration_ms(c, "BREAKER_COOLDOWN_MS", 30000, 1);
    o->telegram_timeout_ms = cfg_duration_ms(c, "TELEGRAM_TIMEOUT_MS", 10000, 1);
    o->mcp_timeout_ms = cfg_duration_ms(c, "MCP_TIMEOUT_MS", 30000, 1);
    o->response_max = cfg_int(c, "RESPONSE_MAX_BYTES", 65536, 256, 16L * 1024 * 1024);
    {
        const char *hc = cfg_str(c, "HTTP_CLIENT", "native");

        /* native: plain http:// REST deliveries use h1.c on the event loop;
         * curl: everything goes through libcurl (https always does). */
        if (!strcmp(hc, "native"))
            o->native_http = 1;
        else if (strcmp(hc, "curl"))
            cfg_error(c, "HTTP_CLIENT", hc, "native or curl");
    }
    base = cfg_str(c, "TELEGRAM_API_BASE", "https://api.telegram.org");
    if (strncmp(base, "http://", 7) && strncmp(base, "https://", 8))
        cfg_error(c, "TELEGRAM_API_BASE", base, "an http:// or https:// URL");
    copy_setting(o->telegram_base, sizeof(o->telegram_base), base);
    while (o->telegram_base[0] && o->telegram_base[strlen(o->telegram_base) - 1] == '/')
        o->telegram_base[strlen(o->telegram_base) - 1] = '\0';
    copy_setting(o->telegram_token, sizeof(o->telegram_token), cfg_str(c, "TELEGRAM_BOT_TOKEN", ""));
    copy_setting(o->explorer_tx_url, sizeof(o->explorer_tx_url), cfg_str(c, "EXPLORER_TX_URL", ""));
    if (o->explorer_tx_url[0] && !strstr(o->explorer_tx_url, "{tx}"))
        cfg_error(c, "EXPLORER_TX_URL", o->explorer_tx_url, "a URL pattern containing {tx}");
    copy_setting(o->webhook_secret, sizeof(o->webhook_secret), cfg_str(c, "WEBHOOK_SECRET", ""));
    {
        const char *ca = cfg_str(c, "CA_BUNDLE", "");

        if (strlen(ca) >= sizeof(o->ca_bundle) || (ca[0] && !ca_bundle_ok(ca)))
            cfg_error(c, "CA_BUNDLE", ca, "a readable PEM file of CA certificates");
        else
            copy_setting(o->ca_bundle, sizeof(o->ca_bundle), ca);
    }
    copy_setting(o->queue_prefix, sizeof(o->queue_prefix), cfg_str(c, "ACTION_QUEUE", "action_jobs"));
    if (strlen(cfg_str(c, "ACTION_QUEUE", "action_jobs")) >= sizeof(o->queue_prefix))
        cfg_error(c, "ACTION_QUEUE", cfg_str(c, "ACTION_QUEUE", ""), "a Redis key name shorter than 120 bytes");
    copy_setting(o->metrics_host, sizeof(o->metrics_host), cfg_str(c, "METRICS_HOST", "0.0.0.0"));
    o->metrics_port = (int)cfg_int(c, "METRICS_PORT", 9102, 0, 65535);
    o->db_max_connections = (int)cfg_int(c, "DB_MAX_CONNECTIONS", o->threads + 2, 1, 1000);
    dbpool_conninfo_from_cfg(c, o->conninfo, sizeof(o->conninfo));
    rconn_opts_from_cfg(c, &o->redis);
    if (o->concurrency < o->threads)
        o->threads = o->concurrency;
}

static void health_route(httpd_req *req, void *ud)
{
    (void)ud;
    httpd_respond_static(req, 200, "application/json", "{\"status\":\"ok\"}", 15);
}

static int aw_extra_routes(httpd *srv, void *ud)
{
    (void)ud;
    return httpd_route(srv, "GET", "/healthz", health_route, NULL);
}

static int app_open(aw *app, const char *allowed, char *err, size_t errlen)
{

    app->targets = target_policy_new(allowed, err, errlen);
    if (!app->targets)
        return -1;
    /* https REST deliveries go through h1 too (HTTP_CLIENT=native), with
     * the same CAs libcurl is given. */
    if (app->cfg.native_http && !(app->tls = h1_tls_new(app->cfg.ca_bundle, err, errlen)))
        return -1;
    app->db = dbpool_new(app->cfg.conninfo, app->cfg.db_max_connections);
    app->br = breaker_new(app->cfg.breaker_failures, app->cfg.breaker_cooldown_ms);
    app->health = health_new(2000);
    app->health_rconn = rconn_new(&app->cfg.redis, 2000);
    app->writer = writer_new(app);
    if (app->cfg.webhook_secret[0]) {
        app->sig = sig_key_new(app->cfg.webhook_secret, strlen(app->cfg.webhook_secret));
        /* Only the key schedule is needed from here on. */
        OPENSSL_cleanse(app->cfg.webhook_secret, sizeof(app->cfg.webhook_secret));
        if (!app->sig) {
            snprintf(err, errlen, "cannot prepare the WEBHOOK_SECRET key");
            return -1;
        }
    }
    if (!app->db || !app->br || !app->health || !app->health_rconn || !app->writer || awm_init() < 0) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    app->health_db = health_add(app->health, "postgresql", deps_check_pg, app->db);
    app->health_redis = health_add(app->health, "redis", deps_check_redis, app->health_rconn);
    app->http = health_http_serve("action-workers", AW_VERSION, app->cfg.metrics_host, app->cfg.metrics_port,
                                  app->health, aw_extra_routes, NULL, err, errlen);
    return app->http ? 0 : -1;
}

int main(void)
{
    static aw app;
    pthread_t th[MAX_THREADS];
    worker_args args[MAX_THREADS];
    int started = 0, rc = 1;
    char err[512], allowed[1024];
    cfg *c;

    /* Each delivery allocates and frees a few large buffers (libcurl's, the
     * batch columns); fixed thresholds keep them in the heap instead of
     * mmap/munmap and trimming per batch (~10% more deliveries/s in the
     * benchmark). */
    mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
    mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024);
    /* No fastbins: with them, every allocation of 1 kB or more (a take's
     * reply array, a request buffer) first consolidated the thousands of
     * small chunks freed since the last one (cJSON nodes), 4% of the event
     * loop. The per-thread tcache still serves small sizes. */
    mallopt(M_MXFAST, 0);
    if (svc_init() < 0)
        return 1;
    c = cfg_boot("action-workers");
    if (!c)
        return 2;
    config_read(c, &app.cfg);
    copy_setting(allowed, sizeof(allowed), cfg_str(c, "ALLOWED_TARGETS", ""));
    {
        target_policy *p = target_policy_new(allowed, err, sizeof(err));

        if (!p)
            cfg_error(c, "ALLOWED_TARGETS", allowed, "a comma list of hosts, IPs and CIDRs");
        target_policy_free(p);
    }
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    cfg_free(c);
    /* Parsed jobs live while they are delivered and until the writer has
     * recorded them: at most that many slots are in use at once (beyond,
     * jobs are parsed with malloc). Before any thread uses cJSON. */
    if (jarena_init((size_t)app.cfg.concurrency * (AW_PENDING_PER_SLOT + 2) + 64) < 0)
        log_warn("cannot reserve the job parsing region; jobs are parsed with malloc");
    if (!app.cfg.telegram_token[0])
        log_warn("TELEGRAM_BOT_TOKEN is not set: Telegram actions will fail");
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        log_error("cannot initialise libcurl");
        return 1;
    }
    deliver_init(app.cfg.ca_bundle);
    if (app_open(&app, allowed, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    if (writer_start(app.writer) < 0) {
        log_error("cannot start the writer thread");
        goto out;
    }
    for (int i = 0; i < app.cfg.threads; i++) {
        args[i].app = &app;
        args[i].index = i;
        /* The concurrency is split between the threads, the remainder to
         * the first ones. */
        args[i].capacity = app.cfg.concurrency / app.cfg.threads + (i < app.cfg.concurrency % app.cfg.threads);
        if (pthread_create(&th[i], NULL, worker_run, &args[i]) != 0) {
            log_error("cannot start worker thread %d", i);
            svc_request_stop();
            break;
        }
        started++;
    }
    log_event(LOG_INFO, "started",
              "\"metrics_port\":%d,\"threads\":%d,\"concurrency\":%d,\"visibility_ms\":%ld,\"version\":\"%s\"",
              httpd_port(app.http), app.cfg.threads, app.cfg.concurrency, app.cfg.visibility_ms, AW_VERSION);
    while (svc_wait(1000) == 0 || !svc_stopping())
        ;
    log_info("stopping: no new jobs, finishing in-flight deliveries");
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
    /* The workers are done; what they finished is recorded within a short
     * extra delay, and whatever is still unrecorded after it stays leased
     * and is delivered again. */
    writer_stop(app.writer, 2000);
    httpd_stop(app.http, 1000);
    rc = 0;
out:
    writer_free(app.writer);
    sig_key_free(app.sig);
    httpd_free(app.http);
    health_free(app.health);
    rconn_free(app.health_rconn);
    breaker_free(app.br);
    target_policy_free(app.targets);
    h1_tls_free(app.tls);
    dbpool_free(app.db);
    curl_global_cleanup();
    log_info("stopped");
    return rc;
}
