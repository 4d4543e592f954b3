/* The HTTP/1.x response parser (libshared/h1parse.c, the action workers' and
 * the gateway's direct proxy path's), fed
 * the bytes in pieces whose sizes come from the input's first byte, then
 * EOF. */
#include "buf.h"
#include "fuzz.h"
#include "h1.h"

static void on_header(void *ud, const char *line, size_t n)
{
    size_t *count = ud;

    (void)line;
    *count += n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static h1_parser p; /* 8 KiB line buffer: not on the stack */
    size_t step, off = 1, used, count = 0;
    int rc = H1_PARSE_MORE;
    buf body;

    if (size < 1)
        return 0;
    step = (size_t)(data[0] & 0x3f) + 1;
    buf_init(&body, 1 << 16);
    h1_parser_init(&p, data[0] & 0x40, &body, on_header, &count);
    while (off < size && rc == H1_PARSE_MORE) {
        size_t n = size - off < step ? size - off : step;

        used = 0;
        rc = h1_parse(&p, (const char *)data + off, n, &used);
        if (used > n)
            abort();
        off += rc == H1_PARSE_MORE ? n : used;
    }
    if (rc == H1_PARSE_MORE)
        (void)h1_parse_eof(&p);
    (void)h1_parse_in_body(&p);
    (void)h1_parse_reusable(&p);
    buf_free(&body);
    return 0;
}
