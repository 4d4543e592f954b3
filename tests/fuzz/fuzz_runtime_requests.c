/* The runtime's untrusted request input (SPEC 6), up to where the
 * database would take over. The first byte picks:
 *   0  an append: "<run id>\n<body>" through rtappend_prepare (the body
 *      checks, the publish limits) and, when accepted, rtappend_group_json,
 *      the JSON argument of the group statement;
 *   1  a worker body and owner query: "<owner_user_id>\n<owner_guest_scope>\n<body>"
 *      through rt_body_object, owner_from (body, then query), opt_string
 *      and json_text as rt_h_worker_register and the GET routes use them;
 *   2  a Khala WebSocket handshake (the stream is one way: the upgrade
 *      request is all a client sends): "<path>\n<Authorization>\n<Origin>\n<after_seq>"
 *      through rt_route_match, rt_route_ws_topic and rt_khala_ws_accept
 *      (for a worker topic, whose owner check reads the database: the
 *      token and scope checks only).
 * rtappend.c and rtworkers.c are compiled in (owner_from and the others
 * are static).
 *
 * Checked: an accepted append's payload text and group JSON parse, are
 * UTF-8 and hold what was sent; every refusal is a JSON error body with a
 * 4xx/5xx status; an accepted owner is exactly one of a number and a
 * non-blank scope; a handshake accepted is for a run topic whose token
 * carries runtime.run_events, with after_seq a non-negative number. */
#include "../../runtime/rtappend.c"
#include "../../runtime/rtworkers.c"

#include "buf.h"
#include "fuzz.h"
#include "rtroutes.h"

#define KEY "fuzz-sync-key-0123456789abcdef0123456789"
#define TOPIC_MAX 600 /* rtsync.c and rtserve.c: a longer topic is refused */

typedef struct {
    char *lines[4];
} fq;

static const char *q_header(const rt_req *q, const char *name)
{
    const fq *f = q->tr;

    if (!strcmp(name, "Authorization"))
        return f->lines[1];
    if (!strcmp(name, "Origin"))
        return f->lines[2];
    if (!strcmp(name, "Prefer"))
        return "return=minimal";
    return NULL;
}

static const char *q_query(const rt_req *q, const char *name)
{
    const fq *f = q->tr;

    if (!strcmp(name, "after_seq"))
        return f->lines[3];
    if (!strcmp(name, "owner_user_id"))
        return f->lines[0];
    if (!strcmp(name, "owner_guest_scope"))
        return f->lines[1];
    return NULL;
}

static const char *q_param(const rt_req *q, const char *name)
{
    const fq *f = q->tr;

    return !strcmp(name, "id") ? f->lines[0] : NULL;
}

static rt *g_r;

static void setup(void)
{
    static rt r;
    synctoken_opts o = {KEY, "openagents", "runtime-sync", 100L * 365 * 86400, 0, "revoked-1, revoked-2"};

    r.cfg.writes_enabled = 1;
    r.cfg.write_mode = "rust_active";
    for (int i = 0; i < 3; i++)
        r.cfg.limits[i] = (khala_limits){1000000000L, 20000, 65536};
    r.cfg.poll_max_limit = 200;
    r.cfg.enforce_origin = 1;
    fmt_copy(r.cfg.allowed_origins, sizeof(r.cfg.allowed_origins), ",https://app.example,http://localhost:3000,");
    r.tok = synctoken_new(&o);
    r.rate = khala_table_new(1024);
    r.m = metrics_new();
    if (!r.tok || !r.rate || !r.m)
        abort();
    g_r = &r;
}

/* A refusal: a status and a JSON body with a string error. */
static void check_refusal(rt_resp *a)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(a->json, "error");

    if (a->status < 400 || a->status > 599 || !cJSON_IsString(e) || !e->valuestring[0])
        abort();
    cJSON_Delete(a->json);
    a->json = NULL;
}

static void append(rt_req *q, const uint8_t *body, size_t n)
{
    rt_resp a;
    rt_append *x, *v[2];
    cJSON *p, *g;
    char *text, *again;

    memset(&a, 0, sizeof(a));
    q->body = (const char *)body;
    q->body_len = n;
    x = rtappend_prepare(g_r, q, &a);
    if (!x) {
        check_refusal(&a);
        return;
    }
    if (buf_utf8_valid(x->payload_text, strlen(x->payload_text)) != strlen(x->payload_text) ||
        !(p = cJSON_Parse(x->payload_text)))
        abort();
    /* Printed again, the parsed text is the same text (duplicate keys
     * and all, so no comparison by key). */
    again = cJSON_PrintUnformatted(p);
    if (!again || strcmp(again, x->payload_text) != 0)
        abort();
    free(again);
    v[0] = v[1] = x;
    text = rtappend_group_json(v, 2, 0);
    if (!text)
        abort();
    if (buf_utf8_valid(text, strlen(text)) != strlen(text) || !(g = cJSON_Parse(text)) ||
        cJSON_GetArraySize(g) != 2 ||
        !(again = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(g->child, "p"))) ||
        strcmp(again, x->payload_text) != 0 ||
        strcmp(cJSON_GetObjectItemCaseSensitive(g->child, "t")->valuestring, x->type) != 0)
        abort();
    free(again);
    cJSON_Delete(g);
    cJSON_Delete(p);
    free(text);
    rtappend_free(x);
}

