/* RTES AMQP message bodies (realtime/rtes_msg.c): the first byte picks the
 * queue (node status, completion, initiated, token), the rest is the body
 * as a worker published it. A parsed message's stored body must be UTF-8
 * and its frame JSON (strictly: no control bytes); the lineage stack goes through rtes_lineage_uuid. */
#include <cjson/cJSON.h>

#include "buf.h"
#include "fuzz.h"
#include "rtes_msg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256], uuid[37];
    rtes_msg m;
    char *s;

    if (size < 1)
        return 0;
    memset(&m, 0, sizeof(m));
    if (rtes_msg_parse((rtes_kind)(data[0] % RTES_NKINDS), (const char *)data + 1, size - 1, &m, err,
                       sizeof(err)) == 0) {
        if (!m.body || buf_utf8_valid(m.body, m.body_len) != m.body_len)
            abort();
        if (m.frame) {
            cJSON *f = cJSON_ParseWithLength(m.frame, m.frame_len);

            /* JSON to a browser too: no control byte but tab, LF, CR. */
            for (size_t i = 0; i < m.frame_len; i++)
                if ((unsigned char)m.frame[i] < 0x20 && m.frame[i] != '\t' && m.frame[i] != '\n' &&
                    m.frame[i] != '\r')
                    abort();
            if (!f)
                abort();
            cJSON_Delete(f);
        }
    }
    rtes_msg_clear(&m);
    if ((s = fuzz_str(data + 1, size - 1))) {
        (void)rtes_lineage_uuid(s, uuid, err, sizeof(err));
        free(s);
    }
    return 0;
}
