/* The .env reader (libshared/cfg): the file's bytes as lines. The variables
 * it sets are cleared after each input so that the environment stays
 * small. */
#include <stdio.h>

#include "cfg.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    FILE *f;

    if (size == 0)
        return 0;
    f = fmemopen((void *)data, size, "r");
    if (!f)
        return 0;
    (void)cfg_read_dotenv(f, "fuzz.env", err, sizeof(err));
    fclose(f);
    clearenv();
    return 0;
}
