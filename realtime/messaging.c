/* messaging: /ws of SPEC 5a on wsapp. Everything here runs on the wsapp
 * loop thread except what rtbus does on its own threads; state needs no
 * lock. docs/realtime.md describes the model, the Redis keys and the cost
 * of one connection. */
#include "messaging.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "buf.h"
#include "dbpool.h"
#include "fmt.h"
#include "jget.h"
#include "jwtauth.h"
#include "log.h"
#include "randid.h"
#include "revocation.h"
#include "rtbus.h"
#include "strmap.h"
#include "svc.h"

#define MSG_MAX_NAME 256      /* topic, room and user id length */
#define MSG_MAX_SUBS 256      /* topics per connection */
#define MSG_MAX_ROOMS 64      /* rooms per connection */
#define MSG_MAX_RULES 64
/* Topics and rooms per process: a client names them, so their number is
 * bounded as well as their length. */
#define MSG_MAX_SETS 1000000
/* Broadcasts published to Redis whose echo is still expected; local
 * subscribers got them at once, so the echo is skipped. */
#define MSG_OWN_RING 8192

typedef struct messaging messaging;
typedef struct msg_conn msg_conn;

typedef struct {
    double tokens;
    long long last_ms;
} msg_bucket;

/* Subscribers of a topic, or members of a room. */
typedef struct {
    char *name;
    msg_conn **v;
    uint32_t n, cap;
    uint32_t mark; /* the last walk (UpdatePresence, a restore) that did this room (messaging.presence_mark) */
} msg_set;

typedef struct {
    char *id;
    msg_conn **conns;
    uint32_t n, cap;
    msg_bucket bucket;
    uint8_t status;
    long long last_seen; /* unix seconds */
    uint32_t mark;       /* the last walk over a room that listed this user (messaging.user_mark) */
    strmap *rooms;       /* room name -> how many of the user's connections are in it; NULL: none yet */
} msg_user;

struct msg_conn {
    wsapp_conn *c;
    msg_user *user;
    char *uid;            /* from accept until open */
    char *claim;          /* the topics claim: NUL-separated entries, a double NUL at the end; NULL: none */
    long long exp_ms;     /* token expiry, wall clock */
    long long next_ping_ms;
    msg_set **subs;
    msg_set **rooms;
    uint16_t nsubs, capsubs, nrooms, caprooms;
    msg_bucket bucket;
};

typedef enum { RULE_DROP, RULE_COPY, RULE_FILTER } msg_rule_kind;

typedef struct {
    char *pattern;
    size_t plen;
    int prefix;
    msg_rule_kind kind;
    char *to;
    char *field;
    cJSON *equals;
} msg_rule;

/* Client frame types. Pong is the answer to the server's JSON heartbeat
 * Ping (SPEC 5a: "no pong (either kind)"), taken quietly. */
enum {
    FT_PING, FT_SUBSCRIBE, FT_UNSUBSCRIBE, FT_BROADCAST, FT_DIRECT, FT_JOIN, FT_LEAVE, FT_ROOM, FT_UPDATE_PRESENCE,
    FT_GET_PRESENCE, FT_REFRESH, FT_PONG, FT_OTHER, FT_COUNT
};
static const char *const ft_names[FT_COUNT] = {"Ping", "Subscribe", "Unsubscribe", "Broadcast", "DirectMessage",
                                               "JoinRoom", "LeaveRoom", "RoomMessage", "UpdatePresence",
                                               "GetPresence", "RefreshToken", "Pong", "other"};
enum {
    OT_PONG, OT_STATUS, OT_ACK, OT_BROADCAST, OT_DIRECT, OT_ROOM, OT_PRESENCE_UPDATE, OT_PRESENCE, OT_ERROR, OT_PING,
    OT_COUNT
};
static const char *const ot_names[OT_COUNT] = {"Pong", "Status", "Ack", "Broadcast", "DirectMessage", "RoomMessage",
                                               "PresenceUpdate", "Presence", "Error", "Ping"};
static const char *const presence_names[] = {"online", "away", "busy", "offline"};

struct messaging {
    rt_host *host;
    uint32_t presence_mark;
    uint32_t user_mark;
    long max_connections;
    /* Open /ws connections. MAX_CONNECTIONS is SPEC 5a's limit of /ws: the
     * execution streams of /rt on the same wsapp do not count against it. */
    long nconns;
    /* MAX_CONNECTIONS_PER_USER: one token's holder could otherwise take
     * every slot of MAX_CONNECTIONS and shut everyone else out. */
    long max_user_connections;
    long heartbeat_ms, client_timeout_ms, presence_ttl_ms;
    int rate_enabled;
    double conn_rate, conn_burst, user_rate, user_burst, global_rate, global_burst;
    size_t send_queue_bytes;
    size_t bus_queue_bytes; /* REDIS_QUEUE_BYTES: Redis messages waiting for the loop */
    char rules_path[1024];
    char jwt_secret[512];
    char jwt_iss[256], jwt_aud[256];
    jwtauth *jwt;
    long token_cache_ttl_ms;
    revocation *revocation; /* users.tokens_valid_after and is_active, as the gateway checks them */
    dbpool *db;             /* its reads on a miss, on the loop thread */
    strmap *topics, *rooms, *users;
    msg_bucket global;
    msg_rule rules[MSG_MAX_RULES];
    int nrules;
    wsapp_timer *sweep;
    long long next_registry_ms;
    rtbus *bus;
    strmap *own;    /* message ids this instance published to rt:topic, not yet seen back */
    char *own_ring[MSG_OWN_RING];
    int own_next;
    char **live;    /* instance ids seen alive in Redis */
    int nlive;
    int registered;    /* rt:instances answered our first ZADD */
    int presence_lost; /* a presence write did not reach Redis (msg_store_replied) */
    long rss_base_kb;
    metrics_counter *m_in[FT_COUNT], *m_out[OT_COUNT];
    metrics_counter *m_deliveries, *m_rate[3], *m_bad, *m_expired, *m_timeouts, *m_user_cap;
    metrics_gauge *m_bytes_per_conn, *m_topics, *m_rooms, *m_users;
};

/* ---- small helpers ------------------------------------------------------ */

static long long msg_wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int msg_bucket_take(msg_bucket *b, double rate, double burst, long long now)
{
    if (b->last_ms == 0) {
        b->tokens = burst;
        b->last_ms = now;
    }
    b->tokens += (double)(now - b->last_ms) * rate / 1000.0;
    if (b->tokens > burst)
        b->tokens = burst;
    b->last_ms = now;
    if (b->tokens < 1.0)
        return -1;
    b->tokens -= 1.0;
    return 0;
}

static int msg_name_ok(const char *s)
{
    size_t n = 0;

    for (; s[n]; n++)
        if ((unsigned char)s[n] < 0x20 || s[n] == 0x7f || n >= MSG_MAX_NAME)
            return 0;
    return n > 0;
}

/* A user id from a JSON value: a name, or a number only when a double
 * holds it exactly (1.5 or 2^53 + 1 printed as an id would be some other
 * user's). 0, or -1 when it names no one. */
static int msg_user_id_of(const cJSON *v, char out[MSG_MAX_NAME + 1])
{
    if (cJSON_IsString(v) && msg_name_ok(v->valuestring)) {
        fmt_copy(out, MSG_MAX_NAME + 1, v->valuestring);
        return 0;
    }
    if (cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && fabs(v->valuedouble) <= 9007199254740992.0) {
        snprintf(out, MSG_MAX_NAME + 1, "%.0f", v->valuedouble);
        return 0;
    }
    return -1;
}

static int msg_pattern_match(const char *pat, const char *name)
{
    size_t n = strlen(pat);

    if (n == 1 && pat[0] == '*')
        return 1;
    if (n >= 1 && pat[n - 1] == '*')
        return strncmp(name, pat, n - 1) == 0;
    return strcmp(name, pat) == 0;
}

static int msg_claim_allows(const msg_conn *mc, const char *name)
{
    for (const char *p = mc->claim; p && *p; p += strlen(p) + 1)
        if (msg_pattern_match(p, name))
            return 1;
    return 0;
}

/* SPEC 5a "who may listen". */
static int msg_may_listen(const msg_conn *mc, const char *topic)
{
    if (strncmp(topic, "user:", 5) == 0)
        return strcmp(topic + 5, mc->user->id) == 0;
    return !mc->claim || msg_claim_allows(mc, topic);
}

static int msg_may_join(const msg_conn *mc, const char *room)
{
    if (strncmp(room, "private:", 8) == 0)
        return mc->claim && msg_claim_allows(mc, room);
    return 1;
}

/* ---- sending -------------------------------------------------------------- */

static void msg_send_text(messaging *m, msg_conn *mc, int ot, const char *text, size_t len)
{
    if (wsapp_conn_send_text(mc->c, text, len) == 0)
        metrics_counter_inc(m->m_out[ot]);
}

/* Sends {"type":T,"data":data} (data ownership taken). */
static void msg_send_frame(messaging *m, msg_conn *mc, int ot, cJSON *data)
{
    cJSON *f = cJSON_CreateObject();
    char *text;

    cJSON_AddStringToObject(f, "type", ot_names[ot]);
    cJSON_AddItemToObject(f, "data", data ? data : cJSON_CreateNull());
    text = cJSON_PrintUnformatted(f);
    cJSON_Delete(f);
    if (text) {
        msg_send_text(m, mc, ot, text, strlen(text));
        free(text);
    }
}

static void msg_send_error(messaging *m, msg_conn *mc, int code, const char *message)
{
    cJSON *d = cJSON_CreateObject();

    cJSON_AddNumberToObject(d, "code", code);
    cJSON_AddStringToObject(d, "message", message);
    msg_send_frame(m, mc, OT_ERROR, d);
}

static void msg_send_status(messaging *m, msg_conn *mc, const char *status, cJSON *details)
{
    cJSON *d = cJSON_CreateObject();

    cJSON_AddStringToObject(d, "status", status);
    cJSON_AddItemToObject(d, "details", details ? details : cJSON_CreateNull());
    msg_send_frame(m, mc, OT_STATUS, d);
}

static void msg_send_ack(messaging *m, msg_conn *mc, const char *id)
{
    cJSON *d = cJSON_CreateObject();

    cJSON_AddStringToObject(d, "message_id", id);
    msg_send_frame(m, mc, OT_ACK, d);
}

/* A frame text built once for many receivers: {"type":T,"data":` data `}. */
static wsapp_msg *msg_build(const char *type, const char *data, size_t dlen)
{
    size_t tl = strlen(type);
    wsapp_msg *w = wsapp_msg_new_text(dlen + tl + 24);
    char *p;

    if (!w)
        return NULL;
    p = wsapp_msg_data(w);
    memcpy(p, "{\"type\":\"", 9);
    memcpy(p + 9, type, tl);
    memcpy(p + 9 + tl, "\",\"data\":", 9);
    memcpy(p + 18 + tl, data, dlen);
    p[18 + tl + dlen] = '}';
    wsapp_msg_set_len(w, 19 + tl + dlen);
    return w;
}

static void msg_fanout(messaging *m, msg_conn *const *v, uint32_t n, int ot, wsapp_msg *w)
{
    uint64_t sent = 0;

    for (uint32_t i = 0; i < n; i++)
        if (wsapp_conn_send(v[i]->c, w) == 0)
            sent++;
    metrics_counter_add(m->m_out[ot], sent);
    metrics_counter_add(m->m_deliveries, sent);
}

