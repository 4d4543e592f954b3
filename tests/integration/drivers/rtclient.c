/* rtclient: a scriptable WebSocket client for realtime's /ws (SPEC 5a), the
 * C client of test_realtime.RtclientTest. Plain sockets and poll(2), as the
 * project's other C clients (rtload, rt_ws_latency): one connection, a
 * real client's handshake (random key, Sec-WebSocket-Accept checked) and
 * frames (masked with a random key, fragments joined, pings answered).
 *
 *   rtclient [-H 'Name: value']... [-P PROTOCOLS] [-n] [-t SECS] PORT PATH
 *     -H  an extra request header (up to 8), e.g. Authorization: Bearer T
 *     -P  the Sec-WebSocket-Protocol list to offer
 *     -n  do not answer WebSocket pings (only JSON frames then keep the
 *         connection alive)
 *     -t  give up after SECS (60) in all
 *
 * Stdin, one line each: a text frame to send (the line as it is), or
 *   !binary N    a binary frame of N bytes
 *   !close CODE  a close frame; the server's close ends the run
 * End of input sends close 1000.
 *
 * Stdout, one line each, flushed: a text frame as received (the server's
 * frames are JSON on one line), or an event as a JSON object:
 *   {"open":{"status":101,"protocol":P}}    P the echoed subprotocol or null
 *   {"refused":{"status":S,"body":B}}       the upgrade answered otherwise
 *   {"binary":N} {"ping":N}                 frames of N bytes
 *   {"close":{"code":C,"reason":R}}         the server's close frame
 *   {"eof":true}                            the connection ended without one
 *
 * Exit status: 0 after a close frame, 2 refused, 3 cut without a close
 * frame, 4 timed out, 1 any other failure. (A close code such as 4001
 * does not fit an exit status: it is in the close line.) */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#define RC_MAX_HEADERS 8
#define RC_BUF (1 << 21)  /* what the socket may hold unparsed: frames of up to 2 MiB */
#define RC_LINE (1 << 20) /* a stdin line */

typedef struct {
    int fd;
    int auto_pong;
    int sent_close;
    char *in;       /* bytes read and not yet parsed */
    size_t inlen;
    char *msg;      /* a fragmented message being joined */
    size_t msglen;
    int msgop;
} rc_conn;

static void rc_die(const char *what) __attribute__((noreturn));
static void rc_die(const char *what)
{
    fprintf(stderr, "rtclient: %s: %s\n", what, errno ? strerror(errno) : "failed");
    exit(1);
}

static long long rc_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Prints one event line (the object is freed). */
static void rc_emit(cJSON *o)
{
    char *s = cJSON_PrintUnformatted(o);

    if (s)
        printf("%s\n", s);
    fflush(stdout);
    free(s);
    cJSON_Delete(o);
}

static void rc_emit_num(const char *name, double v)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddNumberToObject(o, name, v);
    rc_emit(o);
}

