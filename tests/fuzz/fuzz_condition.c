/* Condition evaluation: "<conditions JSON>\n--\n<event JSON>[\n--\n<state JSON>]":
 * a matcher built from the conditions, its state (from the stored state
 * when given), and the event matched twice (stateful conditions move). */
#include <cjson/cJSON.h>

#include "fuzz.h"
#include "trigger_model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *ev, *stp;
    size_t evn, stn, cn = fuzz_split(data, size, &ev, &evn);
    cJSON *conds = cJSON_ParseWithLength((const char *)data, cn), *event = NULL, *stored = NULL;
    trigger_model_matcher *m = NULL;
    trigger_model_state *st = NULL;
    int changed;

    evn = fuzz_split(ev, evn, &stp, &stn);
    if (!conds)
        return 0;
    m = trigger_model_matcher_new(conds, "t1");
    if (!m)
        goto out;
    (void)trigger_model_matcher_never(m);
    (void)trigger_model_matcher_event_type(m);
    {
        int64_t agent;
        (void)trigger_model_matcher_agent_id(m, &agent);
    }
    stored = stn ? cJSON_ParseWithLength((const char *)stp, stn) : NULL;
    if (trigger_model_matcher_stateful(m))
        st = trigger_model_state_new(m, stored);
    event = cJSON_ParseWithLength((const char *)ev, evn);
    if (event) {
        for (int i = 0; i < 2; i++)
            (void)trigger_model_match(m, event, st, &changed, 1700000000 + i);
        if (st) {
            size_t len;
            free(trigger_model_state_text(st, &len));
        }
    }
out:
    trigger_model_state_free(st);
    trigger_model_matcher_free(m);
    cJSON_Delete(stored);
    cJSON_Delete(event);
    cJSON_Delete(conds);
    return 0;
}
