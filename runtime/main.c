/* runtime: the authority for agent runs (SPEC 6): an append-only run log
 * in PostgreSQL, projections and Khala sync that follow from it in the
 * same transaction, workers, and the poll and WebSocket sync routes. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cfg.h"
#include "dbpool.h"
#include "deps.h"
#include "fmt.h"
#include "health.h"
#include "log.h"
#include "migrate.h"
#include "rt.h"
#include "rtpipe.h"
#include "rtserve.h"
#include "svc.h"

typedef struct {
    char host[256];
    int port;
    char conninfo[2048];
    int db_max;
    int threads;
    int append_threads;
    int append_conns;
    char migrations_dir[1024];
    synctoken_opts tok;
} boot;

/* RUNTIME_BIND_ADDR is host:port; IPv6 hosts are written [addr]:port. */
static void bind_addr(cfg *c, boot *b)
{
    const char *addr = cfg_str(c, "RUNTIME_BIND_ADDR", "127.0.0.1:4100");
    const char *colon = strrchr(addr, ':');
    char *end;
    long port;
    size_t hostlen;

    if (!colon)
        goto bad;
    port = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || port < 0 || port > 65535)
        goto bad;
    hostlen = (size_t)(colon - addr);
    if (hostlen >= 2 && addr[0] == '[' && addr[hostlen - 1] == ']') {
        addr++;
        hostlen -= 2;
    }
    snprintf(b->host, sizeof(b->host), "%.*s", (int)hostlen, addr);
    b->port = (int)port;
    return;
bad:
    cfg_error(c, "RUNTIME_BIND_ADDR", addr, "host:port, e.g. 127.0.0.1:4100");
}

/* ",a,b," in lower case without trailing slashes, for one strstr per
 * request. */
static void origins(cfg *c, rt_config *rc)
{
    const char *v = cfg_str(c, "RUNTIME_KHALA_ALLOWED_ORIGINS", "https://openagents.com,https://www.openagents.com");
    size_t j = 0, cap = sizeof(rc->allowed_origins) - 2;
    const char *p = v;

    rc->allowed_origins[j++] = ',';
    while (*p && j < cap) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p), k;

        while (n && (*p == ' ' || *p == '\t')) {
            p++;
            n--;
        }
        while (n && (p[n - 1] == ' ' || p[n - 1] == '\t' || p[n - 1] == '/'))
            n--;
        for (k = 0; k < n && j < cap; k++)
            rc->allowed_origins[j++] = (char)tolower((unsigned char)p[k]);
        if (n && j < cap)
            rc->allowed_origins[j++] = ',';
        p = e ? e + 1 : p + strlen(p);
    }
    if (*p)
        cfg_error(c, "RUNTIME_KHALA_ALLOWED_ORIGINS", "(too long)", "a comma list of origins under 2 KiB");
    rc->allowed_origins[j] = '\0';
}

static void limits(cfg *c, khala_limits *l, const char *cls, long rate, long budget, long payload)
{
    char name[96];

    snprintf(name, sizeof(name), "RUNTIME_KHALA_%s_PUBLISH_RATE_PER_SECOND", cls);
    l->publish_per_second = cfg_int(c, name, rate, 1, 100000000);
    snprintf(name, sizeof(name), "RUNTIME_KHALA_%s_REPLAY_BUDGET_EVENTS", cls);
    l->replay_budget = cfg_int(c, name, budget, 1, 1000000000);
    snprintf(name, sizeof(name), "RUNTIME_KHALA_%s_MAX_PAYLOAD_BYTES", cls);
    l->max_payload_bytes = cfg_int(c, name, payload, 1, 64L * 1024 * 1024);
}

