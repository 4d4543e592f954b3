/* jget_parse (libshared/jget, every service's JSON bodies and frames): what
 * it takes is UTF-8, and cJSON's printing of it is taken again and prints
 * the same; what it refuses is refused at an offset inside the input. */
#include <cjson/cJSON.h>

#include "buf.h"
#include "fuzz.h"
#include "jget.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data, *why = NULL;
    size_t at = (size_t)-1;
    cJSON *v = jget_parse(s, size, &at, &why), *again;
    char *p1, *p2;

    if (!v) {
        if (!why || at > size)
            abort();
        return 0;
    }
    if (buf_utf8_valid(s, size) != size)
        abort();
    p1 = cJSON_PrintUnformatted(v);
    if (p1) {
        if (!(again = jget_parse(p1, strlen(p1), NULL, NULL)))
            abort();
        p2 = cJSON_PrintUnformatted(again);
        if (p2 && strcmp(p1, p2) != 0)
            abort();
        free(p2);
        cJSON_Delete(again);
    }
    free(p1);
    cJSON_Delete(v);
    return 0;
}