/* ---- sets (topics and rooms) --------------------------------------------- */

static msg_set *msg_set_get(strmap *map, const char *name, int create)
{
    size_t len = strlen(name);
    msg_set *s = strmap_get(map, name, len);

    if (s || !create || strmap_count(map) >= MSG_MAX_SETS)
        return s;
    s = calloc(1, sizeof(*s));
    if (!s || !(s->name = strdup(name)) || strmap_put(map, name, len, s) < 0) {
        if (s)
            free(s->name);
        free(s);
        return NULL;
    }
    return s;
}

static int msg_set_add(msg_set *s, msg_conn *mc)
{
    if (s->n == s->cap) {
        uint32_t ncap = s->cap ? s->cap * 2 : 4;
        msg_conn **nv = realloc(s->v, ncap * sizeof(*nv));

        if (!nv)
            return -1;
        s->v = nv;
        s->cap = ncap;
    }
    s->v[s->n++] = mc;
    return 0;
}

/* Removes mc; frees the set when it empties (returns 1 then). */
static int msg_set_remove(strmap *map, msg_set *s, msg_conn *mc)
{
    for (uint32_t i = 0; i < s->n; i++)
        if (s->v[i] == mc) {
            s->v[i] = s->v[--s->n];
            break;
        }
    if (s->n > 0)
        return 0;
    strmap_del(map, s->name, strlen(s->name));
    free(s->v);
    free(s->name);
    free(s);
    return 1;
}

static int msg_list_has(msg_set **list, uint16_t n, const msg_set *s)
{
    for (uint16_t i = 0; i < n; i++)
        if (list[i] == s)
            return 1;
    return 0;
}

static int msg_list_add(msg_set ***list, uint16_t *n, uint16_t *cap, msg_set *s)
{
    if (*n == *cap) {
        uint16_t ncap = *cap ? (uint16_t)(*cap * 2) : 1;
        msg_set **nl = realloc(*list, ncap * sizeof(**list));

        if (!nl)
            return -1;
        *list = nl;
        *cap = ncap;
    }
    (*list)[(*n)++] = s;
    return 0;
}

static void msg_list_remove(msg_set **list, uint16_t *n, const msg_set *s)
{
    for (uint16_t i = 0; i < *n; i++)
        if (list[i] == s) {
            list[i] = list[--*n];
            return;
        }
}

static void msg_bus_sub(messaging *m, const char *prefix, const char *name, int sub)
{
    char ch[MSG_MAX_NAME + 32];
    int n;

    if (!m->bus)
        return;
    n = snprintf(ch, sizeof(ch), "%s%s", prefix, name);
    if (n > 0 && (size_t)n < sizeof(ch)) {
        if (sub)
            rtbus_subscribe(m->bus, ch, (size_t)n);
        else
            rtbus_unsubscribe(m->bus, ch, (size_t)n);
    }
}

static int msg_bus_live(messaging *m) { return m->bus && rtbus_up(m->bus); }

/* ---- routing rules and topic delivery ------------------------------------- */

static const cJSON *msg_field(const cJSON *data, const char *path)
{
    char part[128];
    const cJSON *cur = data;

    while (cur && *path) {
        size_t n = strcspn(path, ".");

        if (n >= sizeof(part))
            return NULL;
        memcpy(part, path, n);
        part[n] = '\0';
        cur = cJSON_GetObjectItemCaseSensitive(cur, part);
        path += n + (path[n] == '.');
    }
    return cur;
}

static void msg_deliver_local_topic(messaging *m, const char *topic, const char *data, size_t dlen)
{
    msg_set *s = msg_set_get(m->topics, topic, 0);
    wsapp_msg *w;

    if (!s)
        return;
    w = msg_build("Broadcast", data, dlen);
    if (!w)
        return;
    msg_fanout(m, s->v, s->n, OT_BROADCAST, w);
    wsapp_msg_unref(w);
}

/* Delivers a Broadcast `data` (text and, when known, parsed) to this
 * instance's subscribers of `topic`, after the routing rules. */
static void msg_deliver_topic(messaging *m, const char *topic, const char *data, size_t dlen, cJSON *parsed)
{
    int deliver = 1;

    for (int i = 0; i < m->nrules; i++) {
        msg_rule *r = &m->rules[i];

        if (!(r->prefix ? strncmp(topic, r->pattern, r->plen) == 0 : strcmp(topic, r->pattern) == 0))
            continue;
        if (r->kind == RULE_DROP) {
            deliver = 0;
        } else if (r->kind == RULE_FILTER) {
            const cJSON *v = parsed ? msg_field(parsed, r->field) : NULL;

            if (!v || !cJSON_Compare(v, r->equals, 1))
                deliver = 0;
        } else if (r->kind == RULE_COPY && parsed && strcmp(r->to, topic) != 0) {
            cJSON *copy = cJSON_Duplicate(parsed, 1), *t;
            char *text;

            if (!copy)
                continue;
            /* A message a backend published may have no topic member to
             * replace: the copy gets one. */
            t = cJSON_CreateString(r->to);
            if (t && !cJSON_ReplaceItemInObjectCaseSensitive(copy, "topic", t) &&
                !cJSON_AddItemToObject(copy, "topic", t))
                cJSON_Delete(t);
            text = cJSON_PrintUnformatted(copy);
            if (text)
                msg_deliver_local_topic(m, r->to, text, strlen(text));
            free(text);
            cJSON_Delete(copy);
        }
    }
    if (deliver)
        msg_deliver_local_topic(m, topic, data, dlen);
}

/* ---- users ---------------------------------------------------------------- */

static msg_user *msg_user_get(messaging *m, const char *id, int create)
{
    size_t len = strlen(id);
    msg_user *u = strmap_get(m->users, id, len);

    if (u || !create)
        return u;
    u = calloc(1, sizeof(*u));
    if (!u || !(u->id = strdup(id)) || strmap_put(m->users, id, len, u) < 0) {
        if (u)
            free(u->id);
        free(u);
        return NULL;
    }
    msg_bus_sub(m, "rt:user:", id, 1);
    return u;
}

/* Room for one more connection in u->conns; -1 on OOM (u unchanged). */
static int msg_user_reserve(msg_user *u)
{
    uint32_t cap = u->cap ? u->cap * 2 : 2;
    msg_conn **v;

    if (u->n < u->cap)
        return 0;
    if (!(v = realloc(u->conns, cap * sizeof(*v))))
        return -1;
    u->conns = v;
    u->cap = cap;
    return 0;
}

static void msg_user_drop_conn(messaging *m, msg_user *u, msg_conn *mc)
{
    for (uint32_t i = 0; i < u->n; i++)
        if (u->conns[i] == mc) {
            u->conns[i] = u->conns[--u->n];
            break;
        }
    if (u->n > 0)
        return;
    msg_bus_sub(m, "rt:user:", u->id, 0);
    strmap_del(m->users, u->id, strlen(u->id));
    strmap_free(u->rooms);
    free(u->conns);
    free(u->id);
    free(u);
}

static msg_conn *msg_user_conn(messaging *m, const char *uid, uint64_t conn_id)
{
    msg_user *u = msg_user_get(m, uid, 0);

    for (uint32_t i = 0; u && i < u->n; i++)
        if (wsapp_conn_id(u->conns[i]->c) == conn_id)
            return u->conns[i];
    return NULL;
}

/* ---- presence ------------------------------------------------------------- */

static cJSON *msg_presence_entry(const msg_user *u, int with_room, const char *room)
{
    cJSON *d = cJSON_CreateObject();
    char ts[FMT_RFC3339_MAX];

    fmt_rfc3339(ts, sizeof(ts), &(struct timespec){.tv_sec = (time_t)u->last_seen}, 0);
    if (with_room)
        cJSON_AddStringToObject(d, "room", room);
    cJSON_AddStringToObject(d, "user_id", u->id);
    cJSON_AddStringToObject(d, "status", presence_names[u->status]);
    cJSON_AddStringToObject(d, "last_seen", ts);
    return d;
}

/* Sends a whole frame text to the members of a room: through Redis (which
 * brings it back to every instance, this one included) or locally. */
/* Publishes "<instance id>\n<text>" on one of our private channels, so
 * that the instance that sent it can skip its own echo. */
static int msg_bus_publish_tagged(messaging *m, const char *prefix, const char *name, const char *text, size_t len,
                                  rtbus_reply_fn fn, void *ud)
{
    char ch[MSG_MAX_NAME + 16];
    int n = snprintf(ch, sizeof(ch), "%s%s", prefix, name);
    size_t il = strlen(m->host->instance_id);
    char *tagged = malloc(il + 1 + len);
    const char *argv[3] = {"PUBLISH", ch, tagged};
    size_t lens[3] = {7, (size_t)n, il + 1 + len};
    int rc;

    if (!tagged)
        return -1;
    memcpy(tagged, m->host->instance_id, il);
    tagged[il] = '\n';
    memcpy(tagged + il + 1, text, len);
    rc = rtbus_command(m->bus, fn, ud, 3, argv, lens);
    free(tagged);
    return rc;
}

/* The text of a tagged message from another instance, or NULL for our own
 * echo (or a malformed one). */
static const char *msg_untag(const messaging *m, const char *p, size_t n, size_t *len)
{
    const char *nl = memchr(p, '\n', n);
    size_t il = strlen(m->host->instance_id);

    if (!nl || ((size_t)(nl - p) == il && memcmp(p, m->host->instance_id, il) == 0))
        return NULL;
    *len = n - (size_t)(nl + 1 - p);
    return nl + 1;
}

static void msg_room_send(messaging *m, const char *room, int ot, const char *frame, size_t len)
{
    msg_set *s;
    wsapp_msg *w;

    if (msg_bus_live(m))
        msg_bus_publish_tagged(m, "rt:room:", room, frame, len, NULL, NULL);
    s = msg_set_get(m->rooms, room, 0);
    if (!s || !(w = wsapp_msg_new(frame, len, 0)))
        return;
    msg_fanout(m, s->v, s->n, ot, w);
    wsapp_msg_unref(w);
}

/* The key of this instance's room index, rt:instance:{id}:rooms: the rooms
 * it holds presence entries in, so that whoever finds it dead knows which
 * hashes to clean (msg_reap_lua). */
static int msg_rooms_key(const messaging *m, char *key, size_t len)
{
    int n = snprintf(key, len, "rt:instance:%s:rooms", m->host->instance_id);

    return n > 0 && (size_t)n < len ? n : -1;
}

/* Adds (add) or removes the room from this instance's room index. */
static void msg_rooms_index(messaging *m, const char *room, int add)
{
    char key[192];
    int kn = msg_rooms_key(m, key, sizeof(key));
    const char *argv[3] = {add ? "SADD" : "SREM", key, room};
    size_t lens[3] = {4, (size_t)kn, strlen(room)};

    if (m->bus && kn > 0)
        rtbus_command(m->bus, NULL, NULL, 3, argv, lens);
}

/* The room's presence hash: one field per instance and user, so a dead
 * instance's entries can be told apart and dropped. */
/* A presence write that did not reach Redis (down, or the queue full)
 * marks the instance's entries for writing again (msg_registry). */
static void msg_store_replied(void *ud, redisReply *r)
{
    if (!r)
        ((messaging *)ud)->presence_lost = 1;
}

