/* canonjson: see canonjson.h. */
#include "canonjson.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "fmt.h"

int canonjson_string(buf *out, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    const unsigned char *run = p;
    char esc[6] = {'\\', 'u', '0', '0', 0, 0};

    if (buf_append(out, "\"", 1) < 0)
        return -1;
    for (; *p; p++) {
        const char *rep = NULL;
        size_t replen = 2;

        if (*p >= 0x20 && *p != '"' && *p != '\\')
            continue;
        switch (*p) {
        case '"': rep = "\\\""; break;
        case '\\': rep = "\\\\"; break;
        case '\b': rep = "\\b"; break;
        case '\f': rep = "\\f"; break;
        case '\n': rep = "\\n"; break;
        case '\r': rep = "\\r"; break;
        case '\t': rep = "\\t"; break;
        default:
            esc[4] = hex[*p >> 4];
            esc[5] = hex[*p & 15];
            rep = esc;
            replen = 6;
        }
        if (buf_append(out, run, (size_t)(p - run)) < 0 || buf_append(out, rep, replen) < 0)
            return -1;
        run = p + 1;
    }
    return buf_append(out, run, (size_t)(p - run)) < 0 || buf_append(out, "\"", 1) < 0 ? -1 : 0;
}

static int canon_number(buf *out, double d)
{
    char tmp[40];
    int n = 0, prec;

    if (!isfinite(d))
        return buf_puts(out, "null");
    if (d == floor(d) && fabs(d) < 1e16) {
        n = snprintf(tmp, sizeof(tmp), "%.0f", d);
        if (n == 2 && tmp[0] == '-' && tmp[1] == '0')
            n = snprintf(tmp, sizeof(tmp), "0");
    } else {
        /* The shortest form that reads back exactly, as JavaScript and
         * Python print doubles. */
        for (prec = 1; prec <= 17; prec++) {
            n = snprintf(tmp, sizeof(tmp), "%.*g", prec, d);
            if (strtod(tmp, NULL) == d)
                break;
        }
    }
    if (n <= 0 || (size_t)n >= sizeof(tmp))
        return -1;
    return buf_append(out, tmp, (size_t)n);
}

static int key_cmp(const void *a, const void *b)
{
    const cJSON *x = *(const cJSON *const *)a, *y = *(const cJSON *const *)b;

    return strcmp(x->string ? x->string : "", y->string ? y->string : "");
}

static int canon_value(buf *out, const cJSON *v, int depth);

static int canon_object(buf *out, const cJSON *v, int depth)
{
    const cJSON *c;
    const cJSON **items = NULL;
    size_t n = 0, i;
    int rc = -1;

    for (c = v->child; c; c = c->next)
        n++;
    if (n && !(items = malloc(n * sizeof(*items))))
        return -1;
    for (i = 0, c = v->child; c; c = c->next)
        items[i++] = c;
    if (n > 1)
        qsort(items, n, sizeof(*items), key_cmp);
    if (buf_append(out, "{", 1) < 0)
        goto fail;
    for (i = 0; i < n; i++) {
        if ((i && buf_append(out, ",", 1) < 0) || canonjson_string(out, items[i]->string ? items[i]->string : "") < 0 ||
            buf_append(out, ":", 1) < 0 || canon_value(out, items[i], depth + 1) < 0)
            goto fail;
    }
    rc = buf_append(out, "}", 1);
fail:
    free(items);
    return rc;
}

static int canon_value(buf *out, const cJSON *v, int depth)
{
    const cJSON *c;

    if (depth > CANONJSON_MAX_DEPTH)
        return -1;
    if (cJSON_IsObject(v))
        return canon_object(out, v, depth);
    if (cJSON_IsArray(v)) {
        if (buf_append(out, "[", 1) < 0)
            return -1;
        for (c = v->child; c; c = c->next)
            if ((c != v->child && buf_append(out, ",", 1) < 0) || canon_value(out, c, depth + 1) < 0)
                return -1;
        return buf_append(out, "]", 1);
    }
    if (cJSON_IsString(v))
        return canonjson_string(out, v->valuestring ? v->valuestring : "");
    if (cJSON_IsNumber(v))
        return canon_number(out, v->valuedouble);
    if (cJSON_IsTrue(v))
        return buf_puts(out, "true");
    if (cJSON_IsFalse(v))
        return buf_puts(out, "false");
    return buf_puts(out, "null");
}

int canonjson_depth(const cJSON *v)
{
    const cJSON *c;
    int deepest = 0, d;

    if (!cJSON_IsObject(v) && !cJSON_IsArray(v))
        return 0;
    for (c = v->child; c; c = c->next)
        if ((d = canonjson_depth(c)) > deepest)
            deepest = d;
    return deepest + 1;
}

int canonjson_append(buf *out, const cJSON *v)
{
    size_t before = out->truncated;

    if (canon_value(out, v, 0) < 0 || out->truncated != before)
        return -1;
    return 0;
}

void canonjson_sha256_bytes(const void *data, size_t len, char out[CANONJSON_HASH_LEN])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    memcpy(out, "sha256:", 7);
    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != 32)
        memset(md, 0, 32);
    fmt_hex(out + 7, md, 32);
}

int canonjson_sha256(const cJSON *v, char out[CANONJSON_HASH_LEN])
{
    buf b;
    int rc;

    buf_init(&b, 64 * 1024 * 1024);
    rc = canonjson_append(&b, v);
    if (rc == 0)
        canonjson_sha256_bytes(b.p ? b.p : "", b.len, out);
    buf_free(&b);
    return rc;
}

/* ---- streaming hash ------------------------------------------------------ */

#define CANONJSON_VALUE_MAX (64 * 1024 * 1024)

struct canonjson_hash {
    EVP_MD_CTX *md;
    buf text; /* the value being fed, reused */
    int failed;
};

canonjson_hash *canonjson_hash_new(void)
{
    canonjson_hash *h = calloc(1, sizeof(*h));

    if (!h)
        return NULL;
    buf_init(&h->text, CANONJSON_VALUE_MAX);
    h->md = EVP_MD_CTX_new();
    if (!h->md || EVP_DigestInit_ex(h->md, EVP_sha256(), NULL) != 1) {
        canonjson_hash_free(h);
        return NULL;
    }
    return h;
}

void canonjson_hash_free(canonjson_hash *h)
{
    if (!h)
        return;
    EVP_MD_CTX_free(h->md);
    buf_free(&h->text);
    free(h);
}

void canonjson_hash_raw(canonjson_hash *h, const char *s, size_t len)
{
    if (!h->failed && EVP_DigestUpdate(h->md, s, len) != 1)
        h->failed = 1;
}

int canonjson_hash_value(canonjson_hash *h, const cJSON *v)
{
    h->text.len = 0;
    if (h->failed || canonjson_append(&h->text, v) < 0) {
        h->failed = 1;
        return -1;
    }
    canonjson_hash_raw(h, h->text.p ? h->text.p : "", h->text.len);
    return h->failed ? -1 : 0;
}

int canonjson_hash_final(canonjson_hash *h, char out[CANONJSON_HASH_LEN])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    if (h->failed || EVP_DigestFinal_ex(h->md, md, &mdlen) != 1 || mdlen != 32)
        return -1;
    memcpy(out, "sha256:", 7);
    fmt_hex(out + 7, md, 32);
    return 0;
}