static int rc_write(int fd, const void *p, size_t n)
{
    const char *c = p;

    while (n) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One client frame: FIN set, masked with a fresh random key (RFC 6455 5.3). */
static int rc_send_frame(rc_conn *c, int opcode, const void *payload, size_t n)
{
    unsigned char *f = malloc(n + 14), key[4];
    size_t h = 0;
    int rc;

    if (!f || getrandom(key, sizeof(key), 0) != (ssize_t)sizeof(key)) {
        free(f);
        return -1;
    }
    f[h++] = (unsigned char)(0x80 | opcode);
    if (n < 126) {
        f[h++] = (unsigned char)(0x80 | n);
    } else if (n < 65536) {
        f[h++] = 0x80 | 126;
        f[h++] = (unsigned char)(n >> 8);
        f[h++] = (unsigned char)n;
    } else {
        f[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            f[h++] = (unsigned char)((unsigned long long)n >> (8 * i));
    }
    memcpy(f + h, key, 4);
    h += 4;
    for (size_t i = 0; i < n; i++)
        f[h + i] = ((const unsigned char *)payload)[i] ^ key[i % 4];
    rc = rc_write(c->fd, f, h + n);
    free(f);
    return rc;
}

static int rc_send_close(rc_conn *c, int code)
{
    unsigned char b[2] = {(unsigned char)(code >> 8), (unsigned char)code};

    c->sent_close = 1;
    return rc_send_frame(c, 8, b, 2);
}

/* ---- the handshake ------------------------------------------------------ */

static void rc_base64(const unsigned char *in, size_t n, char *out)
{
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

/* The value of header `name` in the answer head (NUL-terminated), copied
 * into out; 0, or -1 when absent. */
static int rc_header(const char *head, const char *name, char *out, size_t outlen)
{
    size_t nl = strlen(name);

    for (const char *p = strstr(head, "\r\n"); p && p[2]; p = strstr(p + 2, "\r\n")) {
        const char *v = p + 2, *end;

        if (strncasecmp(v, name, nl) != 0 || v[nl] != ':')
            continue;
        for (v += nl + 1; *v == ' '; v++)
            ;
        end = strstr(v, "\r\n");
        if (!end || (size_t)(end - v) >= outlen)
            return -1;
        memcpy(out, v, (size_t)(end - v));
        out[end - v] = '\0';
        return 0;
    }
    return -1;
}

static int rc_dial(int port)
{
    struct sockaddr_in a = {0};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        rc_die("connect");
    return fd;
}

static void rc_send_request(rc_conn *c, int port, const char *path, const char *key, char **hdrs, int nh,
                            const char *protos)
{
    char req[32768];
    int n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n",
                     path, port, key);

    for (int i = 0; i < nh && n > 0 && (size_t)n < sizeof(req); i++)
        n += snprintf(req + n, sizeof(req) - (size_t)n, "%s\r\n", hdrs[i]);
    if (protos && n > 0 && (size_t)n < sizeof(req))
        n += snprintf(req + n, sizeof(req) - (size_t)n, "Sec-WebSocket-Protocol: %s\r\n", protos);
    if (n <= 0 || (size_t)n + 2 >= sizeof(req))
        rc_die("request too long");
    memcpy(req + n, "\r\n", 2);
    if (rc_write(c->fd, req, (size_t)n + 2) < 0)
        rc_die("send");
}

/* Reads into c->in until the head is whole; returns the head's length
 * (the bytes after it are frames). */
static size_t rc_read_head(rc_conn *c)
{
    for (;;) {
        char *end;
        ssize_t r;

        c->in[c->inlen] = '\0';
        if ((end = strstr(c->in, "\r\n\r\n")))
            return (size_t)(end + 4 - c->in);
        if (c->inlen + 1 >= RC_BUF)
            rc_die("answer head too long");
        r = recv(c->fd, c->in + c->inlen, RC_BUF - 1 - c->inlen, 0);
        if (r <= 0)
            rc_die("closed during the handshake");
        c->inlen += (size_t)r;
    }
}

/* An answer other than 101: its status and body, then exit 2. */
static void rc_refused(rc_conn *c, int status, size_t head)
{
    char cl[32];
    size_t want = rc_header(c->in, "Content-Length", cl, sizeof(cl)) == 0 ? strtoul(cl, NULL, 10) : RC_BUF;
    cJSON *o = cJSON_CreateObject(), *r = cJSON_AddObjectToObject(o, "refused");
    ssize_t n;

    while (c->inlen - head < want && c->inlen + 1 < RC_BUF &&
           (n = recv(c->fd, c->in + c->inlen, RC_BUF - 1 - c->inlen, 0)) > 0)
        c->inlen += (size_t)n;
    c->in[c->inlen] = '\0';
    cJSON_AddNumberToObject(r, "status", status);
    cJSON_AddStringToObject(r, "body", c->in + head);
    rc_emit(o);
    exit(2);
}

static void rc_handshake(rc_conn *c, int port, const char *path, char **hdrs, int nh, const char *protos)
{
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char raw[16], sha[SHA_DIGEST_LENGTH];
    char key[32], cat[96], want[32], got[64], proto[16384];
    size_t head;
    int status = 0;
    cJSON *o, *op;

    if (getrandom(raw, sizeof(raw), 0) != (ssize_t)sizeof(raw))
        rc_die("getrandom");
    rc_base64(raw, sizeof(raw), key);
    rc_send_request(c, port, path, key, hdrs, nh, protos);
    head = rc_read_head(c);
    if (sscanf(c->in, "HTTP/1.%*d %d", &status) != 1)
        rc_die("not an HTTP answer");
    if (status != 101)
        rc_refused(c, status, head);
    snprintf(cat, sizeof(cat), "%s%s", key, guid);
    SHA1((const unsigned char *)cat, strlen(cat), sha);
    rc_base64(sha, sizeof(sha), want);
    if (rc_header(c->in, "Sec-WebSocket-Accept", got, sizeof(got)) < 0 || strcmp(got, want) != 0) {
        errno = 0;
        rc_die("Sec-WebSocket-Accept missing or wrong");
    }
    o = cJSON_CreateObject();
    op = cJSON_AddObjectToObject(o, "open");
    cJSON_AddNumberToObject(op, "status", 101);
    if (rc_header(c->in, "Sec-WebSocket-Protocol", proto, sizeof(proto)) == 0)
        cJSON_AddStringToObject(op, "protocol", proto);
    else
        cJSON_AddNullToObject(op, "protocol");
    rc_emit(o);
    memmove(c->in, c->in + head, c->inlen - head);
    c->inlen -= head;
}

/* ---- frames from the server ------------------------------------------------ */

static void rc_on_close(rc_conn *c, const unsigned char *p, size_t n)
{
    cJSON *o = cJSON_CreateObject(), *d = cJSON_AddObjectToObject(o, "close");
    int code = n >= 2 ? (p[0] << 8) | p[1] : 1005;
    char reason[126] = "";

    if (n > 2)
        snprintf(reason, sizeof(reason), "%.*s", (int)(n - 2 < 125 ? n - 2 : 125), (const char *)p + 2);
    cJSON_AddNumberToObject(d, "code", code);
    cJSON_AddStringToObject(d, "reason", reason);
    rc_emit(o);
    /* The closing handshake: a close answers the server's own. */
    if (!c->sent_close)
        rc_send_close(c, code == 1005 ? 1000 : code);
    exit(0);
}

/* A whole message (text or binary). */
static void rc_on_message(int op, const char *p, size_t n)
{
    if (op == 1) {
        printf("%.*s\n", (int)n, p);
        fflush(stdout);
    } else {
        rc_emit_num("binary", (double)n);
    }
}

static void rc_on_frame(rc_conn *c, int fin, int op, unsigned char *p, size_t n)
{
    if (op == 8) {
        rc_on_close(c, p, n);
    } else if (op == 9) {
        rc_emit_num("ping", (double)n);
        if (c->auto_pong && rc_send_frame(c, 10, p, n) < 0)
            rc_die("send pong");
    } else if (op == 1 || op == 2 || op == 0) {
        char *nm;

        if (op != 0)
            c->msgop = op;
        if (!(nm = realloc(c->msg, c->msglen + n + 1)))
            rc_die("out of memory");
        c->msg = nm;
        memcpy(c->msg + c->msglen, p, n);
        c->msglen += n;
        if (fin) {
            rc_on_message(c->msgop, c->msg, c->msglen);
            c->msglen = 0;
        }
    }
}

/* Parses every whole frame of c->in; keeps the rest. */
static void rc_parse(rc_conn *c)
{
    size_t off = 0;

    for (;;) {
        unsigned char *p = (unsigned char *)c->in + off;
        size_t have = c->inlen - off, len, h = 2;
        int masked;

        if (have < 2)
            break;
        masked = p[1] & 0x80;
        len = p[1] & 0x7f;
        if (len == 126) {
            len = have < 4 ? 0 : ((size_t)p[2] << 8) | p[3];
            h = 4;
        } else if (len == 127) {
            len = 0;
            for (int i = 0; i < 8 && have >= 10; i++)
                len = (len << 8) | p[2 + i];
            h = 10;
        }
        h += masked ? 4 : 0;
        if (have < h || have - h < len)
            break;
        /* Servers do not mask; one that did is read all the same. */
        for (size_t i = 0; masked && i < len; i++)
            p[h + i] ^= p[h - 4 + i % 4];
        rc_on_frame(c, p[0] & 0x80, p[0] & 0x0f, p + h, len);
        off += h + len;
    }
    memmove(c->in, c->in + off, c->inlen - off);
    c->inlen -= off;
}

static void rc_on_socket(rc_conn *c)
{
    ssize_t r;

    if (c->inlen >= RC_BUF)
        rc_die("frame too big");
    r = recv(c->fd, c->in + c->inlen, RC_BUF - c->inlen, 0);
    if (r < 0 && errno == EINTR)
        return;
    if (r <= 0) {
        cJSON *o = cJSON_CreateObject();

        cJSON_AddTrueToObject(o, "eof");
        rc_emit(o);
        exit(3);
    }
    c->inlen += (size_t)r;
    rc_parse(c);
}

/* ---- stdin --------------------------------------------------------------------- */

/* One line of stdin, without its newline (NUL-terminated, n bytes). */
static void rc_on_line(rc_conn *c, const char *line, size_t n)
{
    long v;

    if (strncmp(line, "!binary ", 8) == 0) {
        char *b;

        v = strtol(line + 8, NULL, 10);
        if (v < 0 || v > RC_LINE || !(b = calloc(1, (size_t)v + 1)))
            rc_die("!binary N");
        if (rc_send_frame(c, 2, b, (size_t)v) < 0)
            rc_die("send");
        free(b);
    } else if (strncmp(line, "!close ", 7) == 0) {
        v = strtol(line + 7, NULL, 10);
        if (rc_send_close(c, (int)v) < 0)
            rc_die("send close");
    } else if (rc_send_frame(c, 1, line, n) < 0) {
        rc_die("send");
    }
}

/* Reads what stdin has; returns 0 at its end. Whole lines are sent. */
static int rc_on_stdin(rc_conn *c, char *line, size_t *len)
{
    ssize_t r = read(0, line + *len, RC_LINE - *len);
    char *nl;

    if (r < 0 && errno == EINTR)
        return 1;
    if (r <= 0)
        return 0;
    *len += (size_t)r;
    while ((nl = memchr(line, '\n', *len))) {
        size_t n = (size_t)(nl + 1 - line);

        *nl = '\0';
        rc_on_line(c, line, n - 1);
        memmove(line, nl + 1, *len - n);
        *len -= n;
    }
    if (*len == RC_LINE)
        rc_die("stdin line too long");
    return 1;
}

/* Sends stdin's lines and prints the server's frames until the deadline
 * (the frames' handlers exit at the close or the end of the connection). */
static void rc_loop(rc_conn *c, char *line, long long deadline)
{
    size_t linelen = 0;
    int stdin_open = 1;

    for (;;) {
        struct pollfd pf[2] = {{c->fd, POLLIN, 0}, {0, POLLIN, 0}};
        long long left = deadline - rc_now_ms();

        if (left <= 0)
            return;
        if (poll(pf, stdin_open ? 2 : 1, (int)(left > 1000 ? 1000 : left)) < 0 && errno != EINTR)
            rc_die("poll");
        if (pf[0].revents)
            rc_on_socket(c);
        if (stdin_open && pf[1].revents && !(stdin_open = rc_on_stdin(c, line, &linelen)) && !c->sent_close &&
            rc_send_close(c, 1000) < 0)
            rc_die("send close");
    }
}

static void rc_usage(void)
{
    fprintf(stderr, "usage: rtclient [-H 'Name: value']... [-P PROTOCOLS] [-n] [-t SECS] PORT PATH\n");
    exit(1);
}

int main(int argc, char **argv)
{
    rc_conn c = {.fd = -1, .auto_pong = 1};
    char *hdrs[RC_MAX_HEADERS], *line;
    const char *protos = NULL;
    int nh = 0, opt;
    long secs = 60;
    long long deadline;

    while ((opt = getopt(argc, argv, "H:P:nt:")) != -1) {
        if (opt == 'H' && nh < RC_MAX_HEADERS)
            hdrs[nh++] = optarg;
        else if (opt == 'P')
            protos = optarg;
        else if (opt == 'n')
            c.auto_pong = 0;
        else if (opt == 't')
            secs = strtol(optarg, NULL, 10);
        else
            rc_usage();
    }
    if (argc - optind != 2 || secs <= 0)
        rc_usage();
    c.in = malloc(RC_BUF + 1);
    line = malloc(RC_LINE + 1);
    if (!c.in || !line)
        rc_die("out of memory");
    deadline = rc_now_ms() + secs * 1000;
    c.fd = rc_dial((int)strtol(argv[optind], NULL, 10));
    rc_handshake(&c, (int)strtol(argv[optind], NULL, 10), argv[optind + 1], hdrs, nh, protos);
    rc_parse(&c);
    rc_loop(&c, line, deadline);
    fprintf(stderr, "rtclient: timed out\n");
    free(c.msg);
    free(c.in);
    free(line);
    close(c.fd);
    return 4;
}