static void msg_presence_store(messaging *m, const char *room, const msg_user *u, int offline)
{
    char key[MSG_MAX_NAME + 32], field[512];
    int kn = snprintf(key, sizeof(key), "rt:room:%s:presence", room);
    int fn = snprintf(field, sizeof(field), "%s|%s", m->host->instance_id, u->id);
    cJSON *e;
    char *v;

    if (offline) {
        const char *argv[3] = {"HDEL", key, field};
        size_t lens[3] = {4, (size_t)kn, (size_t)fn};

        if (rtbus_command(m->bus, msg_store_replied, m, 3, argv, lens) < 0)
            m->presence_lost = 1;
        return;
    }
    e = msg_presence_entry(u, 0, room);
    v = cJSON_PrintUnformatted(e);
    cJSON_Delete(e);
    if (v) {
        const char *argv[4] = {"HSET", key, field, v};
        size_t lens[4] = {4, (size_t)kn, (size_t)fn, strlen(v)};

        /* The index first: an entry is never where a reaper cannot find it. */
        msg_rooms_index(m, room, 1);
        if (rtbus_command(m->bus, msg_store_replied, m, 4, argv, lens) < 0)
            m->presence_lost = 1;
    }
    free(v);
}

/* Sends PresenceUpdate{d} (ownership taken) to the room's members. */
static void msg_room_send_presence(messaging *m, const char *room, cJSON *d)
{
    cJSON *f = cJSON_CreateObject();
    char *text;

    cJSON_AddStringToObject(f, "type", "PresenceUpdate");
    cJSON_AddItemToObject(f, "data", d);
    text = cJSON_PrintUnformatted(f);
    cJSON_Delete(f);
    if (text)
        msg_room_send(m, room, OT_PRESENCE_UPDATE, text, strlen(text));
    free(text);
}

static void msg_room_presence(messaging *m, const char *room, const msg_user *u, const char *status_override)
{
    cJSON *d = msg_presence_entry(u, 1, room);

    if (status_override)
        cJSON_ReplaceItemInObject(d, "status", cJSON_CreateString(status_override));
    msg_room_send_presence(m, room, d);
    if (m->bus)
        msg_presence_store(m, room, u, status_override && strcmp(status_override, "offline") == 0);
}

/* Adds `by` (+1 or -1) to how many of the user's connections are in the
 * room here, and returns the new count; -1 on OOM (nothing changed; a
 * removal allocates nothing). A count per user and room rather than a
 * search of the user's connections, which made one user with thousands of
 * connections in many rooms stall the loop on every join and leave. */
static long msg_user_rooms_add(msg_user *u, const msg_set *room, int by)
{
    size_t len = strlen(room->name);
    uintptr_t had = u->rooms ? (uintptr_t)strmap_get(u->rooms, room->name, len) : 0,
              n = had + (uintptr_t)(intptr_t)by;

    if (by < 0 && had == 0)
        return 0;
    if (!u->rooms && !(u->rooms = strmap_new_sized(4)))
        return -1;
    if (n == 0)
        strmap_del(u->rooms, room->name, len);
    else if (strmap_put(u->rooms, room->name, len, (void *)n) < 0)
        return -1;
    return (long)n;
}

static void msg_leave(messaging *m, msg_conn *mc, msg_set *room)
{
    char name[MSG_MAX_NAME + 1];
    int last, emptied;

    last = msg_user_rooms_add(mc->user, room, -1) == 0;
    fmt_copy(name, sizeof(name), room->name);
    msg_list_remove(mc->rooms, &mc->nrooms, room);
    emptied = msg_set_remove(m->rooms, room, mc);
    if (emptied)
        msg_bus_sub(m, "rt:room:", name, 0);
    if (last)
        msg_room_presence(m, name, mc->user, "offline");
    /* The index entry goes after the presence entry (the same connection
     * runs them in order): a reaper finds every entry there is. */
    if (emptied)
        msg_rooms_index(m, name, 0);
}

/* ---- frames from clients --------------------------------------------------- */

static void msg_on_ping(messaging *m, msg_conn *mc, const cJSON *data)
{
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(data, "timestamp");
    cJSON *d = cJSON_CreateObject();

    cJSON_AddItemToObject(d, "timestamp", ts ? cJSON_Duplicate(ts, 1) : cJSON_CreateNumber((double)msg_wall_ms()));
    msg_send_frame(m, mc, OT_PONG, d);
}

static void msg_on_subscribe(messaging *m, msg_conn *mc, const cJSON *data, int sub)
{
    const cJSON *topics = cJSON_GetObjectItemCaseSensitive(data, "topics"), *t;
    cJSON *done = cJSON_CreateArray(), *details;

    if (!cJSON_IsArray(topics)) {
        cJSON_Delete(done);
        msg_send_error(m, mc, 400, "topics must be an array of strings");
        return;
    }
    cJSON_ArrayForEach(t, topics) {
        char msg[MSG_MAX_NAME + 64];
        msg_set *s;

        if (!cJSON_IsString(t) || !msg_name_ok(t->valuestring)) {
            msg_send_error(m, mc, 400, "topic names are 1 to 255 printable characters");
            continue;
        }
        s = msg_set_get(m->topics, t->valuestring, sub);
        if (!sub) {
            if (s && msg_list_has(mc->subs, mc->nsubs, s)) {
                msg_list_remove(mc->subs, &mc->nsubs, s);
                if (msg_set_remove(m->topics, s, mc))
                    msg_bus_sub(m, "rt:topic:", t->valuestring, 0);
            }
            cJSON_AddItemToArray(done, cJSON_CreateString(t->valuestring));
            continue;
        }
        if (!msg_may_listen(mc, t->valuestring)) {
            snprintf(msg, sizeof(msg), "Not allowed to subscribe to %s", t->valuestring);
            msg_send_error(m, mc, 403, msg);
            if (s && s->n == 0)
                msg_set_remove(m->topics, s, mc);
            continue;
        }
        if (!s) {
            msg_send_error(m, mc, 503, "too many topics on this server");
            continue;
        }
        if (!msg_list_has(mc->subs, mc->nsubs, s)) {
            if (mc->nsubs >= MSG_MAX_SUBS || msg_list_add(&mc->subs, &mc->nsubs, &mc->capsubs, s) < 0) {
                msg_send_error(m, mc, 400, "too many subscriptions on this connection");
                if (s->n == 0)
                    msg_set_remove(m->topics, s, mc);
                continue;
            }
            if (msg_set_add(s, mc) < 0) {
                msg_list_remove(mc->subs, &mc->nsubs, s);
                msg_set_remove(m->topics, s, mc);
                msg_send_error(m, mc, 503, "out of memory");
                continue;
            }
            if (s->n == 1)
                msg_bus_sub(m, "rt:topic:", t->valuestring, 1);
        }
        cJSON_AddItemToArray(done, cJSON_CreateString(t->valuestring));
    }
    details = cJSON_CreateObject();
    cJSON_AddItemToObject(details, "topics", done);
    msg_send_status(m, mc, sub ? "subscribed" : "unsubscribed", details);
}

static void msg_own_add(messaging *m, const char *id)
{
    char **slot = &m->own_ring[m->own_next];

    if (*slot) {
        strmap_del(m->own, *slot, strlen(*slot));
        free(*slot);
    }
    *slot = strdup(id);
    if (*slot && strmap_put(m->own, id, strlen(id), slot) < 0) {
        free(*slot);
        *slot = NULL;
    }
    m->own_next = (m->own_next + 1) % MSG_OWN_RING;
}

/* Whether `parsed` is the echo of a broadcast of ours (forgotten then). */
static int msg_own_echo(messaging *m, const cJSON *parsed)
{
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(parsed, "message_id");
    char **slot;

    if (!cJSON_IsString(id) || !(slot = strmap_del(m->own, id->valuestring, strlen(id->valuestring))))
        return 0;
    free(*slot);
    *slot = NULL;
    return 1;
}

static void msg_on_broadcast(messaging *m, msg_conn *mc, cJSON *data)
{
    const char *topic = jget_str(data, "topic");
    cJSON *payload = cJSON_DetachItemFromObjectCaseSensitive(data, "payload"), *out;
    char id[64], ts[32], msg[MSG_MAX_NAME + 64], *text;

    if (!topic || !msg_name_ok(topic)) {
        cJSON_Delete(payload);
        msg_send_error(m, mc, 400, "Broadcast needs a topic");
        return;
    }
    if (!msg_may_listen(mc, topic)) {
        cJSON_Delete(payload);
        snprintf(msg, sizeof(msg), "Not allowed to publish to %s", topic);
        msg_send_error(m, mc, 403, msg);
        return;
    }
    randid_uuid(id, sizeof(id), "broadcast_");
    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "topic", topic);
    cJSON_AddItemToObject(out, "payload", payload ? payload : cJSON_CreateNull());
    cJSON_AddStringToObject(out, "from", mc->user->id);
    cJSON_AddStringToObject(out, "message_id", id);
    cJSON_AddStringToObject(out, "timestamp", ts);
    text = cJSON_PrintUnformatted(out);
    if (text) {
        if (msg_bus_live(m)) {
            char ch[MSG_MAX_NAME + 16];
            int n = snprintf(ch, sizeof(ch), "rt:topic:%s", topic);
            const char *argv[3] = {"PUBLISH", ch, text};
            size_t lens[3] = {7, (size_t)n, strlen(text)};

            if (rtbus_command(m->bus, NULL, NULL, 3, argv, lens) == 0)
                msg_own_add(m, id);
        }
        msg_deliver_topic(m, topic, text, strlen(text), out);
        msg_send_ack(m, mc, id);
    }
    free(text);
    cJSON_Delete(out);
}

typedef struct {
    messaging *m;
    char uid[MSG_MAX_NAME + 1];
    uint64_t conn_id;
    char target[MSG_MAX_NAME + 1];
    char id[64];
} msg_dm_ctx;

static void msg_dm_replied(void *ud, redisReply *r)
{
    msg_dm_ctx *x = ud;
    msg_conn *mc = msg_user_conn(x->m, x->uid, x->conn_id);

    if (mc) {
        if (r && r->type == REDIS_REPLY_INTEGER && r->integer > 0) {
            msg_send_ack(x->m, mc, x->id);
        } else {
            char msg[MSG_MAX_NAME + 64];

            snprintf(msg, sizeof(msg), "User %s not found or not connected", x->target);
            msg_send_error(x->m, mc, 404, msg);
        }
    }
    free(x);
}

