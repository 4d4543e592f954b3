/* Trigger bodies as POST/PUT /api/v1/triggers get them: JSON parsed the way
 * httpd_req_json does, then validated and parsed by libshared/trigger_model
 * (the one model the gateway and the processor share). */
#include <cjson/cJSON.h>

#include "fuzz.h"
#include "trigger_model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *end = NULL;
    cJSON *body = cJSON_ParseWithLengthOpts((const char *)data, size, &end, 0), *details = NULL;
    trigger_model_def *def;

    if (!body)
        return 0;
    if (trigger_model_validate(body, &details) == 0) {
        cJSON *d = cJSON_CreateObject();

        def = trigger_model_parse(body, d);
        if (def) {
            (void)trigger_model_def_is_stateful(def);
            (void)trigger_model_def_stateful_count(def);
            trigger_model_def_free(def);
        }
        cJSON_Delete(d);
    }
    cJSON_Delete(details);
    (void)trigger_model_is_stateful(cJSON_GetObjectItemCaseSensitive(body, "conditions"));
    cJSON_Delete(body);
    return 0;
}
