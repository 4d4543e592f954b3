/* Canonical JSON (libshared/canonjson, the runtime's append hashes): any
 * JSON value is written canonically; the canonical form parses back and is
 * its own canonical form (hash stable). */
#include <cjson/cJSON.h>

#include "buf.h"
#include "canonjson.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *v = cJSON_ParseWithLength((const char *)data, size), *again;
    char h1[CANONJSON_HASH_LEN], h2[CANONJSON_HASH_LEN];
    buf a, b;

    if (!v)
        return 0;
    buf_init(&a, 1 << 22);
    buf_init(&b, 1 << 22);
    if (canonjson_append(&a, v) == 0 && canonjson_sha256(v, h1) == 0) {
        again = cJSON_ParseWithLength(a.p ? a.p : "", a.len);
        if (!again)
            abort();
        if (canonjson_append(&b, again) < 0 || b.len != a.len || memcmp(a.p, b.p, a.len) != 0)
            abort();
        if (canonjson_sha256(again, h2) < 0 || memcmp(h1, h2, sizeof(h1)) != 0)
            abort();
        cJSON_Delete(again);
    }
    buf_free(&a);
    buf_free(&b);
    cJSON_Delete(v);
    return 0;
}
