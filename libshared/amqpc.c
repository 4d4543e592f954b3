#include "amqpc.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>

#include <amqp_framing.h>
#include <amqp_tcp_socket.h>

#include "backoff.h"
#include "log.h"
#include "redact.h"
#include "svc.h"

#define AMQPC_ERR_MAX 512
#define AMQPC_CHANNEL 1
#define AMQPC_TIMEOUT_S 5
#define AMQPC_FRAME_MAX 131072
#define AMQPC_BACKOFF_BASE_MS 100
#define AMQPC_BACKOFF_MAX_MS 5000

struct amqpc {
    char *urlbuf; /* amqp_parse_url points ci's strings into this copy */
    struct amqp_connection_info ci;
    const char *vhost;
    char name[128];
    amqp_connection_state_t conn;
    int connected;
    unsigned long generation;
    backoff bo;
    int down;
    long long retry_at_ms;
    char err[AMQPC_ERR_MAX];
};

/* Parses `url` into `ci`, pointing into `buf` (a copy the caller keeps).
 * Returns NULL or what is wrong with it. */
static const char *parse_url(char *buf, struct amqp_connection_info *ci)
{
    amqp_default_connection_info(ci);
    if (amqp_parse_url(buf, ci) != AMQP_STATUS_OK)
        return "amqp://user:password@host:port/vhost";
    if (ci->ssl)
        return "amqp:// (amqps:// is not supported)";
    if (ci->port < 1 || ci->port > 65535)
        return "a port from 1 to 65535";
    return NULL;
}

int amqpc_url_from_cfg(cfg *c, char *out, size_t outlen)
{
    const char *url = cfg_str(c, "AMQP_URL", AMQPC_DEFAULT_URL);
    struct amqp_connection_info ci;
    const char *why;
    char *buf, shown[512];

    if (!c || !out || outlen == 0)
        return -1;
    out[0] = '\0';
    buf = strdup(url);
    if (!buf)
        return -1;
    why = parse_url(buf, &ci);
    free(buf);
    if (!why && strlen(url) >= outlen)
        why = "a shorter URL";
    if (why) {
        redact_url(shown, sizeof(shown), url);
        cfg_error(c, "AMQP_URL", shown, why);
        return -1;
    }
    snprintf(out, outlen, "%s", url);
    return 0;
}

amqpc *amqpc_new(const char *url, const char *connection_name)
{
    amqpc *a = calloc(1, sizeof(*a));
    const char *why;

    if (!a)
        return NULL;
    a->urlbuf = strdup(url && *url ? url : AMQPC_DEFAULT_URL);
    if (!a->urlbuf)
        goto fail;
    /* One line when a service makes its connection (at start) saying which
     * broker it uses, secrets masked; parse_url cuts urlbuf up, so first. */
    {
        char shown[512], esc[1100];

        redact_url(shown, sizeof(shown), a->urlbuf);
        log_event(LOG_INFO, "amqp", "\"url\":\"%s\"", log_escape(esc, sizeof(esc), shown));
    }
    why = parse_url(a->urlbuf, &a->ci);
    if (why) {
        log_event(LOG_ERROR, "bad AMQP URL", "\"expected\":\"%s\"", why);
        goto fail;
    }
    /* "amqp://host/" parses to an empty vhost, which RabbitMQ does not
     * have; everybody who writes it means the default "/". */
    a->vhost = a->ci.vhost && *a->ci.vhost ? a->ci.vhost : "/";
    snprintf(a->name, sizeof(a->name), "%s", connection_name ? connection_name : "");
    backoff_init(&a->bo, AMQPC_BACKOFF_BASE_MS, AMQPC_BACKOFF_MAX_MS);
    return a;
fail:
    free(a->urlbuf);
    free(a);
    return NULL;
}

/* Drops the connection without talking to the broker (it is broken). */
static void drop(amqpc *a)
{
    if (a->conn)
        amqp_destroy_connection(a->conn);
    a->conn = NULL;
    a->connected = 0;
}

void amqpc_close(amqpc *a)
{
    if (!a || !a->conn)
        return;
    if (a->connected) {
        amqp_channel_close(a->conn, AMQPC_CHANNEL, AMQP_REPLY_SUCCESS);
        amqp_connection_close(a->conn, AMQP_REPLY_SUCCESS);
    }
    drop(a);
}

void amqpc_free(amqpc *a)
{
    if (!a)
        return;
    amqpc_close(a);
    free(a->urlbuf);
    free(a);
}

const char *amqpc_errstr(const amqpc *a)
{
    return a ? a->err : "no AMQP handle";
}

int amqpc_is_connected(const amqpc *a)
{
    return a && a->connected;
}

amqp_connection_state_t amqpc_state(amqpc *a)
{
    return a && a->connected ? a->conn : NULL;
}

unsigned long amqpc_generation(const amqpc *a)
{
    return a ? a->generation : 0;
}

int amqpc_channel(const amqpc *a)
{
    (void)a;
    return AMQPC_CHANNEL;
}

