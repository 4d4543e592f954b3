/* /ws client frames (realtime/messaging.c, SPEC 5a), through the module's
 * own accept, open, message, too_big and close hooks and its Redis message
 * handler, with routing rules loaded. messaging.c is compiled in whole (its
 * hooks are static); what stands in for wsapp below is the transport only:
 * connections are records, a sent frame is checked and dropped. Redis is
 * off (no bus), as with REDIS_URL unset. PostgreSQL is off too: the
 * token revocation check (libshared/revocation, a database read per user)
 * is stood in for by one that finds every token still valid.
 *
 * Input: "<Sec-WebSocket-Protocol of a fourth client>" then records, each
 * after a 0xff byte: a selector byte (bits 0-1: the connection; bits 2-3:
 * 0 text frame, 1 binary frame, 2 a frame too big, 3 a Redis message whose
 * first line is the channel) and the frame. Three clients are accepted with
 * tokens of the test secret (alice: every topic; bob: a topics claim; 42:
 * claim ["x"]), a second alice connection is the fourth when the offered
 * token does not verify.
 *
 * Checked: every frame sent to a client is a JSON object whose type is one
 * of the server's frame types (an Error with a 4xx/5xx code); after every
 * connection closed, no topic, room or user is left (bookkeeping), and
 * ASan's leak check sees nothing left over. */
#include "../../realtime/messaging.c"
#include "../../realtime/strmap.c"

#include <strings.h>
#include <unistd.h>

#include "fuzz.h"

/* ---- the transport: what wsapp would do -------------------------------- */

struct wsapp_conn {
    uint64_t id;
    void *user;
    int closed;
};

struct wsapp_msg {
    int refs;
    size_t len, cap;
    char data[];
};

struct wsapp_timer {
    int armed;
};

struct wsapp_req {
    const char *token, *auth, *protos;
    int status;
};

static wsapp_ws_handlers g_h;
static void *g_ud;
static int g_nconns;
static int g_raw_ok; /* a Redis room message goes out as published */

static void check_frame(const char *p, size_t n)
{
    cJSON *f = cJSON_ParseWithLength(p, n);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(f, "type");
    int ok = 0;

    if (!cJSON_IsObject(f) || !cJSON_IsString(t)) {
        if (g_raw_ok) {
            cJSON_Delete(f);
            return;
        }
        abort();
    }
    for (int i = 0; i < OT_COUNT; i++)
        ok |= strcmp(t->valuestring, ot_names[i]) == 0;
    if (!ok && !g_raw_ok)
        abort();
    if (!strcmp(t->valuestring, "Error")) {
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(f, "data"),
                    *code = cJSON_GetObjectItemCaseSensitive(d, "code");

        if (!cJSON_IsNumber(code) || code->valuedouble < 400 || code->valuedouble > 599)
            abort();
    }
    cJSON_Delete(f);
}

void *wsapp_conn_user(wsapp_conn *c) { return c->user; }
void *wsapp_conn_route_ud(const wsapp_conn *c) { (void)c; return g_ud; }
uint64_t wsapp_conn_id(const wsapp_conn *c) { return c->id; }
const char *wsapp_conn_remote(const wsapp_conn *c) { (void)c; return "127.0.0.1"; }
size_t wsapp_conn_queued(const wsapp_conn *c) { (void)c; return 0; }
void wsapp_conn_ping(wsapp_conn *c) { (void)c; }
long long wsapp_conn_last_rx_ms(const wsapp_conn *c) { (void)c; return svc_now_ms(); }
int wsapp_conn_count(const wsapp *app) { (void)app; return g_nconns; }

void wsapp_conn_close(wsapp_conn *c, int code, const char *reason)
{
    (void)reason;
    if (code < 1000 || code > 4999)
        abort();
    c->closed = 1;
}

wsapp_msg *wsapp_msg_new_text(size_t cap)
{
    wsapp_msg *m = malloc(sizeof(*m) + cap);

    if (m) {
        m->refs = 1;
        m->len = 0;
        m->cap = cap;
    }
    return m;
}

