/* Force-included by `make lint` into every file clang-tidy reads, never
 * into a build: cJSON's type predicates are functions in another library,
 * so the static analyzer does not know that each is false for NULL and
 * reports `cJSON_IsString(t) ? t->valuestring : ...` as a null dereference.
 * These macros say what cJSON's own code does. */
#include <cjson/cJSON.h>

#define AE_LINT_CJSON_IS(x, t) ((x) != NULL && ((x)->type & 0xFF) == (t))
#define cJSON_IsInvalid(x) AE_LINT_CJSON_IS(x, cJSON_Invalid)
#define cJSON_IsFalse(x) AE_LINT_CJSON_IS(x, cJSON_False)
#define cJSON_IsTrue(x) AE_LINT_CJSON_IS(x, cJSON_True)
#define cJSON_IsBool(x) ((x) != NULL && ((x)->type & (cJSON_True | cJSON_False)) != 0)
#define cJSON_IsNull(x) AE_LINT_CJSON_IS(x, cJSON_NULL)
#define cJSON_IsNumber(x) AE_LINT_CJSON_IS(x, cJSON_Number)
#define cJSON_IsString(x) AE_LINT_CJSON_IS(x, cJSON_String)
#define cJSON_IsArray(x) AE_LINT_CJSON_IS(x, cJSON_Array)
#define cJSON_IsObject(x) AE_LINT_CJSON_IS(x, cJSON_Object)
#define cJSON_IsRaw(x) AE_LINT_CJSON_IS(x, cJSON_Raw)