static void msg_on_direct(messaging *m, msg_conn *mc, cJSON *data)
{
    const cJSON *tv = cJSON_GetObjectItemCaseSensitive(data, "target_user");
    char target[MSG_MAX_NAME + 1], id[64], ts[32], msg[MSG_MAX_NAME + 64], *text;
    cJSON *payload, *out;
    msg_user *u;

    if (msg_user_id_of(tv, target) < 0) {
        msg_send_error(m, mc, 400, "DirectMessage needs a target_user");
        return;
    }
    payload = cJSON_DetachItemFromObjectCaseSensitive(data, "payload");
    randid_uuid(id, sizeof(id), "direct_");
    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    out = cJSON_CreateObject();
    cJSON_AddStringToObject(out, "from", mc->user->id);
    cJSON_AddItemToObject(out, "payload", payload ? payload : cJSON_CreateNull());
    cJSON_AddStringToObject(out, "message_id", id);
    cJSON_AddStringToObject(out, "timestamp", ts);
    text = cJSON_PrintUnformatted(out);
    cJSON_Delete(out);
    if (!text)
        return;
    u = msg_user_get(m, target, 0);
    if (msg_bus_live(m)) {
        msg_dm_ctx *x = u ? NULL : calloc(1, sizeof(*x));

        /* PUBLISH counts the instances holding the user: when none here,
         * its reply (0 or not) decides between the Ack and the 404. */
        if (x) {
            x->m = m;
            fmt_copy(x->uid, sizeof(x->uid), mc->user->id);
            x->conn_id = wsapp_conn_id(mc->c);
            fmt_copy(x->target, sizeof(x->target), target);
            fmt_copy(x->id, sizeof(x->id), id);
        }
        if (msg_bus_publish_tagged(m, "rt:user:", target, text, strlen(text), x ? msg_dm_replied : NULL, x) == 0 &&
            x) {
            free(text);
            return;
        }
        free(x);
    }
    if (!u) {
        snprintf(msg, sizeof(msg), "User %s not found or not connected", target);
        msg_send_error(m, mc, 404, msg);
    } else {
        wsapp_msg *w = msg_build("DirectMessage", text, strlen(text));

        if (w) {
            msg_fanout(m, u->conns, u->n, OT_DIRECT, w);
            wsapp_msg_unref(w);
        }
        msg_send_ack(m, mc, id);
    }
    free(text);
}

static void msg_on_join(messaging *m, msg_conn *mc, const cJSON *data, int join)
{
    const char *room = jget_str(data, "room");
    char msg[MSG_MAX_NAME + 64];
    msg_set *s;
    cJSON *details;

    if (!room || !msg_name_ok(room)) {
        msg_send_error(m, mc, 400, "a room name is needed");
        return;
    }
    s = msg_set_get(m->rooms, room, 0);
    details = cJSON_CreateObject();
    cJSON_AddStringToObject(details, "room", room);
    if (!join) {
        if (s && msg_list_has(mc->rooms, mc->nrooms, s))
            msg_leave(m, mc, s);
        msg_send_status(m, mc, "left", details);
        return;
    }
    if (!msg_may_join(mc, room)) {
        cJSON_Delete(details);
        snprintf(msg, sizeof(msg), "Not allowed to join %s", room);
        msg_send_error(m, mc, 403, msg);
        return;
    }
    if (!s || !msg_list_has(mc->rooms, mc->nrooms, s)) {
        long here = -1;

        if (mc->nrooms >= MSG_MAX_ROOMS) {
            cJSON_Delete(details);
            msg_send_error(m, mc, 400, "too many rooms on this connection");
            return;
        }
        if (!(s = msg_set_get(m->rooms, room, 1))) {
            cJSON_Delete(details);
            msg_send_error(m, mc, 503, "too many rooms on this server");
            return;
        }
        if (msg_list_add(&mc->rooms, &mc->nrooms, &mc->caprooms, s) < 0 || msg_set_add(s, mc) < 0 ||
            (here = msg_user_rooms_add(mc->user, s, 1)) < 0) {
            msg_list_remove(mc->rooms, &mc->nrooms, s);
            msg_set_remove(m->rooms, s, mc);
            cJSON_Delete(details);
            msg_send_error(m, mc, 503, "out of memory");
            return;
        }
        if (s->n == 1)
            msg_bus_sub(m, "rt:room:", room, 1);
        msg_send_status(m, mc, "joined", details);
        if (here == 1) /* the user's first connection here */
            msg_room_presence(m, room, mc->user, NULL);
        return;
    }
    msg_send_status(m, mc, "joined", details);
}

static void msg_on_room_message(messaging *m, msg_conn *mc, cJSON *data)
{
    const char *room = jget_str(data, "room");
    msg_set *s = room ? msg_set_get(m->rooms, room, 0) : NULL;
    cJSON *f, *d;
    char id[64], ts[32], *text;

    if (!room || !msg_name_ok(room)) {
        msg_send_error(m, mc, 400, "RoomMessage needs a room");
        return;
    }
    if (!s || !msg_list_has(mc->rooms, mc->nrooms, s)) {
        msg_send_error(m, mc, 403, "Join the room before sending to it");
        return;
    }
    randid_uuid(id, sizeof(id), "room_");
    fmt_rfc3339(ts, sizeof(ts), NULL, 3);
    f = cJSON_CreateObject();
    cJSON_AddStringToObject(f, "type", "RoomMessage");
    d = cJSON_AddObjectToObject(f, "data");
    cJSON_AddStringToObject(d, "room", room);
    cJSON_AddStringToObject(d, "from", mc->user->id);
    cJSON_AddItemToObject(d, "payload", cJSON_DetachItemFromObjectCaseSensitive(data, "payload"));
    if (!cJSON_GetObjectItem(d, "payload"))
        cJSON_AddNullToObject(d, "payload");
    cJSON_AddStringToObject(d, "message_id", id);
    cJSON_AddStringToObject(d, "timestamp", ts);
    text = cJSON_PrintUnformatted(f);
    cJSON_Delete(f);
    if (text) {
        msg_room_send(m, room, OT_ROOM, text, strlen(text));
        msg_send_ack(m, mc, id);
    }
    free(text);
}

/* A fresh value for a per-walk mark (never 0, which new items hold). */
static uint32_t msg_next_mark(uint32_t *counter)
{
    if (++*counter == 0)
        *counter = 1;
    return *counter;
}

static void msg_on_update_presence(messaging *m, msg_conn *mc, const cJSON *data)
{
    const char *st = jget_str(data, "status");
    msg_user *u = mc->user;
    int idx = -1;
    cJSON *details;

    for (int i = 0; st && i < 4; i++)
        if (strcmp(st, presence_names[i]) == 0)
            idx = i;
    if (idx < 0) {
        msg_send_error(m, mc, 400, "status must be online, away, busy or offline");
        return;
    }
    u->status = (uint8_t)idx;
    u->last_seen = (long long)time(NULL);
    /* Every room any of the user's connections is in hears it, once: a
     * mark per call rather than a search of the earlier connections' rooms,
     * which made a user with many connections in many rooms stall the loop. */
    msg_next_mark(&m->presence_mark);
    for (uint32_t i = 0; i < u->n; i++)
        for (uint16_t r = 0; r < u->conns[i]->nrooms; r++) {
            msg_set *room = u->conns[i]->rooms[r];

            if (room->mark != m->presence_mark) {
                room->mark = m->presence_mark;
                msg_room_presence(m, room->name, u, NULL);
            }
        }
    details = cJSON_CreateObject();
    cJSON_AddStringToObject(details, "presence", presence_names[idx]);
    if (jget_str(data, "message"))
        cJSON_AddStringToObject(details, "message", jget_str(data, "message"));
    msg_send_status(m, mc, "presence_updated", details);
}

typedef struct {
    messaging *m;
    char uid[MSG_MAX_NAME + 1];
    uint64_t conn_id;
    char room[MSG_MAX_NAME + 1];
} msg_gp_ctx;

static void msg_live_query(messaging *m, long long wall);

static int msg_instance_live(const messaging *m, const char *iid, size_t n)
{
    if (strlen(m->host->instance_id) == n && memcmp(m->host->instance_id, iid, n) == 0)
        return 1;
    for (int i = 0; i < m->nlive; i++)
        if (strlen(m->live[i]) == n && memcmp(m->live[i], iid, n) == 0)
            return 1;
    return 0;
}

/* The next user among the room's members from *i on that this walk has
 * not given yet (a walk: one msg_next_mark of messaging.user_mark), or
 * NULL at the end: each user once however many of their connections are
 * members, without comparing each member with every earlier one (which
 * made a large room's GetPresence quadratic on the loop). */
static msg_user *msg_room_next_user(const msg_set *room, uint32_t *i, uint32_t mark)
{
    while (*i < room->n) {
        msg_user *u = room->v[(*i)++]->user;

        if (u->mark != mark) {
            u->mark = mark;
            return u;
        }
    }
    return NULL;
}

static void msg_local_presence(messaging *m, const char *room, cJSON *users)
{
    msg_set *s = msg_set_get(m->rooms, room, 0);
    uint32_t i = 0, mark = msg_next_mark(&m->user_mark);
    msg_user *u;

    while (s && (u = msg_room_next_user(s, &i, mark)))
        cJSON_AddItemToArray(users, msg_presence_entry(u, 0, room));
}

static void msg_send_presence(messaging *m, msg_conn *mc, const char *room, cJSON *users)
{
    cJSON *d = cJSON_CreateObject();

    cJSON_AddStringToObject(d, "room", room);
    cJSON_AddItemToObject(d, "users", users);
    msg_send_frame(m, mc, OT_PRESENCE, d);
}

static void msg_gp_replied(void *ud, redisReply *r)
{
    msg_gp_ctx *x = ud;
    messaging *m = x->m;
    msg_conn *mc = msg_user_conn(m, x->uid, x->conn_id);
    cJSON *users = cJSON_CreateArray();
    strmap *seen = strmap_new();

    if (r && r->type == REDIS_REPLY_ARRAY && seen) {
        for (size_t i = 0; i + 1 < r->elements; i += 2) {
            const char *f = r->element[i]->str, *bar;
            cJSON *e;

            if (r->element[i]->type != REDIS_REPLY_STRING || !(bar = memchr(f, '|', r->element[i]->len)))
                continue;
            /* A dead instance's entry is left out; its reaper deletes
             * it and tells the room (msg_reap_lua), which a deletion here
             * would have kept from knowing the user was there. */
            if (!msg_instance_live(m, f, (size_t)(bar - f)))
                continue;
            if (strmap_get(seen, bar + 1, strlen(bar + 1)))
                continue;
            e = cJSON_ParseWithLength(r->element[i + 1]->str, r->element[i + 1]->len);
            if (e) {
                strmap_put(seen, bar + 1, strlen(bar + 1), e);
                cJSON_AddItemToArray(users, e);
            }
        }
    } else {
        msg_local_presence(m, x->room, users);
    }
    if (mc)
        msg_send_presence(m, mc, x->room, users);
    else
        cJSON_Delete(users);
    strmap_free(seen);
    free(x);
}

static void msg_on_get_presence(messaging *m, msg_conn *mc, const cJSON *data)
{
    const char *room = jget_str(data, "room");
    cJSON *users;

    if (!room || !msg_name_ok(room)) {
        msg_send_error(m, mc, 400, "GetPresence needs a room");
        return;
    }
    if (!msg_may_join(mc, room)) {
        msg_send_error(m, mc, 403, "Not allowed to see that room");
        return;
    }
    if (msg_bus_live(m)) {
        msg_gp_ctx *x = calloc(1, sizeof(*x));
        char key[MSG_MAX_NAME + 32];
        int kn = snprintf(key, sizeof(key), "rt:room:%s:presence", room);
        const char *argv[2] = {"HGETALL", key};
        size_t lens[2] = {7, (size_t)kn};

        /* Which instances are alive is read in the same pipeline, just
         * before the hash, so a young instance is never taken for dead. */
        msg_live_query(m, msg_wall_ms());
        if (x) {
            x->m = m;
            fmt_copy(x->uid, sizeof(x->uid), mc->user->id);
            x->conn_id = wsapp_conn_id(mc->c);
            fmt_copy(x->room, sizeof(x->room), room);
            if (rtbus_command(m->bus, msg_gp_replied, x, 2, argv, lens) == 0)
                return;
            free(x);
        }
    }
    users = cJSON_CreateArray();
    msg_local_presence(m, room, users);
    msg_send_presence(m, mc, room, users);
}

