/* Configured URLs: redis:// (rconn_parse_url), amqp:// (amqpc_new parses
 * without connecting) and redact_url, which masks secrets of any URL or
 * conninfo before it is logged: the password must not survive it. */
#include "amqpc.h"
#include "fuzz.h"
#include "rconn.h"
#include "redact.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256], red[512], small[16];
    rconn_opts o;
    amqpc *a;
    char *s;

    if (!(s = fuzz_str(data, size)))
        return 0;
    memset(&o, 0, sizeof(o));
    (void)rconn_parse_url(s, &o, err, sizeof(err));
    a = amqpc_new(s, "fuzz");
    amqpc_free(a);
    redact_url(red, sizeof(red), s);
    if (strlen(red) >= sizeof(red))
        abort();
    redact_url(small, sizeof(small), s);
    if (strlen(small) >= sizeof(small))
        abort();
    free(s);
    return 0;
}
