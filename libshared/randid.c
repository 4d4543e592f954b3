/* randid: see randid.h. */
#include "randid.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "fmt.h"

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void fallback(unsigned char *b, size_t n)
{
    static atomic_uint_fast64_t counter;
    struct timespec ts;
    uint64_t s, v = 0;
    size_t i;

    clock_gettime(CLOCK_REALTIME, &ts);
    s = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    s ^= (uint64_t)getpid() << 40;
    s += atomic_fetch_add(&counter, 1) * 0x2545f4914f6cdd1dULL;
    for (i = 0; i < n; i++) {
        if (i % 8 == 0)
            v = splitmix64(&s);
        b[i] = (unsigned char)(v >> (i % 8 * 8));
    }
}

void randid_fill(void *buf, size_t n)
{
    unsigned char *b = buf;
    size_t got = 0;
    ssize_t r;

    while (got < n) {
        r = getrandom(b + got, n - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            fallback(b + got, n - got);
            return;
        }
        got += (size_t)r;
    }
}

size_t randid_uuid(char *out, size_t size, const char *prefix)
{
    unsigned char b[16];
    char text[RANDID_UUID_LEN + 1];
    size_t o = fmt_copy(out, size, prefix);

    randid_fill(b, sizeof(b));
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    fmt_uuid(text, b);
    return o + fmt_copy(out + o, size - o, text);
}