wsapp_msg *wsapp_msg_new(const void *data, size_t len, int binary)
{
    wsapp_msg *m = wsapp_msg_new_text(len);

    (void)binary;
    if (m) {
        memcpy(m->data, data, len);
        m->len = len;
    }
    return m;
}

char *wsapp_msg_data(wsapp_msg *m) { return m->data; }

void wsapp_msg_set_len(wsapp_msg *m, size_t len)
{
    if (len > m->cap)
        abort();
    m->len = len;
}

void wsapp_msg_ref(wsapp_msg *m) { m->refs++; }

void wsapp_msg_unref(wsapp_msg *m)
{
    if (m && --m->refs == 0)
        free(m);
}

int wsapp_conn_send(wsapp_conn *c, wsapp_msg *m)
{
    if (c->closed)
        return -1;
    check_frame(m->data, m->len);
    return 0;
}

int wsapp_conn_send_text(wsapp_conn *c, const char *data, size_t len)
{
    if (c->closed)
        return -1;
    check_frame(data, len);
    return 0;
}

void wsapp_foreach_conn(wsapp *app, void (*fn)(wsapp_conn *c, void *user, void *ud), void *ud)
{
    (void)app;
    (void)fn;
    (void)ud;
}

int wsapp_post(wsapp *app, void (*fn)(wsapp *app, void *ud), void *ud)
{
    (void)app;
    (void)fn;
    (void)ud;
    return 0;
}

wsapp_timer *wsapp_timer_new(wsapp *app, void (*fn)(wsapp_timer *t, void *ud), void *ud)
{
    (void)app;
    (void)fn;
    (void)ud;
    return calloc(1, sizeof(wsapp_timer));
}

void wsapp_timer_set(wsapp_timer *t, long ms) { t->armed = ms > 0; }
void wsapp_timer_free(wsapp_timer *t) { free(t); }

int wsapp_ws_route(wsapp *app, const char *path, const wsapp_ws_handlers *h, void *ud)
{
    (void)app;
    (void)path;
    g_h = *h;
    g_ud = ud;
    return 0;
}

const char *wsapp_req_query(wsapp_req *req, const char *name)
{
    return strcmp(name, "token") == 0 ? req->token : NULL;
}

const char *wsapp_req_header(wsapp_req *req, const char *name)
{
    return strcasecmp(name, "Authorization") == 0 ? req->auth : NULL;
}

const char *wsapp_req_subprotocols(wsapp_req *req) { return req->protos; }

int wsapp_req_set_subprotocol(wsapp_req *req, const char *proto)
{
    if (!req->protos || !strstr(req->protos, proto))
        abort(); /* wsapp requires one the client offered */
    return 0;
}

void wsapp_respond(wsapp_req *req, int status, const char *content_type, const char *body, size_t len)
{
    (void)content_type;
    (void)body;
    (void)len;
    req->status = status;
}

void wsapp_respond_error(wsapp_req *req, int status, const char *code, const char *message, cJSON *details)
{
    (void)code;
    (void)message;
    cJSON_Delete(details);
    req->status = status;
}

/* Redis is off: the module never gets a bus. */
rtbus *rtbus_new(const rconn_opts *o, wsapp *app, size_t max_held, metrics *mx, rtbus_message_fn fn, void *ud)
{
    (void)o;
    (void)app;
    (void)max_held;
    (void)mx;
    (void)fn;
    (void)ud;
    abort();
}
int rtbus_start(rtbus *b) { (void)b; abort(); }
int rtbus_up(const rtbus *b) { (void)b; abort(); }
void rtbus_free(rtbus *b) { (void)b; }
int rtbus_subscribe(rtbus *b, const char *ch, size_t len) { (void)b; (void)ch; (void)len; abort(); }
int rtbus_unsubscribe(rtbus *b, const char *ch, size_t len) { (void)b; (void)ch; (void)len; abort(); }
int rtbus_command(rtbus *b, rtbus_reply_fn fn, void *ud, int argc, const char *const *argv, const size_t *lens)
{
    (void)b;
    (void)fn;
    (void)ud;
    (void)argc;
    (void)argv;
    (void)lens;
    abort();
}