/* The user id of a token: its user_id claim, else sub (SPEC 5a). */
static int msg_claims_user(const cJSON *claims, char out[MSG_MAX_NAME + 1])
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(claims, "user_id");

    if (!v || cJSON_IsNull(v))
        v = cJSON_GetObjectItemCaseSensitive(claims, "sub");
    return msg_user_id_of(v, out);
}

/* The topics claim as NUL-separated entries; *out NULL when absent. */
static int msg_claims_topics(const cJSON *claims, char **out)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(claims, "topics"), *e;
    buf b;

    *out = NULL;
    if (!t || cJSON_IsNull(t))
        return 0;
    if (!cJSON_IsArray(t))
        return -1;
    buf_init(&b, 65536);
    cJSON_ArrayForEach(e, t) {
        if (!cJSON_IsString(e) || !e->valuestring[0])
            continue;
        if (buf_append(&b, e->valuestring, strlen(e->valuestring) + 1) < 0)
            break;
    }
    if (buf_append(&b, "\0", 1) < 0 || b.truncated) {
        buf_free(&b);
        return -1;
    }
    *out = buf_take(&b);
    return *out ? 0 : -1;
}

#define MSG_EXP_MAX_S 7889238000000LL /* about year 250,000 */

/* A time claim in seconds (0 when absent), clamped so that the casts of
 * it stay defined: past year 250,000 it makes no difference, and an
 * overflow made a token look expired. */
static double msg_claims_time(const cJSON *v)
{
    if (!cJSON_IsNumber(v))
        return 0;
    if (v->valuedouble > (double)MSG_EXP_MAX_S)
        return (double)MSG_EXP_MAX_S;
    return v->valuedouble < -(double)MSG_EXP_MAX_S ? -(double)MSG_EXP_MAX_S : v->valuedouble;
}

static long long msg_claims_secs(const cJSON *v)
{
    return (long long)msg_claims_time(v);
}

static long long msg_claims_exp_ms(const cJSON *claims)
{
    return (long long)(msg_claims_time(cJSON_GetObjectItemCaseSensitive(claims, "exp")) * 1000.0);
}

/* Whether a verified token of `uid` still counts: 0, else 401 (its user
 * signed out everywhere after it was issued, or was deactivated) or 503
 * (the database could not be asked), with the reason in `why`. A token
 * without iat counts as issued at the epoch, as in the gateway. A user
 * with no row is let in: realtime's users are the tokens' (user_id or
 * sub), which need not be the gateway's accounts, and nothing of theirs
 * was revoked. */
static int msg_token_revoked(messaging *m, const char *uid, const cJSON *claims, const char **why)
{
    const cJSON *iat = cJSON_GetObjectItemCaseSensitive(claims, "iat");
    char err[256], esc[512];
    int rc;

    if (!m->revocation)
        return 0;
    rc = revocation_check(m->revocation, m->db, uid, msg_claims_secs(iat), err,
                          sizeof(err));
    if (rc < 0) {
        log_event(LOG_WARN, "cannot check token revocation", "\"error\":\"%s\"", log_escape(esc, sizeof(esc), err));
        *why = "the database is unavailable";
        return 503;
    }
    if (rc == REVOCATION_REVOKED || rc == REVOCATION_INACTIVE) {
        *why = revocation_message(rc);
        return 401;
    }
    return 0;
}

/* After a refresh with a narrower topics claim: the subscriptions and
 * private rooms the new token no longer allows are dropped, each told as
 * an unsubscribe or leave would be, so that a renewed token cannot keep
 * what it could not get anew. */
static void msg_recheck_access(messaging *m, msg_conn *mc)
{
    cJSON *gone = cJSON_CreateArray(), *details;
    char name[MSG_MAX_NAME + 1];

    /* Backwards: a removal moves the last entry into the freed place. */
    for (uint16_t i = mc->nsubs; i-- > 0;) {
        msg_set *s = mc->subs[i];

        if (msg_may_listen(mc, s->name))
            continue;
        fmt_copy(name, sizeof(name), s->name);
        cJSON_AddItemToArray(gone, cJSON_CreateString(name));
        msg_list_remove(mc->subs, &mc->nsubs, s);
        if (msg_set_remove(m->topics, s, mc))
            msg_bus_sub(m, "rt:topic:", name, 0);
    }
    if (cJSON_GetArraySize(gone) > 0) {
        details = cJSON_CreateObject();
        cJSON_AddItemToObject(details, "topics", gone);
        msg_send_status(m, mc, "unsubscribed", details);
    } else {
        cJSON_Delete(gone);
    }
    for (uint16_t i = mc->nrooms; i-- > 0;) {
        if (msg_may_join(mc, mc->rooms[i]->name))
            continue;
        fmt_copy(name, sizeof(name), mc->rooms[i]->name);
        msg_leave(m, mc, mc->rooms[i]);
        details = cJSON_CreateObject();
        cJSON_AddStringToObject(details, "room", name);
        msg_send_status(m, mc, "left", details);
    }
}

static void msg_on_refresh(messaging *m, msg_conn *mc, const cJSON *data)
{
    const char *tok = jget_str(data, "token");
    cJSON *claims = NULL, *details;
    char uid[MSG_MAX_NAME + 1], *claim = NULL;
    const char *why;
    int rc;

    if (!tok) {
        msg_send_error(m, mc, 400, "RefreshToken needs a token");
        return;
    }
    rc = jwtauth_verify(m->jwt, tok, &claims);
    if (rc != JWTAUTH_OK) {
        msg_send_error(m, mc, 401, jwtauth_message(rc));
        return;
    }
    if (msg_claims_user(claims, uid) < 0 || strcmp(uid, mc->user->id) != 0) {
        cJSON_Delete(claims);
        msg_send_error(m, mc, 403, "The new token is for another user");
        return;
    }
    if (msg_claims_topics(claims, &claim) < 0) {
        cJSON_Delete(claims);
        msg_send_error(m, mc, 401, "topics claim is not a list");
        return;
    }
    if ((rc = msg_token_revoked(m, uid, claims, &why)) != 0) {
        cJSON_Delete(claims);
        free(claim);
        msg_send_error(m, mc, rc, why);
        return;
    }
    free(mc->claim);
    mc->claim = claim;
    mc->exp_ms = msg_claims_exp_ms(claims);
    details = cJSON_CreateObject();
    cJSON_AddNumberToObject(details, "expires_at", (double)(mc->exp_ms / 1000));
    cJSON_Delete(claims);
    msg_send_status(m, mc, "token_refreshed", details);
    msg_recheck_access(m, mc);
}

/* The length of s cut to at most max bytes without splitting a UTF-8
 * sequence (s is UTF-8). */
static int msg_utf8_prefix(const char *s, size_t max)
{
    size_t n = strnlen(s, max + 1);

    if (n <= max)
        return (int)n;
    n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return (int)n;
}

static int msg_frame_type(const char *t)
{
    for (int i = 0; i < FT_OTHER; i++)
        if (strcmp(t, ft_names[i]) == 0)
            return i;
    return FT_OTHER;
}

static void messaging_message(wsapp_conn *c, void *user, const char *text, size_t len, int binary, void *ud)
{
    messaging *m = ud;
    msg_conn *mc = user;
    cJSON *f, *data;
    const cJSON *type;
    const char *why = "";
    long long now = svc_now_ms();
    int ft;

    (void)c;
    if (m->rate_enabled) {
        int scope = msg_bucket_take(&mc->bucket, m->conn_rate, m->conn_burst, now) < 0                ? 0
                    : msg_bucket_take(&mc->user->bucket, m->user_rate, m->user_burst, now) < 0         ? 1
                    : msg_bucket_take(&m->global, m->global_rate, m->global_burst, now) < 0 ? 2
                                                                                            : -1;

        if (scope >= 0) {
            metrics_counter_inc(m->m_rate[scope]);
            msg_send_error(m, mc, 429, "Rate limit exceeded");
            return;
        }
    }
    if (binary) {
        cJSON *d = cJSON_CreateObject();

        cJSON_AddNumberToObject(d, "size", (double)len);
        msg_send_status(m, mc, "binary_received", d);
        return;
    }
    /* Strictly: a text frame that is not UTF-8 would make every receiver's
     * client fail its connection (RFC 6455, 1007); refused here, only its
     * sender hears. */
    f = jget_parse(text, len, NULL, &why);
    type = cJSON_GetObjectItemCaseSensitive(f, "type");
    if (!f || !cJSON_IsString(type)) {
        metrics_counter_inc(m->m_bad);
        msg_send_error(m, mc, 400, f ? "A frame needs a string type" : strcmp(why, "invalid UTF-8") == 0
                                                                          ? "Frame text is not valid UTF-8"
                                                                          : "Invalid JSON");
        cJSON_Delete(f);
        return;
    }
    data = cJSON_GetObjectItemCaseSensitive(f, "data");
    if (!cJSON_IsObject(data))
        data = NULL;
    ft = msg_frame_type(type->valuestring);
    metrics_counter_inc(m->m_in[ft]);
    if (!data && ft != FT_PING && ft != FT_PONG && ft != FT_OTHER) {
        metrics_counter_inc(m->m_bad);
        msg_send_error(m, mc, 400, "data must be an object");
        cJSON_Delete(f);
        return;
    }
    switch (ft) {
    case FT_PING: msg_on_ping(m, mc, data); break;
    case FT_SUBSCRIBE: msg_on_subscribe(m, mc, data, 1); break;
    case FT_UNSUBSCRIBE: msg_on_subscribe(m, mc, data, 0); break;
    case FT_BROADCAST: msg_on_broadcast(m, mc, data); break;
    case FT_DIRECT: msg_on_direct(m, mc, data); break;
    case FT_JOIN: msg_on_join(m, mc, data, 1); break;
    case FT_LEAVE: msg_on_join(m, mc, data, 0); break;
    case FT_ROOM: msg_on_room_message(m, mc, data); break;
    case FT_UPDATE_PRESENCE: msg_on_update_presence(m, mc, data); break;
    case FT_GET_PRESENCE: msg_on_get_presence(m, mc, data); break;
    case FT_REFRESH: msg_on_refresh(m, mc, data); break;
    /* wsapp counted the frame for liveness already; nothing is answered. */
    case FT_PONG: break;
    default: {
        char msg[128];

        metrics_counter_inc(m->m_bad);
        snprintf(msg, sizeof(msg), "Unknown message type %.*s", msg_utf8_prefix(type->valuestring, 64),
                 type->valuestring);
        msg_send_error(m, mc, 400, msg);
    }
    }
    cJSON_Delete(f);
}

static void messaging_too_big(wsapp_conn *c, void *user, size_t size, void *ud)
{
    char msg[128];

    (void)c;
    metrics_counter_inc(((messaging *)ud)->m_bad);
    snprintf(msg, sizeof(msg), "Frame of %zu bytes exceeds the limit of 65536", size);
    msg_send_error(ud, user, 400, msg);
}

/* ---- connection lifecycle ------------------------------------------------- */

/* A token from the four places of SPEC 5a; *proto gets the subprotocol
 * to echo when it came from there. */
static const char *msg_find_token(wsapp_req *req, char **proto)
{
    const char *t = wsapp_req_query(req, "token"), *list;

    *proto = NULL;
    if (t && *t)
        return t;
    t = wsapp_req_query(req, "access_token");
    if (t && *t)
        return t;
    t = jwtauth_bearer(wsapp_req_header(req, "Authorization"));
    if (t)
        return t;
    list = wsapp_req_subprotocols(req);
    while (list && *list) {
        size_t n;

        while (*list == ' ' || *list == ',')
            list++;
        n = strcspn(list, ", ");
        if (n > 13 && strncmp(list, "access_token.", 13) == 0) {
            *proto = malloc(n + 1);
            if (!*proto)
                return NULL;
            memcpy(*proto, list, n);
            (*proto)[n] = '\0';
            return *proto + 13;
        }
        list += n;
    }
    return NULL;
}

