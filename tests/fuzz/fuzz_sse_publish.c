/* The SSE publish body (POST /internal/v1/sse/{client_id} and a backend's
 * PUBLISH sse:{client_id}): {"event_type": ..., "data": ...} checked as
 * api-gateway/sse_routes.c and sse_hub.c do. The data is written into an
 * SSE "data:" line, so its compact JSON must never hold a line break (that
 * would let a publisher forge frames), nor the event type. The first line
 * of the input is also tried as a client id and as an idempotency key
 * (which goes into a Redis key name: printable ASCII, bounded). */
#include <cjson/cJSON.h>

#include "fuzz.h"
#include "sse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    cJSON *body = cJSON_ParseWithLength((const char *)data, size), *type, *d, *key;
    const uint8_t *nl = memchr(data, '\n', size);
    char *cid = fuzz_str(data, nl ? (size_t)(nl - data) : size), *text;

    if (cid) {
        if (sse_client_id_ok(cid) && strpbrk(cid, "\r\n: "))
            abort();
        if (sse_idem_key_ok(cid)) {
            size_t n = strlen(cid);

            if (n > SSE_IDEM_KEY_MAX)
                abort();
            for (size_t i = 0; i < n; i++)
                if (cid[i] < 0x20 || cid[i] > 0x7e)
                    abort();
        }
        free(cid);
    }
    type = cJSON_GetObjectItemCaseSensitive(body, "event_type");
    key = cJSON_GetObjectItemCaseSensitive(body, "idempotency_key");
    if (cJSON_IsString(key) && sse_idem_key_ok(key->valuestring) && strpbrk(key->valuestring, "\r\n"))
        abort();
    if (cJSON_IsObject(body) && cJSON_IsString(type) && sse_event_type_ok(type->valuestring)) {
        if (strpbrk(type->valuestring, "\r\n"))
            abort();
        d = cJSON_GetObjectItemCaseSensitive(body, "data");
        text = d ? cJSON_PrintUnformatted(d) : NULL;
        if (text && strpbrk(text, "\r\n"))
            abort();
        free(text);
    }
    cJSON_Delete(body);
    return 0;
}