/* No database: every token counts (none was revoked). */
static char g_revocation;

revocation *revocation_new(const char *conninfo, long ttl_ms, const char *app_name, const char *metric_prefix)
{
    (void)conninfo;
    (void)ttl_ms;
    (void)app_name;
    (void)metric_prefix;
    return (revocation *)&g_revocation;
}
void revocation_free(revocation *rv) { (void)rv; }
void revocation_set_read_timeout(revocation *rv, int ms) { (void)rv; (void)ms; }
int revocation_check(revocation *rv, dbpool *db, const char *user_id, long long iat, char *err, size_t errlen)
{
    (void)rv;
    (void)db;
    (void)user_id;
    (void)iat;
    (void)err;
    (void)errlen;
    return REVOCATION_OK;
}
const char *revocation_message(int verdict)
{
    (void)verdict;
    abort();
}

/* ---- the harness ------------------------------------------------------- */

#define NCONN 4

static messaging *g_m;
static rt_host g_host;

static const char *const tokens[3] = {
    /* {"sub":"alice","exp":4102444800} */
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0."
    "AfRzpQxU2z0JzttNGbDhImKXgCyvKN9oHhMxULYx3rQ",
    /* {"sub":"bob","exp":4102444800,"topics":["news","public*","private:team","user:*"]} */
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDAsInRvcGljcyI6WyJuZXdzIiwicHVibGlj"
    "KiIsInByaXZhdGU6dGVhbSIsInVzZXI6KiJdfQ.doPj9TZVNf07RqhIeLv6q05DUzhR2VQmIXWWKoVqW60",
    /* {"user_id":42,"exp":4102444800,"topics":["x"]} */
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VyX2lkIjo0MiwiZXhwIjo0MTAyNDQ0ODAwLCJ0b3BpY3MiOlsieCJdfQ."
    "MRBquzajSLo713hsVEkxBZ2_ryWDynHbACzDg7lzJBM",
};

static void setup(void)
{
    static const char rules[] =
        "{\"rules\":[{\"match\":\"news\",\"action\":\"copy\",\"to\":\"news.copy\"},"
        "{\"match\":\"orders.*\",\"action\":\"filter\",\"field\":\"payload.region\",\"equals\":\"eu\"},"
        "{\"match\":\"secret*\",\"action\":\"drop\"}]}";
    char path[] = "/tmp/fuzz-rules-XXXXXX";
    int fd = mkstemp(path);
    metrics *mx = metrics_new();
    cfg *c;

    if (fd < 0 || write(fd, rules, sizeof(rules) - 1) != (ssize_t)(sizeof(rules) - 1))
        abort();
    close(fd);
    setenv("ROUTING_RULES", path, 1);
    setenv("JWT_SECRET", "fuzz-secret-0123456789abcdef0123456789", 1);
    setenv("RATE_LIMIT_ENABLED", "false", 1); /* buckets follow the clock: not reproducible */
    c = cfg_new("realtime");
    g_m = messaging_configure(c);
    if (!g_m || !mx || cfg_finish(c) < 0)
        abort();
    cfg_free(c);
    g_host.app = (wsapp *)&g_host; /* never looked into */
    g_host.metrics = mx;
    g_host.instance_id = "fuzz-1-abc";
    g_host.conninfo = "host=/nonexistent dbname=none"; /* a pool that is never used */
    if (messaging_attach(g_m, &g_host) < 0)
        abort();
    unlink(path);
}

/* The identities of the three token clients, taken once through the real
 * accept hook (a JWT check per input would be most of the time). */
static msg_conn g_ident[3];