static int messaging_accept(wsapp_req *req, void *user, void *ud)
{
    messaging *m = ud;
    msg_conn *mc = user;
    char *proto = NULL, uid[MSG_MAX_NAME + 1];
    const char *tok, *why;
    cJSON *claims = NULL;
    msg_user *u;
    int rc;

    if (m->nconns >= m->max_connections) {
        wsapp_respond(req, 503, "application/json", "{\"error\":\"Server at capacity\"}", 30);
        return -1;
    }
    tok = msg_find_token(req, &proto);
    if (!tok) {
        wsapp_respond_error(req, 401, "unauthorized", "missing token", NULL);
        goto refused;
    }
    rc = jwtauth_verify(m->jwt, tok, &claims);
    if (rc == JWTAUTH_OK && msg_claims_user(claims, uid) < 0)
        rc = JWTAUTH_EMISSING;
    if (rc == JWTAUTH_OK && msg_claims_topics(claims, &mc->claim) < 0)
        rc = JWTAUTH_EMALFORMED;
    if (rc != JWTAUTH_OK) {
        wsapp_respond_error(req, 401, "unauthorized", jwtauth_message(rc), NULL);
        goto refused;
    }
    if ((rc = msg_token_revoked(m, uid, claims, &why)) != 0) {
        wsapp_respond_error(req, rc, rc == 401 ? "unauthorized" : "unavailable", why, NULL);
        goto refused;
    }
    /* Per instance, like MAX_CONNECTIONS: each realtime process sharing
     * the port lets a user hold this many. */
    if ((u = msg_user_get(m, uid, 0)) && u->n >= (uint32_t)m->max_user_connections) {
        metrics_counter_inc(m->m_user_cap);
        wsapp_respond_error(req, 429, "too_many_connections", "too many connections for this user", NULL);
        goto refused;
    }
    if (!(mc->uid = strdup(uid))) {
        wsapp_respond_error(req, 503, "unavailable", "out of memory", NULL);
        goto refused;
    }
    mc->exp_ms = msg_claims_exp_ms(claims);
    if (proto)
        wsapp_req_set_subprotocol(req, proto);
    cJSON_Delete(claims);
    free(proto);
    return 0;

refused:
    cJSON_Delete(claims);
    free(proto);
    free(mc->claim);
    mc->claim = NULL;
    return -1;
}

static void messaging_open(wsapp_conn *c, void *user, void *ud)
{
    messaging *m = ud;
    msg_conn *mc = user;
    msg_user *u = msg_user_get(m, mc->uid, 1);
    cJSON *d;
    char id[32];

    mc->c = c;
    m->nconns++;
    free(mc->uid);
    mc->uid = NULL;
    if (!u || msg_user_reserve(u) < 0) {
        if (u && u->n == 0)
            msg_user_drop_conn(m, u, mc);
        wsapp_conn_close(c, 1011, "out of memory");
        return;
    }
    u->conns[u->n++] = mc;
    if (u->n == 1)
        u->last_seen = (long long)time(NULL);
    mc->user = u;
    mc->next_ping_ms = svc_now_ms() + m->heartbeat_ms;
    d = cJSON_CreateObject();
    snprintf(id, sizeof(id), "%llu", (unsigned long long)wsapp_conn_id(c));
    cJSON_AddStringToObject(d, "connection_id", id);
    cJSON_AddNumberToObject(d, "server_time", (double)time(NULL));
    cJSON_AddStringToObject(d, "protocol_version", "1.0");
    msg_send_status(m, mc, "connected", d);
}

static void messaging_close(wsapp_conn *c, void *user, void *ud)
{
    messaging *m = ud;
    msg_conn *mc = user;

    /* c is NULL for a handshake that never opened (not counted). */
    if (c)
        m->nconns--;
    while (mc->user && mc->nrooms)
        msg_leave(m, mc, mc->rooms[mc->nrooms - 1]);
    while (mc->nsubs) {
        msg_set *s = mc->subs[--mc->nsubs];
        char name[MSG_MAX_NAME + 1];

        fmt_copy(name, sizeof(name), s->name);
        if (msg_set_remove(m->topics, s, mc))
            msg_bus_sub(m, "rt:topic:", name, 0);
    }
    if (mc->user) {
        mc->user->last_seen = (long long)time(NULL);
        msg_user_drop_conn(m, mc->user, mc);
    }
    free(mc->subs);
    free(mc->rooms);
    free(mc->claim);
    free(mc->uid);
}

/* ---- Redis ------------------------------------------------------------------ */

static void msg_bus_refused(messaging *m, const char *ch, size_t clen, size_t plen, const char *why)
{
    char name[128], esc[512];

    metrics_counter_inc(m->m_bad);
    snprintf(name, sizeof(name), "%.*s", (int)(clen < sizeof(name) - 1 ? clen : sizeof(name) - 1), ch);
    log_event(LOG_WARN, why, "\"channel\":\"%s\",\"bytes\":%zu", log_escape(esc, sizeof(esc), name), plen);
}

/* One JSON object (UTF-8) or NULL, refused with a log line: anyone who
 * can publish on Redis reaches these channels, and their bytes would
 * reach every client (a browser fails the connection on bad UTF-8). */
static cJSON *msg_bus_object(messaging *m, const char *ch, size_t clen, const char *payload, size_t plen)
{
    cJSON *parsed = jget_parse(payload, plen, NULL, NULL);

    if (cJSON_IsObject(parsed))
        return parsed;
    cJSON_Delete(parsed);
    msg_bus_refused(m, ch, clen, plen, "bus message refused: not one UTF-8 JSON object");
    return NULL;
}

/* Other services publish on rt:topic: one JSON object goes out, and as
 * cJSON prints it, not as it came (its bytes would reach every
 * subscriber, numbers like 01 included). */
static void msg_bus_topic(messaging *m, const char *ch, size_t clen, const char *payload, size_t plen)
{
    cJSON *parsed = msg_bus_object(m, ch, clen, payload, plen);
    char *text = parsed ? cJSON_PrintUnformatted(parsed) : NULL;

    if (text && !msg_own_echo(m, parsed))
        msg_deliver_topic(m, ch + 9, text, strlen(text), parsed);
    free(text);
    cJSON_Delete(parsed);
}

/* rt:user: carries the data of a DirectMessage, rt:room: a whole
 * RoomMessage or PresenceUpdate frame, from another instance (tagged).
 * What parses as JSON is valid to send as it came. */
static void msg_bus_user(messaging *m, const char *ch, size_t clen, const char *payload, size_t plen)
{
    msg_user *u = msg_user_get(m, ch + 8, 0);
    cJSON *parsed;
    wsapp_msg *w;

    if (!u || !(payload = msg_untag(m, payload, plen, &plen)) ||
        !(parsed = msg_bus_object(m, ch, clen, payload, plen)))
        return;
    cJSON_Delete(parsed);
    if ((w = msg_build("DirectMessage", payload, plen))) {
        msg_fanout(m, u->conns, u->n, OT_DIRECT, w);
        wsapp_msg_unref(w);
    }
}

static void msg_bus_room(messaging *m, const char *ch, size_t clen, const char *payload, size_t plen)
{
    msg_set *s = msg_set_get(m->rooms, ch + 8, 0);
    const char *type;
    cJSON *parsed;
    wsapp_msg *w;
    int ot;

    if (!s || !(payload = msg_untag(m, payload, plen, &plen)) ||
        !(parsed = msg_bus_object(m, ch, clen, payload, plen)))
        return;
    type = jget_str(parsed, "type");
    ot = !type                                 ? -1
         : strcmp(type, "PresenceUpdate") == 0 ? OT_PRESENCE_UPDATE
         : strcmp(type, "RoomMessage") == 0    ? OT_ROOM
                                               : -1;
    cJSON_Delete(parsed);
    if (ot < 0) {
        msg_bus_refused(m, ch, clen, plen, "bus message refused: not a RoomMessage or PresenceUpdate frame");
        return;
    }
    if ((w = wsapp_msg_new(payload, plen, 0))) {
        msg_fanout(m, s->v, s->n, ot, w);
        wsapp_msg_unref(w);
    }
}

static void msg_bus_message(void *ud, const char *ch, size_t clen, const char *payload, size_t plen)
{
    messaging *m = ud;

    if (clen > 9 && memcmp(ch, "rt:topic:", 9) == 0)
        msg_bus_topic(m, ch, clen, payload, plen);
    else if (clen > 8 && memcmp(ch, "rt:user:", 8) == 0)
        msg_bus_user(m, ch, clen, payload, plen);
    else if (clen > 8 && memcmp(ch, "rt:room:", 8) == 0)
        msg_bus_room(m, ch, clen, payload, plen);
}

static void msg_live_replied(void *ud, redisReply *r)
{
    messaging *m = ud;

    if (!r || r->type != REDIS_REPLY_ARRAY)
        return;
    for (int i = 0; i < m->nlive; i++)
        free(m->live[i]);
    free(m->live);
    m->live = calloc(r->elements + 1, sizeof(char *));
    m->nlive = 0;
    for (size_t i = 0; m->live && i < r->elements; i++)
        if (r->element[i]->type == REDIS_REPLY_STRING && (m->live[m->nlive] = strdup(r->element[i]->str)))
            m->nlive++;
}

static void msg_live_query(messaging *m, long long wall)
{
    char min[32];
    const char *zrange[4] = {"ZRANGEBYSCORE", "rt:instances", min, "+inf"};

    snprintf(min, sizeof(min), "%lld", wall - m->presence_ttl_ms);
    rtbus_command(m->bus, msg_live_replied, m, 4, zrange, NULL);
}

/* ---- dead instances ------------------------------------------------------------ */

/* Claims a dead instance, ARGV[1], whose last heartbeat in rt:instances
 * (KEYS[1]) is older than ARGV[2] (ms). One script, so it is atomic: of the
 * live instances that notice the death, exactly one claims it, and none
 * does once the instance heartbeated again. It removes the dead instance's
 * entries from the presence hash of every room of its index and returns
 * {id, last heartbeat, room, user, room, user...}: the users it held in a
 * room that no other instance holds there (they are offline now), or {}
 * when someone else claimed it first. */
static const char msg_reap_lua[] =
    "local s = redis.call('ZSCORE', KEYS[1], ARGV[1])\n"
    "if not s or tonumber(s) >= tonumber(ARGV[2]) then return {} end\n"
    "local idx, me, out = 'rt:instance:' .. ARGV[1] .. ':rooms', ARGV[1] .. '|', {ARGV[1], s}\n"
    "for _, room in ipairs(redis.call('SMEMBERS', idx)) do\n"
    "  local key = 'rt:room:' .. room .. ':presence'\n"
    "  local h, mine, others = redis.call('HGETALL', key), {}, {}\n"
    "  for i = 1, #h, 2 do\n"
    "    local bar = string.find(h[i], '|', 1, true)\n"
    "    if bar and string.sub(h[i], 1, bar) == me then mine[#mine + 1] = h[i]\n"
    "    elseif bar then others[string.sub(h[i], bar + 1)] = true end\n"
    "  end\n"
    "  for _, f in ipairs(mine) do\n"
    "    redis.call('HDEL', key, f)\n"
    "    local uid = string.sub(f, #me + 1)\n"
    "    if not others[uid] then out[#out + 1] = room; out[#out + 1] = uid end\n"
    "  end\n"
    "end\n"
    "redis.call('DEL', idx)\n"
    "redis.call('ZREM', KEYS[1], ARGV[1])\n"
    "return out\n";