/* Renders an RPC reply as text into a->err after `what: `. */
static void describe(amqpc *a, amqp_rpc_reply_t r, const char *what)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NONE:
        snprintf(a->err, sizeof(a->err), "%s: missing RPC reply", what);
        break;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(a->err, sizeof(a->err), "%s: %s", what, amqp_error_string2(r.library_error));
        break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;

            snprintf(a->err, sizeof(a->err), "%s: connection closed by broker: %u %.*s", what,
                     m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;

            snprintf(a->err, sizeof(a->err), "%s: channel closed by broker: %u %.*s", what,
                     m->reply_code, (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        } else {
            snprintf(a->err, sizeof(a->err), "%s: unexpected method 0x%08x", what, r.reply.id);
        }
        break;
    default:
        snprintf(a->err, sizeof(a->err), "%s: ok", what);
        break;
    }
}

int amqpc_check(amqpc *a, amqp_rpc_reply_t r, const char *what)
{
    if (!a)
        return -1;
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    describe(a, r, what ? what : "AMQP");
    if (!a->conn)
        return -1;
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_ok_t ok = {0};
        amqp_rpc_reply_t rr;

        /* Only the channel died: acknowledge and reopen it so the
         * connection keeps serving. */
        if (amqp_send_method(a->conn, AMQPC_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) == AMQP_STATUS_OK) {
            amqp_channel_open(a->conn, AMQPC_CHANNEL);
            rr = amqp_get_rpc_reply(a->conn);
            if (rr.reply_type == AMQP_RESPONSE_NORMAL)
                return -1;
        }
        drop(a);
        return -1;
    }
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_ok_t ok = {0};

        amqp_send_method(a->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
    }
    drop(a);
    return -1;
}

static void connect_failed(amqpc *a)
{
    char esc[AMQPC_ERR_MAX + 64], hesc[600];
    long delay = backoff_next_ms(&a->bo);

    drop(a);
    a->down = 1;
    a->retry_at_ms = svc_now_ms() + delay;
    log_event(LOG_WARN, "amqp unavailable", "\"addr\":\"%s:%d\",\"attempt\":%d,\"retry_in_ms\":%ld,\"error\":\"%s\"",
              log_escape(hesc, sizeof(hesc), a->ci.host), a->ci.port, a->bo.attempt, delay,
              log_escape(esc, sizeof(esc), a->err));
}

int amqpc_connect(amqpc *a)
{
    struct timeval tv = {AMQPC_TIMEOUT_S, 0};
    amqp_socket_t *sock;
    amqp_table_entry_t prop;
    amqp_table_t props = {0, NULL};
    int rc;

    if (!a)
        return -1;
    if (a->connected)
        return 0;
    drop(a);
    if (a->down && svc_now_ms() < a->retry_at_ms)
        return -1; /* a->err keeps the last failure */
    a->conn = amqp_new_connection();
    if (!a->conn) {
        snprintf(a->err, sizeof(a->err), "out of memory");
        goto fail;
    }
    sock = amqp_tcp_socket_new(a->conn);
    if (!sock) {
        snprintf(a->err, sizeof(a->err), "cannot create socket");
        goto fail;
    }
    /* Bounded handshake and RPCs: a broker that accepts TCP but never
     * answers must not hang the caller. */
    amqp_set_handshake_timeout(a->conn, &tv);
    amqp_set_rpc_timeout(a->conn, &tv);
    rc = amqp_socket_open_noblock(sock, a->ci.host, a->ci.port, &tv);
    if (rc != AMQP_STATUS_OK) {
        /* librabbitmq keeps the socket's own error (e.g. "connection
         * refused") to itself; errno is not reliable here. */
        snprintf(a->err, sizeof(a->err), "connect to %s:%d: %s", a->ci.host, a->ci.port,
                 amqp_error_string2(rc));
        goto fail;
    }
    if (a->name[0]) {
        prop.key = amqp_cstring_bytes("connection_name");
        prop.value.kind = AMQP_FIELD_KIND_UTF8;
        prop.value.value.bytes = amqp_cstring_bytes(a->name);
        props.num_entries = 1;
        props.entries = &prop;
    }
    /* Heartbeats off: librabbitmq only sends them from inside its own
     * calls, so an idle publisher would be cut off by the broker; dead
     * peers are found by TCP keepalive and by the checks in publish. */
    {
        amqp_rpc_reply_t r = amqp_login_with_properties(a->conn, a->vhost, 0, AMQPC_FRAME_MAX, 0, &props,
                                                        AMQP_SASL_METHOD_PLAIN, a->ci.user, a->ci.password);

        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            describe(a, r, "login");
            goto fail;
        }
    }
    amqp_channel_open(a->conn, AMQPC_CHANNEL);
    {
        amqp_rpc_reply_t r = amqp_get_rpc_reply(a->conn);

        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            describe(a, r, "channel.open");
            goto fail;
        }
    }
    {
        int fd = amqp_socket_get_sockfd(sock), one = 1;

        if (fd >= 0)
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    }
    a->connected = 1;
    a->generation++;
    if (a->down) {
        char hesc[600];

        log_event(LOG_INFO, "amqp connection restored", "\"addr\":\"%s:%d\",\"failed_attempts\":%d",
                  log_escape(hesc, sizeof(hesc), a->ci.host), a->ci.port, a->bo.attempt);
    }
    a->down = 0;
    backoff_reset(&a->bo);
    a->err[0] = '\0';
    return 0;