static void config(cfg *c, rt_config *rc, boot *b)
{
    static const char *const modes[] = {"rust_active", "active", "shadow_only", "read_only", NULL};

    bind_addr(c, b);
    fmt_copy(rc->service_name, sizeof(rc->service_name), cfg_str(c, "RUNTIME_SERVICE_NAME", "runtime"));
    fmt_copy(rc->build_sha, sizeof(rc->build_sha), cfg_str(c, "RUNTIME_BUILD_SHA", "dev"));
    rc->write_mode = cfg_enum(c, "RUNTIME_AUTHORITY_WRITE_MODE", "rust_active", modes);
    if (strcmp(rc->write_mode, "active") == 0)
        rc->write_mode = "rust_active";
    rc->writes_enabled = strcmp(rc->write_mode, "rust_active") == 0;
    rc->poll_min_interval_ms = cfg_int(c, "RUNTIME_KHALA_POLL_MIN_INTERVAL_MS", 250, 0, 3600000);
    rc->poll_max_limit = cfg_int(c, "RUNTIME_KHALA_POLL_MAX_LIMIT", 200, 1, 10000);
    rc->poll_default_limit = cfg_int(c, "RUNTIME_KHALA_POLL_DEFAULT_LIMIT", 100, 1, 10000);
    if (rc->poll_default_limit > rc->poll_max_limit)
        rc->poll_default_limit = rc->poll_max_limit;
    limits(c, &rc->limits[KHALA_CLASS_RUN], "RUN_EVENTS", 240, 20000, 262144);
    limits(c, &rc->limits[KHALA_CLASS_WORKER], "WORKER_LIFECYCLE", 180, 10000, 65536);
    limits(c, &rc->limits[KHALA_CLASS_OTHER], "FALLBACK", 90, 500, 65536);
    rc->retention_messages = cfg_int(c, "RUNTIME_KHALA_RETENTION_MESSAGES", 50000, 0, 1000000000);
    rc->heartbeat_stale_ms = cfg_int(c, "RUNTIME_WORKER_HEARTBEAT_STALE_AFTER_MS", 120000, 1, 86400000);
    rc->enforce_origin = cfg_bool(c, "RUNTIME_KHALA_ENFORCE_ORIGIN", 1);
    rc->header_timeout_ms = cfg_int(c, "RUNTIME_HTTP_HEADER_TIMEOUT_MS", 10000, 100, 3600000);
    rc->ws_message_timeout_ms = cfg_int(c, "RUNTIME_WS_MESSAGE_TIMEOUT_MS", 30000, 100, 3600000);
    rc->handler_queue_max = cfg_int(c, "RUNTIME_HANDLER_QUEUE_MAX", 4096, 1, 1000000);
    rc->listen_ping_ms = cfg_int(c, "RUNTIME_KHALA_LISTEN_PING_MS", 30000, 100, 3600000);
    origins(c, rc);
    b->tok.signing_key = cfg_secret(c, "RUNTIME_SYNC_TOKEN_SIGNING_KEY", "dev-sync-key");
    b->tok.issuer = cfg_str(c, "RUNTIME_SYNC_TOKEN_ISSUER", "https://openagents.com");
    b->tok.audience = cfg_str(c, "RUNTIME_SYNC_TOKEN_AUDIENCE", "openagents-sync");
    b->tok.max_age_s = cfg_int(c, "RUNTIME_SYNC_TOKEN_MAX_AGE_SECONDS", 300, 1, 31536000);
    b->tok.require_jti = cfg_bool(c, "RUNTIME_SYNC_TOKEN_REQUIRE_JTI", 1);
    b->tok.revoked_jtis = cfg_str(c, "RUNTIME_SYNC_REVOKED_JTIS", "");
    if (!cfg_str(c, "DATABASE_URL", NULL) && cfg_str(c, "DB_URL", NULL))
        setenv("DATABASE_URL", cfg_str(c, "DB_URL", ""), 1);
    dbpool_conninfo_from_cfg(c, b->conninfo, sizeof(b->conninfo));
    b->db_max = (int)cfg_int(c, "DB_MAX_CONNECTIONS", 10, 1, 1000);
    b->threads = (int)cfg_int(c, "RUNTIME_WORKER_THREADS", b->db_max, 1, 256);
    b->append_threads = (int)cfg_int(c, "RUNTIME_APPEND_THREADS", 2, 1, RTSERVE_APPEND_THREADS_MAX);
    b->append_conns = (int)cfg_int(c, "RUNTIME_APPEND_CONNECTIONS", 1, 0, RTPIPE_CONNS_MAX);
    if (migrate_default_dir(b->migrations_dir, sizeof(b->migrations_dir)) < 0)
        cfg_error(c, "MIGRATIONS_DIR", b->migrations_dir, "a readable directory of migrations");
}

