/* Chain-event ingest (POST /api/v1/chain-events): one event or a batch,
 * validated by libshared/event_model and turned into query parameters. */
#include <cjson/cJSON.h>

#include "event_model.h"
#include "fuzz.h"

static void one(const cJSON *ev)
{
    cJSON *details = cJSON_CreateObject();
    event_model_params p;

    if (event_model_validate(ev, details, "event") == 0)
        (void)event_model_to_params(ev, &p);
    cJSON_Delete(details);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *end = NULL;
    cJSON *body = cJSON_ParseWithLengthOpts((const char *)data, size, &end, 0), *it;
    char *s;
    int64_t v;

    if (body) {
        if (cJSON_IsArray(body)) {
            cJSON_ArrayForEach(it, body) one(it);
        } else {
            one(body);
            (void)event_model_get_i64(body, "block_number", &v);
        }
        cJSON_Delete(body);
    }
    if ((s = fuzz_str(data, size))) {
        (void)event_model_parse_i64(s, &v);
        (void)event_model_type_valid(s);
        (void)event_model_registry_valid(s);
        (void)event_model_registry_of(s);
        free(s);
    }
    return 0;
}
