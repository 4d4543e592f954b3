/* Test driver for libshared's client helpers (dbpool, rconn, amqpc).
 *
 *   shared_clients db|redis|amqp
 *
 * reads one command per line on stdin and answers with one line on stdout
 * (several for "workers"), so that a Python test can stop and start servers
 * between commands. Configuration comes from the environment through cfg,
 * exactly as in a service: DATABASE_URL or DB_*, DB_MAX_CONNECTIONS,
 * REDIS_URL or REDIS_*, AMQP_URL. Logs go to stderr as JSON lines.
 *
 * db:    acquire T | ping T | hammer MS T | stats | workers N MS HOLD_MS T | tx T | txfail T | quit
 * redis: ping | get K | set K V | incr K | quit
 * amqp:  connect | declare EX Q KEY | bind Q EX KEY | publish EX KEY BODY | consume Q T |
 *        delete Q EX | ping | close | quit */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "amqpc.h"
#include "cfg.h"
#include "dbpool.h"
#include "log.h"
#include "rconn.h"

#define LINE_MAX_LEN 4096

static long long mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long long wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* Splits `line` on spaces into at most `max` words (in place). */
static int split(char *line, char **argv, int max)
{
    int n = 0;
    char *s = line;

    while (*s && n < max) {
        while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
            *s++ = '\0';
        if (!*s)
            break;
        argv[n++] = s;
        while (*s && *s != ' ' && *s != '\t' && *s != '\r' && *s != '\n')
            s++;
    }
    /* Words beyond `max` are cut off rather than glued to the last one. */
    while (*s) {
        if (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
            *s = '\0';
        s++;
    }
    return n;
}

static long num(const char *s, long def)
{
    char *end;
    long v;

    if (!s)
        return def;
    errno = 0;
    v = strtol(s, &end, 10);
    return (errno || *end) ? def : v;
}

/* ---- db ---- */

typedef struct {
    dbpool *pool;
    int id;
    long long until;
    int hold_ms, timeout_ms;
    long ok, nulls, errs;
    long long first_fail, last_ok, last_fail;
    int max_total;
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;
    char sleep_s[32], err[256];
    const char *params[1];

    snprintf(sleep_s, sizeof(sleep_s), "%.3f", w->hold_ms / 1000.0);
    params[0] = sleep_s;
    while (mono_ms() < w->until) {
        PGconn *c = dbpool_acquire(w->pool, w->timeout_ms);
        PGresult *r;
        int total = 0;

        dbpool_stats(w->pool, &total, NULL, NULL);
        if (total > w->max_total)
            w->max_total = total;
        if (!c) {
            w->nulls++;
            if (!w->first_fail)
                w->first_fail = wall_ms();
            w->last_fail = wall_ms();
            sleep_ms(20);
            continue;
        }
        r = dbpool_exec(c, "SELECT pg_sleep($1::float8)", 1, params, err, sizeof(err));
        dbpool_release(w->pool, c);
        if (!r) {
            w->errs++;
            if (!w->first_fail)
                w->first_fail = wall_ms();
            w->last_fail = wall_ms();
            continue;
        }
        PQclear(r);
        w->ok++;
        w->last_ok = wall_ms();
    }
    return NULL;
}

static void db_workers(dbpool *p, int n, long dur_ms, int hold_ms, int timeout_ms)
{
    worker *ws = calloc((size_t)n, sizeof(*ws));
    pthread_t *ts = calloc((size_t)n, sizeof(*ts));
    int max_total = 0;

    if (!ws || !ts) {
        reply("error oom");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        ws[i].pool = p;
        ws[i].id = i;
        ws[i].until = mono_ms() + dur_ms;
        ws[i].hold_ms = hold_ms;
        ws[i].timeout_ms = timeout_ms;
        pthread_create(&ts[i], NULL, worker_main, &ws[i]);
    }
    for (int i = 0; i < n; i++) {
        pthread_join(ts[i], NULL);
        if (ws[i].max_total > max_total)
            max_total = ws[i].max_total;
    }
    for (int i = 0; i < n; i++)
        reply("worker %d ok=%ld null=%ld err=%ld first_fail=%lld last_fail=%lld last_ok=%lld", i, ws[i].ok,
              ws[i].nulls, ws[i].errs, ws[i].first_fail, ws[i].last_fail, ws[i].last_ok);
    reply("done max_total=%d", max_total);
out:
    free(ws);
    free(ts);
}

static void db_acquire(dbpool *p, int timeout_ms)
{
    long long t0 = mono_ms();
    PGconn *c = dbpool_acquire(p, timeout_ms);
    char err[512];
    PGresult *r;

    if (!c) {
        reply("null %lld %s", mono_ms() - t0, dbpool_errstr(p, err, sizeof(err)));
        return;
    }
    r = dbpool_exec(c, "SELECT pg_backend_pid()", 0, NULL, err, sizeof(err));
    dbpool_release(p, c);
    if (!r) {
        reply("err %lld %s", mono_ms() - t0, err);
        return;
    }
    reply("ok %lld pid=%s", mono_ms() - t0, PQgetvalue(r, 0, 0));
    PQclear(r);
}

/* Leaves a connection inside a transaction (`fail`: an aborted one) and
 * releases it, to check that release cleans it up. */
static void db_leave_tx(dbpool *p, int timeout_ms, int fail)
{
    PGconn *c = dbpool_acquire(p, timeout_ms);
    char err[512];
    PGresult *r;

    if (!c) {
        reply("null %s", dbpool_errstr(p, err, sizeof(err)));
        return;
    }
    r = dbpool_exec(c, "BEGIN", 0, NULL, err, sizeof(err));
    PQclear(r);
    r = dbpool_exec(c, fail ? "SELECT 1/0" : "SELECT pg_backend_pid()", 0, NULL, err, sizeof(err));
    if (r)
        reply("ok pid=%s tx=%d", PQgetvalue(r, 0, 0), (int)PQtransactionStatus(c));
    else
        reply("failed tx=%d %s", (int)PQtransactionStatus(c), err);
    PQclear(r);
    dbpool_release(p, c);
}

/* `within MS SQL...`: dbpool_exec_within, then the connection released. */
static void db_within(dbpool *p, int timeout_ms, const char *sql)
{
    long long t0 = mono_ms();
    PGconn *c = dbpool_acquire(p, 2000);
    char err[512];
    PGresult *r;

    if (!c) {
        reply("null %s", dbpool_errstr(p, err, sizeof(err)));
        return;
    }
    r = dbpool_exec_within(c, sql, 0, NULL, timeout_ms, err, sizeof(err));
    dbpool_release(p, c);
    if (!r) {
        reply("err %lld %s", mono_ms() - t0, err);
        return;
    }
    reply("ok %lld %s", mono_ms() - t0, PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
}

static int run_db(cfg *c)
{
    char conninfo[2048], line[LINE_MAX_LEN], err[512];
    long max = cfg_int(c, "DB_MAX_CONNECTIONS", 10, 1, 1000);
    dbpool *p;

    /* Both run, so that every bad value is reported, as in a service. */
    int bad = dbpool_conninfo_from_cfg(c, conninfo, sizeof(conninfo)) < 0;

    if (cfg_finish(c) < 0 || bad)
        return 2;
    p = dbpool_new(conninfo, (int)max);
    if (!p)
        return 1;
    reply("ready");
    while (fgets(line, sizeof(line), stdin)) {
        char *av[8];
        int ac = split(line, av, 8);

        if (ac == 0)
            continue;
        if (strcmp(av[0], "quit") == 0) {
            break;
        } else if (strcmp(av[0], "acquire") == 0) {
            db_acquire(p, (int)num(ac > 1 ? av[1] : NULL, 1000));
        } else if (strcmp(av[0], "ping") == 0) {
            long long t0 = mono_ms();
            int rc = dbpool_ping(p, (int)num(ac > 1 ? av[1] : NULL, 1000));

            if (rc == 0)
                reply("ok %lld", mono_ms() - t0);
            else
                reply("fail %lld %s", mono_ms() - t0, dbpool_errstr(p, err, sizeof(err)));
        } else if (strcmp(av[0], "hammer") == 0) {
            long long until = mono_ms() + num(ac > 1 ? av[1] : NULL, 1000), worst = 0;
            int timeout = (int)num(ac > 2 ? av[2] : NULL, 1000);
            long calls = 0, ok = 0;

            while (mono_ms() < until) {
                long long t0 = mono_ms();
                PGconn *conn = dbpool_acquire(p, timeout);

                if (mono_ms() - t0 > worst)
                    worst = mono_ms() - t0;
                calls++;
                if (conn) {
                    ok++;
                    dbpool_release(p, conn);
                }
                sleep_ms(1);
            }
            reply("hammer calls=%ld ok=%ld worst_ms=%lld", calls, ok, worst);
        } else if (strcmp(av[0], "within") == 0 && ac >= 3) {
            /* The rest of the line is the statement (split cut it at spaces). */
            char sql[LINE_MAX_LEN] = "";

            for (int i = 2; i < ac; i++)
                snprintf(sql + strlen(sql), sizeof(sql) - strlen(sql), "%s%s", i > 2 ? " " : "", av[i]);
            db_within(p, (int)num(av[1], 1000), sql);
        } else if (strcmp(av[0], "tx") == 0 || strcmp(av[0], "txfail") == 0) {
            db_leave_tx(p, (int)num(ac > 1 ? av[1] : NULL, 1000), av[0][2] == 'f');
        } else if (strcmp(av[0], "stats") == 0) {
            int total, idle, waiting;

            dbpool_stats(p, &total, &idle, &waiting);
            reply("stats total=%d idle=%d waiting=%d degraded=%d", total, idle, waiting, dbpool_degraded(p));
        } else if (strcmp(av[0], "workers") == 0 && ac >= 5) {
            db_workers(p, (int)num(av[1], 4), num(av[2], 1000), (int)num(av[3], 10), (int)num(av[4], 1000));
        } else {
            reply("error unknown command");
        }
    }
    dbpool_free(p);
    return 0;
}

/* ---- redis ---- */

static void redis_reply(rconn *r, redisReply *rep, long long t0)
{
    if (!rep) {
        reply("fail %lld %s", mono_ms() - t0, rconn_errstr(r));
        return;
    }
    switch (rep->type) {
    case REDIS_REPLY_NIL:
        reply("ok %lld nil", mono_ms() - t0);
        break;
    case REDIS_REPLY_INTEGER:
        reply("ok %lld %lld", mono_ms() - t0, rep->integer);
        break;
    case REDIS_REPLY_ERROR:
        reply("rediserr %lld %s", mono_ms() - t0, rep->str);
        break;
    default:
        reply("ok %lld %s", mono_ms() - t0, rep->str ? rep->str : "?");
    }
    freeReplyObject(rep);
}

/* True when s is a decimal count from 0 to max. */
static int count_ok(const char *s, int max)
{
    char *end;
    long v = strtol(s, &end, 10);

    return *s && !*end && v >= 0 && v <= max;
}

static int run_redis(cfg *c)
{
    rconn_opts o;
    rconn *r;
    char line[LINE_MAX_LEN];

    if (rconn_opts_from_cfg(c, &o) < 0 || cfg_finish(c) < 0)
        return 2;
    r = rconn_new(&o, 1000);
    if (!r)
        return 1;
    reply("ready");
    while (fgets(line, sizeof(line), stdin)) {
        char *av[48];
        int ac = split(line, av, 48);
        long long t0 = mono_ms();

        if (ac == 0)
            continue;
        if (strcmp(av[0], "quit") == 0)
            break;
        if (strcmp(av[0], "ping") == 0) {
            if (rconn_ping(r) == 0)
                reply("ok %lld", mono_ms() - t0);
            else
                reply("fail %lld %s", mono_ms() - t0, rconn_errstr(r));
        } else if (strcmp(av[0], "get") == 0 && ac == 2) {
            redis_reply(r, rconn_command(r, 1, "GET %s", av[1]), t0);
        } else if (strcmp(av[0], "set") == 0 && ac == 3) {
            const char *argv[] = {"SET", av[1], av[2]};

            redis_reply(r, rconn_command_argv(r, 0, 3, argv, NULL), t0);
        } else if (strcmp(av[0], "incr") == 0 && ac == 2) {
            redis_reply(r, rconn_command(r, 0, "INCR %s", av[1]), t0);
        } else if ((strcmp(av[0], "eval") == 0 || strcmp(av[0], "evallen") == 0) && ac >= 2 &&
                   count_ok(av[1], ac - 2)) {
            /* eval NKEYS KEY... ARG...: a script that echoes KEYS and ARGV;
             * evallen passes their lengths, each one byte short. */
            static const char echo[] = "return table.concat(KEYS, ',') .. '|' .. table.concat(ARGV, ',')";
            size_t lens[48];
            int nkeys = (int)strtol(av[1], NULL, 10);

            for (int i = 2; i < ac; i++)
                lens[i - 2] = strlen(av[i]) - (strlen(av[i]) > 0);
            redis_reply(r,
                        rconn_eval(r, 1, echo, nkeys, ac - 2 - nkeys, (const char *const *)av + 2,
                                   av[0][4] ? lens : NULL),
                        t0);
        } else {
            reply("error unknown command");
        }
    }
    rconn_free(r);
    return 0;
}

/* ---- amqp ---- */

static int run_amqp(cfg *c)
{
    char url[1024], line[LINE_MAX_LEN];
    char consuming[256] = "";
    unsigned long consuming_gen = 0;
    amqpc *a;

    int bad = amqpc_url_from_cfg(c, url, sizeof(url)) < 0;

    if (cfg_finish(c) < 0 || bad)
        return 2;
    a = amqpc_new(url, "shared_clients-test");
    if (!a)
        return 2;
    reply("ready");
    while (fgets(line, sizeof(line), stdin)) {
        char *av[8];
        int ac = split(line, av, 8);

        if (ac == 0)
            continue;
        if (strcmp(av[0], "quit") == 0)
            break;
        if (strcmp(av[0], "connect") == 0) {
            if (amqpc_connect(a) == 0)
                reply("ok");
            else
                reply("fail %s", amqpc_errstr(a));
        } else if (strcmp(av[0], "declare") == 0 && ac == 4) {
            if (amqpc_declare_topic_exchange(a, av[1], 0) == 0 &&
                amqpc_declare_queue_bind(a, av[2], av[1], av[3]) == 0)
                reply("ok");
            else
                reply("fail %s", amqpc_errstr(a));
        } else if (strcmp(av[0], "publish") == 0 && ac == 4) {
            if (amqpc_publish(a, av[1], av[2], av[3], strlen(av[3]), 0) == 0)
                reply("ok");
            else
                reply("fail %s", amqpc_errstr(a));
        } else if (strcmp(av[0], "consume") == 0 && ac == 3) {
            amqp_connection_state_t st;
            amqp_envelope_t env;
            amqp_rpc_reply_t rr;
            long t = num(av[2], 1000);
            struct timeval tv = {t / 1000, (t % 1000) * 1000};

            if (amqpc_connect(a) < 0 || !(st = amqpc_state(a))) {
                reply("fail %s", amqpc_errstr(a));
                continue;
            }
            /* A reconnect loses the consumer; start it again then. */
            if (strcmp(consuming, av[1]) != 0 || consuming_gen != amqpc_generation(a)) {
                amqp_basic_consume(st, (amqp_channel_t)amqpc_channel(a), amqp_cstring_bytes(av[1]),
                                   amqp_empty_bytes, 0, 1, 0, amqp_empty_table);
                if (amqpc_check(a, amqp_get_rpc_reply(st), "basic.consume") < 0) {
                    reply("fail %s", amqpc_errstr(a));
                    continue;
                }
                snprintf(consuming, sizeof(consuming), "%s", av[1]);
                consuming_gen = amqpc_generation(a);
            }
            amqp_maybe_release_buffers(st);
            rr = amqp_consume_message(st, &env, &tv, 0);
            if (rr.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && rr.library_error == AMQP_STATUS_TIMEOUT) {
                reply("timeout");
            } else if (amqpc_check(a, rr, "consume") < 0) {
                consuming[0] = '\0';
                reply("fail %s", amqpc_errstr(a));
            } else {
                reply("msg %.*s", (int)env.message.body.len, (const char *)env.message.body.bytes);
                amqp_destroy_envelope(&env);
            }
        } else if (strcmp(av[0], "bind") == 0 && ac == 4) {
            if (amqpc_declare_queue_bind(a, av[1], av[2], av[3]) == 0) {
                reply("ok");
            } else {
                /* A channel error reopens the channel, which ends the consumer. */
                consuming[0] = '\0';
                reply("fail %s", amqpc_errstr(a));
            }
        } else if (strcmp(av[0], "delete") == 0 && ac == 3) {
            amqp_connection_state_t st;

            if (amqpc_connect(a) < 0 || !(st = amqpc_state(a))) {
                reply("fail %s", amqpc_errstr(a));
                continue;
            }
            amqp_queue_delete(st, (amqp_channel_t)amqpc_channel(a), amqp_cstring_bytes(av[1]), 0, 0);
            if (amqpc_check(a, amqp_get_rpc_reply(st), "queue.delete") < 0) {
                reply("fail %s", amqpc_errstr(a));
                continue;
            }
            amqp_exchange_delete(st, (amqp_channel_t)amqpc_channel(a), amqp_cstring_bytes(av[2]), 0);
            if (amqpc_check(a, amqp_get_rpc_reply(st), "exchange.delete") < 0)
                reply("fail %s", amqpc_errstr(a));
            else
                reply("ok");
        } else if (strcmp(av[0], "ping") == 0) {
            if (amqpc_ping(a) == 0)
                reply("ok");
            else
                reply("fail %s", amqpc_errstr(a));
        } else if (strcmp(av[0], "close") == 0) {
            amqpc_close(a);
            consuming[0] = '\0';
            reply("ok");
        } else {
            reply("error unknown command");
        }
        if (!amqpc_is_connected(a))
            consuming[0] = '\0';
    }
    amqpc_free(a);
    return 0;
}

int main(int argc, char **argv)
{
    cfg *c;
    int rc;

    if (argc != 2) {
        fprintf(stderr, "usage: %s db|redis|amqp\n", argv[0]);
        return 2;
    }
    /* As svc does for the services: a write to a restarted server must
     * fail with EPIPE, not kill the process. */
    signal(SIGPIPE, SIG_IGN);
    c = cfg_boot("shared_clients");
    if (!c)
        return 1;
    if (strcmp(argv[1], "db") == 0)
        rc = run_db(c);
    else if (strcmp(argv[1], "redis") == 0)
        rc = run_redis(c);
    else if (strcmp(argv[1], "amqp") == 0)
        rc = run_amqp(c);
    else
        rc = 2;
    cfg_free(c);
    return rc;
}