static void check_owner(const owner *o)
{
    if (o->has_uid == !!o->guest)
        abort();
    if (o->has_uid && (!o->uid[0] || o->uid[strspn(o->uid, "0123456789")]))
        abort();
    if (o->guest && (!o->guest[strspn(o->guest, " \t")] || strlen(o->guest) > 256))
        abort();
}

static void worker(rt_req *q, const uint8_t *body, size_t n)
{
    rt_resp a;
    cJSON *b = NULL;
    owner o;
    int bad = 0, oom = 0;
    char *meta;

    memset(&a, 0, sizeof(a));
    q->body = (const char *)body;
    q->body_len = n;
    if (rt_body_object(q, &b, 1, &a) < 0) {
        check_refusal(&a);
    } else {
        if (owner_from(b, q, &o, &a) < 0)
            check_refusal(&a);
        else
            check_owner(&o);
        (void)opt_string(b, "worker_id", &bad);
        (void)opt_string(b, "adapter", &bad);
        meta = json_text(cJSON_GetObjectItemCaseSensitive(b, "metadata"), &oom);
        if (meta) {
            cJSON *m = cJSON_Parse(meta);

            if (!m)
                abort();
            cJSON_Delete(m);
            free(meta);
        }
        cJSON_Delete(b);
    }
    memset(&a, 0, sizeof(a));
    if (owner_from(NULL, q, &o, &a) < 0)
        check_refusal(&a);
    else
        check_owner(&o);
}

static void handshake(rt_req *q, const fq *f)
{
    char topic[TOPIC_MAX + 64], id[TOPIC_MAX];
    synctoken_principal pr;
    synctoken_refusal why;
    rt_params pp;
    rt_resp a;
    long long after = -1;
    int status = 0, kind;

    (void)rt_route_match("GET", f->lines[0], &pp, &status);
    (void)rt_route_match("POST", f->lines[0], &pp, &status);
    if (rt_route_ws_topic(f->lines[0], topic, sizeof(topic)) < 0)
        return;
    kind = synctoken_parse_topic(topic, id, sizeof(id));
    memset(&a, 0, sizeof(a));
    if (kind == SYNCTOKEN_TOPIC_WORKER) {
        if (synctoken_authenticate(g_r->tok, f->lines[1], &pr, &why) == 0)
            (void)synctoken_authorize_topic(&pr, topic, id, sizeof(id), &why);
        return;
    }
    if (rt_khala_ws_accept(g_r, q, topic, &after, &a) < 0) {
        check_refusal(&a);
        return;
    }
    if (kind != SYNCTOKEN_TOPIC_RUN || after < 0 || synctoken_authenticate(g_r->tok, f->lines[1], &pr, &why) < 0)
        abort();
    for (kind = 0; kind < pr.nscopes && strcmp(pr.scopes[kind], "runtime.run_events"); kind++)
        ;
    if (kind == pr.nscopes)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rt_req q = {.header = q_header, .query = q_query, .param = q_param};
    const uint8_t *p, *end = data + size;
    int mode, nl = 0;
    fq f = {{NULL}};

    if (size < 1)
        return 0;
    if (!g_r)
        setup();
    mode = data[0] % 3;
    /* The lines the mode reads; the rest is the body. */
    p = data + 1;
    for (int i = 0; i < (mode == 0 ? 1 : mode == 1 ? 2 : 4); i++) {
        const uint8_t *e = memchr(p, '\n', (size_t)(end - p));

        f.lines[i] = fuzz_str(p, e ? (size_t)(e - p) : (size_t)(end - p));
        p = e ? e + 1 : end;
        nl++;
    }
    for (int i = 0; i < nl; i++)
        if (!f.lines[i])
            goto out;
    q.tr = &f;
    if (mode == 0)
        append(&q, p, (size_t)(end - p));
    else if (mode == 1)
        worker(&q, p, (size_t)(end - p));
    else
        handshake(&q, &f);
out:
    for (int i = 0; i < 4; i++)
        free(f.lines[i]);
    return 0;
}