static char *claim_dup(const char *claim)
{
    size_t n = 0;
    char *c;

    if (!claim)
        return NULL;
    while (claim[n] || claim[n + 1])
        n++;
    c = malloc(n + 2);
    if (!c)
        abort();
    memcpy(c, claim, n + 2);
    return c;
}

static void identify(msg_conn *mc, const msg_conn *from)
{
    mc->uid = strdup(from->uid);
    mc->claim = claim_dup(from->claim);
    mc->exp_ms = from->exp_ms;
    if (!mc->uid)
        abort();
}

static void accept_tokens(void)
{
    char auth[512];

    for (int i = 0; i < 3; i++) {
        wsapp_req req = {0};

        /* The three places a token comes from. */
        snprintf(auth, sizeof(auth), "Bearer %s", tokens[1]);
        if (i == 0)
            req.token = tokens[0];
        else if (i == 1)
            req.auth = auth;
        else
            req.protos = "json, access_token.eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
                         "eyJ1c2VyX2lkIjo0MiwiZXhwIjo0MTAyNDQ0ODAwLCJ0b3BpY3MiOlsieCJdfQ."
                         "MRBquzajSLo713hsVEkxBZ2_ryWDynHbACzDg7lzJBM";
        if (g_h.accept(&req, &g_ident[i], g_ud) < 0 || !g_ident[i].uid)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint64_t next_id = 1;
    struct wsapp_conn conns[NCONN];
    msg_conn *users[NCONN];
    int open[NCONN] = {0};
    const uint8_t *p = data, *end = data + size, *ff = memchr(data, 0xff, size);
    char *protos;

    if (!g_m) {
        setup();
        accept_tokens();
    }
    protos = fuzz_str(data, ff ? (size_t)(ff - data) : size);
    if (!protos)
        return 0;
    for (int i = 0; i < NCONN; i++) {
        users[i] = calloc(1, g_h.user_size);
        conns[i] = (struct wsapp_conn){next_id++, users[i], 0};
        if (!users[i])
            abort();
        if (i < 3) {
            identify(users[i], &g_ident[i]);
        } else {
            wsapp_req req = {.protos = protos};

            /* The fuzzer's offer; when refused, a second alice connection. */
            if (g_h.accept(&req, users[i], g_ud) < 0) {
                if (req.status != 401 && req.status != 503)
                    abort();
                identify(users[i], &g_ident[0]);
            }
        }
        g_h.open(&conns[i], users[i], g_ud);
        open[i] = 1;
        g_nconns++;
    }
    free(protos);

    for (p = ff ? ff + 1 : end; p < end;) {
        const uint8_t *next = memchr(p, 0xff, (size_t)(end - p)), *rec_end = next ? next : end;
        size_t n = (size_t)(rec_end - p);

        if (n >= 1) {
            int ci = p[0] & 3, kind = (p[0] >> 2) & 3;
            const char *text = (const char *)p + 1;

            if (kind == 0 || kind == 1) {
                g_h.message(&conns[ci], users[ci], text, n - 1, kind, g_ud);
            } else if (kind == 2) {
                g_h.too_big(&conns[ci], users[ci], n * 4096, g_ud);
            } else {
                const char *nl = memchr(text, '\n', n - 1);
                size_t cl = nl ? (size_t)(nl - text) : n - 1;
                char *ch = fuzz_str((const uint8_t *)text, cl);

                if (ch) {
                    g_raw_ok = 1;
                    msg_bus_message(g_m, ch, cl, nl ? nl + 1 : text + cl, nl ? n - 1 - cl - 1 : 0);
                    g_raw_ok = 0;
                    free(ch);
                }
            }
        }
        p = next ? next + 1 : end;
    }

    for (int i = 0; i < NCONN; i++)
        if (open[i]) {
            g_h.close(&conns[i], users[i], g_ud);
            free(users[i]);
            g_nconns--;
        }
    if (strmap_count(g_m->topics) || strmap_count(g_m->rooms) || strmap_count(g_m->users))
        abort();
    return 0;
}