/* Dead instances claimed per registry turn: a Redis shared with many
 * killed instances (tests, crashes) is cleaned a few at a time. */
#define MSG_REAP_BATCH "16"

static int msg_reply_str(const redisReply *r) { return r->type == REDIS_REPLY_STRING; }

/* Tells the room, through Redis to every instance's members, that a user
 * of a dead instance went offline, last seen at its last heartbeat. */
static void msg_announce_offline(messaging *m, const char *room, const char *uid, const char *last_seen)
{
    cJSON *d = cJSON_CreateObject();

    cJSON_AddStringToObject(d, "room", room);
    cJSON_AddStringToObject(d, "user_id", uid);
    cJSON_AddStringToObject(d, "status", "offline");
    cJSON_AddStringToObject(d, "last_seen", last_seen);
    msg_room_send_presence(m, room, d);
}

static void msg_reap_replied(void *ud, redisReply *r)
{
    messaging *m = ud;
    char ts[FMT_RFC3339_MAX], esc[256];
    size_t told = 0;

    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 2 || !msg_reply_str(r->element[0]) ||
        !msg_reply_str(r->element[1]))
        return;
    fmt_rfc3339(ts, sizeof(ts), &(struct timespec){.tv_sec = (time_t)(strtod(r->element[1]->str, NULL) / 1000)}, 0);
    for (size_t i = 2; i + 1 < r->elements; i += 2) {
        const char *room = r->element[i]->str, *uid = r->element[i + 1]->str;

        /* Names others wrote into a shared Redis get the checks a client's get. */
        if (msg_reply_str(r->element[i]) && msg_reply_str(r->element[i + 1]) && msg_name_ok(room) && msg_name_ok(uid)) {
            msg_announce_offline(m, room, uid, ts);
            told++;
        }
    }
    log_event(LOG_INFO, "dead instance's presence removed", "\"instance_id\":\"%s\",\"users_offline\":%zu",
              log_escape(esc, sizeof(esc), r->element[0]->str), told);
}

static void msg_dead_replied(void *ud, redisReply *r)
{
    messaging *m = ud;
    char cutoff[32];

    if (!r || r->type != REDIS_REPLY_ARRAY)
        return;
    snprintf(cutoff, sizeof(cutoff), "%lld", msg_wall_ms() - m->presence_ttl_ms);
    for (size_t i = 0; i < r->elements; i++) {
        const char *id = r->element[i]->str;
        const char *argv[6] = {"EVAL", msg_reap_lua, "1", "rt:instances", id, cutoff};

        /* This instance, late with its own heartbeat, is not its own reaper. */
        if (msg_reply_str(r->element[i]) && strcmp(id, m->host->instance_id) != 0)
            rtbus_command(m->bus, msg_reap_replied, m, 6, argv, NULL);
    }
}

typedef struct {
    messaging *m;
    int announce;       /* tell the rooms too (PresenceUpdate), not only write */
    uint32_t room_mark; /* the rooms done in this walk */
} msg_restore_ctx;

/* Every room of the connection not done yet in this walk, each of its
 * users once (a mark per room's walk): the walk is linear in the
 * memberships however many connections a user has. */
static void msg_restore_one(wsapp_conn *c, void *user, void *ud)
{
    msg_restore_ctx *x = ud;
    msg_conn *mc = user;

    if (wsapp_conn_route_ud(c) != x->m || !mc->user)
        return;
    for (uint16_t r = 0; r < mc->nrooms; r++) {
        msg_set *room = mc->rooms[r];
        uint32_t i = 0, user_mark;
        msg_user *u;

        if (room->mark == x->room_mark)
            continue;
        room->mark = x->room_mark;
        user_mark = msg_next_mark(&x->m->user_mark);
        while ((u = msg_room_next_user(room, &i, user_mark))) {
            if (x->announce)
                msg_room_presence(x->m, room->name, u, NULL);
            else
                msg_presence_store(x->m, room->name, u, 0);
        }
    }
}

/* Writes every presence entry of this instance again, and announces each
 * user to its rooms when `announce`. */
static void msg_restore(messaging *m, int announce)
{
    msg_restore_ctx x = {m, announce, msg_next_mark(&m->presence_mark)};

    m->presence_lost = 0;
    wsapp_foreach_conn(m->host->app, msg_restore_one, &x);
}

/* ZADD answers 1 when the id was not in rt:instances. After the first
 * time, that means others took this instance for dead (it was paused, or
 * cut from Redis, for longer than PRESENCE_TTL), removed its presence and
 * told the rooms: every user of every room here is written and announced
 * again. The first time, entries written before Redis answered (it was
 * down at the start) are written again. */
static void msg_registered(void *ud, redisReply *r)
{
    messaging *m = ud;

    if (!r || r->type != REDIS_REPLY_INTEGER)
        return;
    if (r->integer == 1 && m->registered) {
        log_warn("taken for dead by other instances: presence announced again");
        msg_restore(m, 1);
    } else if (r->integer == 1 || m->presence_lost) {
        msg_restore(m, 0);
    }
    m->registered = 1;
}

/* Announces this instance in rt:instances (scored by time), reads which
 * others are alive (GetPresence leaves out the entries of the others), and
 * claims the dead ones (msg_reap_lua). */
static void msg_registry(messaging *m, long long wall)
{
    char now[32], max[32];
    const char *zadd[4] = {"ZADD", "rt:instances", now, m->host->instance_id};
    const char *dead[7] = {"ZRANGEBYSCORE", "rt:instances", "-inf", max, "LIMIT", "0", MSG_REAP_BATCH};

    snprintf(now, sizeof(now), "%lld", wall);
    snprintf(max, sizeof(max), "(%lld", wall - m->presence_ttl_ms);
    rtbus_command(m->bus, msg_registered, m, 4, zadd, NULL);
    msg_live_query(m, wall);
    rtbus_command(m->bus, msg_dead_replied, m, 7, dead, NULL);
}

/* ---- the sweep: expiry, heartbeat, timeouts ---------------------------------- */

typedef struct {
    messaging *m;
    long long now, wall;
    wsapp_msg *ping;
} msg_sweep_ctx;

static void msg_sweep_one(wsapp_conn *c, void *user, void *ud)
{
    msg_sweep_ctx *x = ud;
    msg_conn *mc = user;

    /* Connections of other routes (/rt) carry other data and protocols. */
    if (wsapp_conn_route_ud(c) != x->m)
        return;
    if (mc->exp_ms && x->wall >= mc->exp_ms) {
        metrics_counter_inc(x->m->m_expired);
        wsapp_conn_close(c, 4001, "Token expired");
        return;
    }
    if (x->now - wsapp_conn_last_rx_ms(c) > x->m->client_timeout_ms) {
        metrics_counter_inc(x->m->m_timeouts);
        wsapp_conn_close(c, 4000, "Client timeout");
        return;
    }
    if (x->now >= mc->next_ping_ms) {
        mc->next_ping_ms = x->now + x->m->heartbeat_ms;
        wsapp_conn_ping(c);
        if (x->ping && wsapp_conn_send(c, x->ping) == 0)
            metrics_counter_inc(x->m->m_out[OT_PING]);
    }
}

static long msg_rss_kb(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;

    if (!f)
        return 0;
    if (fscanf(f, "%ld %ld", &pages, &rss) != 2)
        rss = 0;
    fclose(f);
    return rss * (sysconf(_SC_PAGESIZE) / 1024);
}

static void msg_sweep(wsapp_timer *t, void *ud)
{
    messaging *m = ud;
    msg_sweep_ctx x = {m, svc_now_ms(), msg_wall_ms(), NULL};
    char ping[96];
    int n = snprintf(ping, sizeof(ping), "{\"type\":\"Ping\",\"data\":{\"timestamp\":%lld}}", x.wall);
    int conns = wsapp_conn_count(m->host->app);

    x.ping = wsapp_msg_new(ping, (size_t)n, 0);
    wsapp_foreach_conn(m->host->app, msg_sweep_one, &x);
    wsapp_msg_unref(x.ping);
    if (m->bus && x.now >= m->next_registry_ms) {
        m->next_registry_ms = x.now + m->presence_ttl_ms / 3;
        msg_registry(m, x.wall);
    }
    metrics_gauge_set(m->m_bytes_per_conn, conns ? (double)(msg_rss_kb() - m->rss_base_kb) * 1024.0 / conns : 0);
    metrics_gauge_set(m->m_topics, (double)strmap_count(m->topics));
    metrics_gauge_set(m->m_rooms, (double)strmap_count(m->rooms));
    metrics_gauge_set(m->m_users, (double)strmap_count(m->users));
    wsapp_timer_set(t, 1000);
}

/* ---- routing rules ------------------------------------------------------------ */

static int msg_load_rules(messaging *m, char *err, size_t errlen)
{
    FILE *f;
    buf b;
    char chunk[4096];
    size_t n;
    cJSON *root, *r;

    if (!m->rules_path[0])
        return 0;
    if (!(f = fopen(m->rules_path, "r"))) {
        snprintf(err, errlen, "cannot open %s", m->rules_path);
        return -1;
    }
    buf_init(&b, 1 << 20);
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        buf_append(&b, chunk, n);
    fclose(f);
    root = cJSON_ParseWithLength(buf_str(&b), b.len);
    buf_free(&b);
    if (cJSON_IsObject(root))
        r = cJSON_GetObjectItemCaseSensitive(root, "rules");
    else
        r = root;
    if (!cJSON_IsArray(r)) {
        cJSON_Delete(root);
        snprintf(err, errlen, "%s: expected a JSON array of rules (or {\"rules\":[...]})", m->rules_path);
        return -1;
    }
    for (cJSON *e = r->child; e; e = e->next) {
        msg_rule *rule = &m->rules[m->nrules];
        const char *match = jget_str(e, "match"), *action = jget_str(e, "action");

        if (m->nrules >= MSG_MAX_RULES || !match || !action) {
            snprintf(err, errlen, "%s: rule %d needs match and action (at most %d rules)", m->rules_path,
                     m->nrules + 1, MSG_MAX_RULES);
            cJSON_Delete(root);
            return -1;
        }
        rule->plen = strlen(match);
        rule->prefix = rule->plen && match[rule->plen - 1] == '*';
        if (rule->prefix)
            rule->plen--;
        rule->pattern = strndup(match, rule->plen);
        if (strcmp(action, "drop") == 0) {
            rule->kind = RULE_DROP;
        } else if (strcmp(action, "copy") == 0 && jget_str(e, "to")) {
            rule->kind = RULE_COPY;
            rule->to = strdup(jget_str(e, "to"));
        } else if (strcmp(action, "filter") == 0 && jget_str(e, "field") &&
                   cJSON_GetObjectItemCaseSensitive(e, "equals")) {
            rule->kind = RULE_FILTER;
            rule->field = strdup(jget_str(e, "field"));
            rule->equals = cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(e, "equals"), 1);
        } else {
            snprintf(err, errlen, "%s: rule %d: action is drop, copy (with to) or filter (with field and equals)",
                     m->rules_path, m->nrules + 1);
            free(rule->pattern);
            cJSON_Delete(root);
            return -1;
        }
        m->nrules++;
    }
    cJSON_Delete(root);
    return 0;
}