fail:
    connect_failed(a);
    return -1;
}

/* Looks at the socket without consuming anything that a consumer might
 * want: a broker that went away has sent connection.close (a method frame
 * on channel 0 for class 10 method 50) and/or closed the socket. Without
 * this a publish right after a broker restart would be written into a dead
 * socket and lost without an error. Returns 0 when the connection looks
 * usable, -1 when it is gone (then it has been dropped). */
static int peek_alive(amqpc *a)
{
    unsigned char hdr[11];
    ssize_t n;
    int fd;

    if (!a->connected)
        return -1;
    /* Bytes already buffered by the library mean the socket position is not
     * at a frame boundary; trust the connection then. */
    if (amqp_data_in_buffer(a->conn) || amqp_frames_enqueued(a->conn))
        return 0;
    fd = amqp_socket_get_sockfd(amqp_get_socket(a->conn));
    if (fd < 0)
        goto gone;
    n = recv(fd, hdr, sizeof(hdr), MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    if (n <= 0)
        goto gone;
    if (n == (ssize_t)sizeof(hdr) && hdr[0] == AMQP_FRAME_METHOD && hdr[1] == 0 && hdr[2] == 0 &&
        hdr[7] == 0 && hdr[8] == 10 && hdr[9] == 0 && hdr[10] == 50)
        goto gone;
    return 0;
gone:
    snprintf(a->err, sizeof(a->err), "connection closed by broker");
    drop(a);
    return -1;
}

int amqpc_declare_topic_exchange(amqpc *a, const char *name, int durable)
{
    if (!a || !name)
        return -1;
    if (amqpc_connect(a) < 0)
        return -1;
    amqp_exchange_declare(a->conn, AMQPC_CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes("topic"), 0,
                          durable ? 1 : 0, 0, 0, amqp_empty_table);
    return amqpc_check(a, amqp_get_rpc_reply(a->conn), "exchange.declare");
}

int amqpc_declare_queue_bind(amqpc *a, const char *queue, const char *exchange,
                             const char *routing_key)
{
    return amqpc_declare_queue(a, queue, 1, exchange, routing_key);
}

int amqpc_declare_queue(amqpc *a, const char *queue, int durable, const char *exchange,
                        const char *routing_key)
{
    if (!a || !queue)
        return -1;
    if (amqpc_connect(a) < 0)
        return -1;
    amqp_queue_declare(a->conn, AMQPC_CHANNEL, amqp_cstring_bytes(queue), 0, durable ? 1 : 0, 0, 0,
                       amqp_empty_table);
    if (amqpc_check(a, amqp_get_rpc_reply(a->conn), "queue.declare") < 0)
        return -1;
    if (!routing_key)
        return 0;
    if (!exchange) {
        snprintf(a->err, sizeof(a->err), "queue.bind: no exchange");
        return -1;
    }
    amqp_queue_bind(a->conn, AMQPC_CHANNEL, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange),
                    amqp_cstring_bytes(routing_key), amqp_empty_table);
    return amqpc_check(a, amqp_get_rpc_reply(a->conn), "queue.bind");
}

int amqpc_publish(amqpc *a, const char *exchange, const char *routing_key, const char *body,
                  size_t len, int persistent)
{
    amqp_basic_properties_t props;
    amqp_bytes_t b;
    int rc;

    if (!a || !routing_key || (!body && len))
        return -1;
    if (a->connected)
        peek_alive(a);
    if (amqpc_connect(a) < 0)
        return -1;
    memset(&props, 0, sizeof(props));
    props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
    props.content_type = amqp_cstring_bytes("application/json");
    props.delivery_mode = persistent ? 2 : 1;
    b.len = len;
    b.bytes = (void *)(uintptr_t)body;
    rc = amqp_basic_publish(a->conn, AMQPC_CHANNEL, amqp_cstring_bytes(exchange ? exchange : ""),
                            amqp_cstring_bytes(routing_key), 0, 0, &props, b);
    if (rc != AMQP_STATUS_OK) {
        snprintf(a->err, sizeof(a->err), "publish: %s", amqp_error_string2(rc));
        drop(a);
        return -1;
    }
    return 0;
}

int amqpc_ping(amqpc *a)
{
    if (!a || !a->connected) {
        if (a && !a->err[0])
            snprintf(a->err, sizeof(a->err), "not connected");
        return -1;
    }
    if (peek_alive(a) < 0)
        return -1;
    amqp_exchange_declare(a->conn, AMQPC_CHANNEL, amqp_cstring_bytes("amq.topic"), amqp_cstring_bytes("topic"),
                          1, 0, 0, 0, amqp_empty_table);
    return amqpc_check(a, amqp_get_rpc_reply(a->conn), "ping");
}
