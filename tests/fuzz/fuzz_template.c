/* Action templates (action-workers/template.c): "<template>\n--\n<event JSON>";
 * the first byte of the template picks the mode (raw, JSON, the three
 * Telegram markups). The JSON mode's output must parse when the template is
 * a JSON text: a value that broke out of its string would be an injection. */
#include <cjson/cJSON.h>

#include "buf.h"
#include "fuzz.h"
#include "template.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *evb;
    size_t evn, tn;
    cJSON *event, *tj;
    char *tpl, *out;
    template_mode mode;
    template_ctx ctx;
    buf b;

    if (size < 1)
        return 0;
    mode = (template_mode)(data[0] % 5);
    tn = fuzz_split(data + 1, size - 1, &evb, &evn);
    tpl = fuzz_str(data + 1, tn);
    event = cJSON_ParseWithLength((const char *)evb, evn);
    ctx = (template_ctx){.event = event, .trigger_name = "trig \"x\" *_`[", .trigger_id = "tid", .job_id = "jid"};
    out = tpl ? template_render(tpl, &ctx, mode, 65536) : NULL;
    if (out && mode == TEMPLATE_JSON) {
        cJSON *in = cJSON_Parse(tpl), *res;

        /* A template that is JSON with {{...}} only inside strings stays JSON. */
        if (in && !strstr(tpl, "{{") ) {
            res = cJSON_Parse(out);
            if (!res)
                abort();
            cJSON_Delete(res);
        }
        cJSON_Delete(in);
    }
    free(out);
    if (tpl) {
        buf_init(&b, 65536);
        (void)template_escape(&b, tpl, mode, (template_place)(tn % 3));
        buf_free(&b);
        free(template_value(tpl, &ctx));
    }
    tj = cJSON_ParseWithLength((const char *)data + 1, tn);
    if (tj) {
        cJSON_Delete(template_render_json(tj, &ctx));
        cJSON_Delete(tj);
    }
    cJSON_Delete(event);
    free(tpl);
    return 0;
}