/* ---- module hooks --------------------------------------------------------------- */

static void *messaging_configure(cfg *c)
{
    messaging *m = calloc(1, sizeof(*m));
    long rate, burst;

    if (!m)
        return NULL;
    m->max_connections = cfg_int(c, "MAX_CONNECTIONS", 10000, 1, 1000000);
    m->max_user_connections = cfg_int(c, "MAX_CONNECTIONS_PER_USER", 100, 1, 1000000);
    m->heartbeat_ms = cfg_duration_ms(c, "HEARTBEAT_INTERVAL", 30000, 1000);
    m->client_timeout_ms = cfg_duration_ms(c, "CLIENT_TIMEOUT", 60000, 1000);
    m->presence_ttl_ms = cfg_duration_ms(c, "PRESENCE_TTL", 30000, 1000);
    m->rate_enabled = cfg_bool(c, "RATE_LIMIT_ENABLED", 1);
    rate = cfg_int(c, "RATE_LIMIT_PER_SECOND", 100, 1, 100000000);
    burst = cfg_int(c, "RATE_LIMIT_BURST", 200, 1, 100000000);
    m->conn_rate = (double)rate;
    m->conn_burst = (double)burst;
    m->user_rate = (double)cfg_int(c, "RATE_LIMIT_USER_PER_SECOND", rate * 2, 1, 100000000);
    m->user_burst = (double)cfg_int(c, "RATE_LIMIT_USER_BURST", burst * 2, 1, 100000000);
    m->global_rate = (double)cfg_int(c, "RATE_LIMIT_GLOBAL_PER_SECOND", 100000, 1, 1000000000);
    m->global_burst = (double)cfg_int(c, "RATE_LIMIT_GLOBAL_BURST", 200000, 1, 1000000000);
    m->send_queue_bytes = (size_t)cfg_int(c, "SEND_QUEUE_BYTES", 262144, 4096, 1L << 30);
    m->bus_queue_bytes = (size_t)cfg_int(c, "REDIS_QUEUE_BYTES", 64L << 20, 4096, 1L << 40);
    fmt_copy(m->rules_path, sizeof(m->rules_path), cfg_str(c, "ROUTING_RULES", ""));
    fmt_copy(m->jwt_secret, sizeof(m->jwt_secret), cfg_secret(c, "JWT_SECRET", "dev-jwt-secret-change-me"));
    fmt_copy(m->jwt_iss, sizeof(m->jwt_iss), cfg_str(c, "JWT_ISSUER", ""));
    fmt_copy(m->jwt_aud, sizeof(m->jwt_aud), cfg_str(c, "JWT_AUDIENCE", ""));
    m->token_cache_ttl_ms = cfg_duration_ms(c, "TOKEN_STATE_CACHE_TTL", 60000, 1000);
    if (m->client_timeout_ms <= m->heartbeat_ms)
        cfg_error(c, "CLIENT_TIMEOUT", cfg_str(c, "CLIENT_TIMEOUT", "60s"), "a duration longer than HEARTBEAT_INTERVAL");
    return m;
}

static int messaging_attach(void *state, rt_host *host)
{
    messaging *m = state;
    wsapp_ws_handlers h = {0};
    char err[1400];
    metrics *mx = host->metrics;

    m->host = host;
    m->jwt = jwtauth_new(m->jwt_secret, m->jwt_iss[0] ? m->jwt_iss : NULL, m->jwt_aud[0] ? m->jwt_aud : NULL, 0);
    m->topics = strmap_new();
    m->rooms = strmap_new();
    m->users = strmap_new();
    m->own = strmap_new();
    m->sweep = wsapp_timer_new(host->app, msg_sweep, m);
    if (!m->jwt || !m->topics || !m->rooms || !m->users || !m->own || !m->sweep)
        return -1;
    /* bin/realtime always has a database (DATABASE_URL or its defaults);
     * a host without one (the fuzz harness) checks no token state. */
    if (host->conninfo) {
        m->db = dbpool_new(host->conninfo, 1);
        m->revocation = revocation_new(host->conninfo, m->token_cache_ttl_ms, "realtime", "realtime");
        if (!m->db || !m->revocation)
            return -1;
        /* A miss is read on the loop: a database that stops answering must
         * cost one handshake half a second, not freeze every connection. */
        revocation_set_read_timeout(m->revocation, 500);
    }
    if (msg_load_rules(m, err, sizeof(err)) < 0) {
        log_error("ROUTING_RULES: %s", err);
        return -1;
    }
    if (host->redis_configured && !(m->bus = rtbus_new(host->redis, host->app, m->bus_queue_bytes, mx, msg_bus_message, m)))
        return -1;
    for (int i = 0; i < FT_COUNT; i++) {
        char lab[64];

        snprintf(lab, sizeof(lab), "type=\"%s\"", ft_names[i]);
        m->m_in[i] = metrics_counter_get(mx, "realtime_frames_in_total", "Client frames received, by type", lab);
    }
    for (int i = 0; i < OT_COUNT; i++) {
        char lab[64];

        snprintf(lab, sizeof(lab), "type=\"%s\"", ot_names[i]);
        m->m_out[i] = metrics_counter_get(mx, "realtime_frames_out_total", "Server frames queued, by type", lab);
    }
    m->m_deliveries = metrics_counter_get(mx, "realtime_deliveries_total",
                                          "Broadcast, direct and room messages queued to receivers", NULL);
    m->m_rate[0] = metrics_counter_get(mx, "realtime_rate_limited_total", "Frames refused by a token bucket",
                                       "scope=\"connection\"");
    m->m_rate[1] = metrics_counter_get(mx, "realtime_rate_limited_total", "Frames refused by a token bucket",
                                       "scope=\"user\"");
    m->m_rate[2] = metrics_counter_get(mx, "realtime_rate_limited_total", "Frames refused by a token bucket",
                                       "scope=\"global\"");
    m->m_user_cap = metrics_counter_get(mx, "realtime_user_connection_refusals_total",
                                        "Handshakes refused by MAX_CONNECTIONS_PER_USER", NULL);
    m->m_bad = metrics_counter_get(mx, "realtime_bad_frames_total", "Frames answered with Error 400", NULL);
    m->m_expired = metrics_counter_get(mx, "realtime_token_expired_total", "Connections closed at token expiry",
                                       NULL);
    m->m_timeouts = metrics_counter_get(mx, "realtime_client_timeouts_total",
                                        "Connections closed for not answering the heartbeat", NULL);
    m->m_bytes_per_conn = metrics_gauge_get(mx, "realtime_bytes_per_connection",
                                            "Resident memory grown since start divided by open connections", NULL);
    m->m_topics = metrics_gauge_get(mx, "realtime_topics", "Topics with a subscriber here", NULL);
    m->m_rooms = metrics_gauge_get(mx, "realtime_rooms", "Rooms with a member here", NULL);
    m->m_users = metrics_gauge_get(mx, "realtime_users", "Users connected here", NULL);
    h.user_size = sizeof(msg_conn);
    h.accept = messaging_accept;
    h.open = messaging_open;
    h.message = messaging_message;
    h.too_big = messaging_too_big;
    h.close = messaging_close;
    return wsapp_ws_route(host->app, "/ws", &h, m);
}

static void msg_start_on_loop(wsapp *app, void *ud)
{
    messaging *m = ud;

    (void)app;
    m->rss_base_kb = msg_rss_kb();
    wsapp_timer_set(m->sweep, 1000);
    if (m->bus) {
        m->next_registry_ms = svc_now_ms() + m->presence_ttl_ms / 3;
        msg_registry(m, msg_wall_ms());
    }
}

static int messaging_start(void *state)
{
    messaging *m = state;

    if (m->bus && rtbus_start(m->bus) < 0)
        return -1;
    return wsapp_post(m->host->app, msg_start_on_loop, m);
}

static int messaging_health(void *state, cJSON *body)
{
    messaging *m = state;
    long n = m->nconns;

    cJSON_AddNumberToObject(body, "active_connections", (double)n);
    cJSON_AddNumberToObject(body, "max_connections", (double)m->max_connections);
    if (n >= m->max_connections) {
        cJSON_AddStringToObject(body, "reason", "At capacity");
        return 1;
    }
    return 0;
}

static void messaging_info(void *state, cJSON *body)
{
    messaging *m = state;
    cJSON *lim = cJSON_AddObjectToObject(body, "limits");

    cJSON_AddNumberToObject(lim, "max_connections", (double)m->max_connections);
    cJSON_AddNumberToObject(lim, "max_connections_per_user", (double)m->max_user_connections);
    cJSON_AddNumberToObject(lim, "max_frame_bytes", 65536);
    cJSON_AddNumberToObject(lim, "send_queue_bytes", (double)m->send_queue_bytes);
    cJSON_AddBoolToObject(lim, "rate_limit_enabled", m->rate_enabled);
    cJSON_AddNumberToObject(lim, "rate_limit_per_second", m->conn_rate);
    cJSON_AddNumberToObject(lim, "rate_limit_burst", m->conn_burst);
    cJSON_AddNumberToObject(lim, "user_rate_limit_per_second", m->user_rate);
    cJSON_AddNumberToObject(lim, "global_rate_limit_per_second", m->global_rate);
    cJSON_AddNumberToObject(lim, "heartbeat_interval_seconds", (double)m->heartbeat_ms / 1000.0);
    cJSON_AddNumberToObject(lim, "client_timeout_seconds", (double)m->client_timeout_ms / 1000.0);
    cJSON_AddStringToObject(body, "redis", !m->bus ? "disabled" : rtbus_up(m->bus) ? "connected" : "disconnected");
    cJSON_AddNumberToObject(body, "active_connections", (double)m->nconns);
    cJSON_AddNumberToObject(body, "routing_rules", m->nrules);
}

/* After the loop ended, before the server is freed: the timer needs the
 * lws context, and close hooks still to come must find no bus. */
static void messaging_stop(void *state)
{
    messaging *m = state;

    rtbus_free(m->bus);
    m->bus = NULL;
    wsapp_timer_free(m->sweep);
    m->sweep = NULL;
}

static void msg_free_sets(strmap *map)
{
    /* Every connection closed before this, so the maps are empty. */
    strmap_free(map);
}

static void messaging_free(void *state)
{
    messaging *m = state;

    rtbus_free(m->bus);
    revocation_free(m->revocation);
    dbpool_free(m->db);
    jwtauth_free(m->jwt);
    msg_free_sets(m->topics);
    msg_free_sets(m->rooms);
    msg_free_sets(m->users);
    for (int i = 0; i < m->nrules; i++) {
        free(m->rules[i].pattern);
        free(m->rules[i].to);
        free(m->rules[i].field);
        cJSON_Delete(m->rules[i].equals);
    }
    for (int i = 0; i < m->nlive; i++)
        free(m->live[i]);
    free(m->live);
    for (int i = 0; i < MSG_OWN_RING; i++)
        free(m->own_ring[i]);
    strmap_free(m->own);
    free(m);
}

const rt_module messaging_module = {
    .name = "messaging",
    .configure = messaging_configure,
    .attach = messaging_attach,
    .start = messaging_start,
    .health = messaging_health,
    .info = messaging_info,
    .stop = messaging_stop,
    .free = messaging_free,
};
