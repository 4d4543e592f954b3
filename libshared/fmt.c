/* fmt: see fmt.h. */
#include "fmt.h"

#include <string.h>
#include <time.h>

size_t fmt_i64(char *out, long long v)
{
    char tmp[FMT_I64_MAX];
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    size_t n = 0, k = 0;

    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        out[k++] = '-';
    while (n)
        out[k++] = tmp[--n];
    out[k] = '\0';
    return k;
}

size_t fmt_copy(char *dst, size_t size, const char *src)
{
    size_t n = strnlen(src, size - 1);

    memcpy(dst, src, n);
    dst[n] = '\0';
    return n;
}

size_t fmt_hex(char *out, const void *in, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    const unsigned char *b = in;
    size_t i;

    for (i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
    return 2 * n;
}

size_t fmt_uuid(char *out, const unsigned char b[16])
{
    static const char digits[] = "0123456789abcdef";
    size_t o = 0;

    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = digits[b[i] >> 4];
        out[o++] = digits[b[i] & 15];
    }
    out[o] = '\0';
    return o;
}

size_t fmt_rfc3339(char *out, size_t size, const struct timespec *t, int digits)
{
    char tmp[64];
    struct timespec now;
    struct tm tm;
    size_t n;
    long frac;

    if (!t) {
        clock_gettime(CLOCK_REALTIME, &now);
        t = &now;
    }
    if (!gmtime_r(&t->tv_sec, &tm) || !(n = strftime(tmp, sizeof(tmp), "%Y-%m-%dT%H:%M:%S", &tm)))
        return fmt_copy(out, size, "");
    digits = digits < 0 ? 0 : digits > 9 ? 9 : digits;
    if (digits) {
        frac = t->tv_nsec;
        for (int i = digits; i < 9; i++)
            frac /= 10;
        tmp[n++] = '.';
        for (int i = digits - 1; i >= 0; i--, frac /= 10)
            tmp[n + (size_t)i] = (char)('0' + frac % 10);
        n += (size_t)digits;
    }
    tmp[n++] = 'Z';
    tmp[n] = '\0';
    return fmt_copy(out, size, tmp);
}