static int metrics_init(rt *r)
{
    r->m = metrics_default();
    r->conflicts = metrics_counter_get(r->m, "runtime_append_conflicts_total",
                                       "Appends refused because expected_previous_seq was stale.", NULL);
    r->replays = metrics_counter_get(r->m, "runtime_idempotent_replays_total",
                                     "Appends answered from an earlier append with the same idempotency key.", NULL);
    r->published = metrics_counter_get(r->m, "runtime_khala_messages_published_total",
                                       "Khala messages published (one per committed write).", NULL);
    r->stale_floor = metrics_counter_get(r->m, "runtime_khala_stale_cursor_total", "Stale-cursor refusals by reason.",
                                         "reason=\"retention_floor_breach\"");
    r->stale_budget = metrics_counter_get(r->m, "runtime_khala_stale_cursor_total", "Stale-cursor refusals by reason.",
                                          "reason=\"replay_budget_exceeded\"");
    r->subscribers = metrics_gauge_get(r->m, "runtime_khala_subscribers", "Open Khala WebSocket subscriptions.", NULL);
    r->append_commits = metrics_counter_get(r->m, "runtime_append_commits_total",
                                            "Transactions that wrote appends (a group commit writes many).", NULL);
    return r->append_commits && r->conflicts && r->replays && r->published && r->stale_floor && r->stale_budget && r->subscribers ? 0 : -1;
}

int main(void)
{
    static rt r;
    boot b;
    rtserve *srv = NULL;
    deps_pgmig *mig = NULL;
    char err[512];
    cfg *c;
    int rc = 1;

    memset(&b, 0, sizeof(b));
    if (svc_init() < 0 || !(c = cfg_boot("runtime")))
        return 2;
    config(c, &r.cfg, &b);
    if (cfg_finish(c) < 0) {
        cfg_free(c);
        return 2;
    }
    r.started_ms = svc_now_ms();
    /* Two more connections than handler and append threads: the
     * WebSocket accept check and the stop path never wait behind a full
     * pool. */
    r.db = dbpool_new(b.conninfo, b.db_max + b.append_threads + 2);
    r.tok = synctoken_new(&b.tok);
    r.rate = khala_table_new(4096);
    r.guard = khala_table_new(4096);
    r.health = health_new(2000);
    cfg_free(c);
    if (!r.db || !r.tok || !r.rate || !r.guard || !r.health || metrics_init(&r) < 0 ||
        !(mig = deps_pgmig_new(r.db, b.migrations_dir)))
        goto out;
    /* Migrations run on start (SPEC 0), retried by the health check until
     * PostgreSQL answers; until then the runtime answers 503. */
    health_add(r.health, "postgresql", deps_check_pg_migrate, mig);
    if (!(srv = rtserve_new(&r, b.host, b.port, b.threads, b.append_threads, b.append_conns, err, sizeof(err)))) {
        log_error("cannot start: %s", err);
        goto out;
    }
    if (health_start(r.health) < 0 || rtserve_start(srv, b.conninfo, err, sizeof(err)) < 0) {
        log_error("cannot start: %s", err);
        goto out;
    }
    log_event(LOG_INFO, "listening", "\"port\":%d,\"authority_write_mode\":\"%s\"", rtserve_port(srv),
              r.cfg.write_mode);
    while (!svc_stopping())
        svc_wait(1000);
    rtserve_stop(srv, 5000);
    rc = 0;
out:
    rtserve_free(srv);
    health_free(r.health);
    deps_pgmig_free(mig);
    khala_table_free(r.rate);
    khala_table_free(r.guard);
    synctoken_free(r.tok);
    dbpool_free(r.db);
    return rc;
}
