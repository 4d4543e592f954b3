/* JWT strings as the gateway, realtime and runtime get them: an
 * Authorization header (jwtauth_bearer), then jwtauth_verify. A token that
 * verifies with the test secret must have come from the fuzzer forging an
 * HS256 signature, which would be a finding: only the seed tokens signed
 * with this secret may pass. */
#include <cjson/cJSON.h>

#include "fuzz.h"
#include "jwtauth.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static jwtauth *j;
    const char *tok;
    cJSON *claims = NULL;
    char *s;

    if (!j && !(j = jwtauth_new("fuzz-secret-0123456789abcdef0123456789", NULL, NULL, 0)))
        abort();
    if (!(s = fuzz_str(data, size)))
        return 0;
    tok = jwtauth_bearer(s);
    (void)jwtauth_verify(j, tok ? tok : s, &claims);
    cJSON_Delete(claims);
    free(s);
    return 0;
}
