/* Unit tests of jarena, the action-workers' slot allocator for parsed jobs.
 * The module's source is compiled in (unit tests link libshared only). Its
 * hooks are process-wide, so one region of SLOTS slots serves every test;
 * each test gives back what it took. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../action-workers/jarena.c"

#define SLOTS 4
#define JOB "{\"id\":\"j1\",\"attempt\":2,\"config\":{\"url\":\"http://x/\"},\"event\":{\"score\":87,\"tags\":[1,2]}}"

static int in_region(const void *p)
{
    return (const char *)p >= region && (const char *)p < region_end;
}

static void parses_into_a_slot_and_gives_it_back(void **state)
{
    void *slot;
    cJSON *doc = jarena_parse(JOB, &slot);

    (void)state;
    assert_non_null(doc);
    assert_non_null(slot);
    assert_true(in_region(doc));
    assert_int_equal(jarena_in_use(), 1);
    assert_string_equal(cJSON_GetObjectItem(doc, "id")->valuestring, "j1");
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "event"), "score")->valueint, 87);
    cJSON_Delete(doc);
    jarena_release(slot);
    assert_int_equal(jarena_in_use(), 0);
}

static void invalid_json_takes_no_slot(void **state)
{
    void *slot = (void *)1;

    (void)state;
    assert_null(jarena_parse("{\"id\":", &slot));
    assert_null(slot);
    assert_int_equal(jarena_in_use(), 0);
}

/* A document larger than a slot is parsed again with malloc, whole. */
static void large_document_falls_back_to_malloc(void **state)
{
    size_t n = JARENA_SLOT * 2;
    char *big = malloc(n + 32);
    void *slot = (void *)1;
    cJSON *doc;

    (void)state;
    assert_non_null(big);
    strcpy(big, "{\"body\":\"");
    memset(big + 9, 'x', n);
    strcpy(big + 9 + n, "\",\"id\":\"j2\"}");
    doc = jarena_parse(big, &slot);
    assert_non_null(doc);
    assert_null(slot);
    assert_false(in_region(doc));
    assert_int_equal(strlen(cJSON_GetObjectItem(doc, "body")->valuestring), n);
    assert_string_equal(cJSON_GetObjectItem(doc, "id")->valuestring, "j2");
    assert_int_equal(jarena_in_use(), 0);
    cJSON_Delete(doc);
    free(big);
}

/* When every slot is taken, parses go on with malloc; a released slot is
 * used again. */
static void exhausted_slots_fall_back_then_recover(void **state)
{
    void *slots[SLOTS + 1];
    cJSON *docs[SLOTS + 1];

    (void)state;
    for (int i = 0; i <= SLOTS; i++)
        docs[i] = jarena_parse(JOB, &slots[i]);
    for (int i = 0; i < SLOTS; i++) {
        assert_non_null(slots[i]);
        for (int k = 0; k < i; k++)
            assert_ptr_not_equal(slots[i], slots[k]);
    }
    assert_null(slots[SLOTS]);
    assert_non_null(docs[SLOTS]);
    assert_false(in_region(docs[SLOTS]));
    assert_int_equal(jarena_in_use(), SLOTS);
    cJSON_Delete(docs[1]);
    jarena_release(slots[1]);
    {
        void *again;
        cJSON *d = jarena_parse(JOB, &again);

        assert_ptr_equal(again, slots[1]);
        cJSON_Delete(d);
        jarena_release(again);
    }
    for (int i = 0; i <= SLOTS; i++)
        if (i != 1) {
            cJSON_Delete(docs[i]);
            jarena_release(slots[i]);
        }
    assert_int_equal(jarena_in_use(), 0);
}

/* Nodes added to a parsed document after the parse come from malloc and
 * are freed by cJSON_Delete (the sanitizer build would report a leak);
 * nodes removed from it are skipped. */
static void mixed_documents_free_what_malloc_gave(void **state)
{
    void *slot;
    cJSON *doc = jarena_parse(JOB, &slot), *added, *copy;

    (void)state;
    assert_non_null(slot);
    cJSON_DeleteItemFromObjectCaseSensitive(doc, "attempt");
    added = cJSON_AddNumberToObject(doc, "attempt", 3);
    assert_non_null(added);
    assert_false(in_region(added));
    copy = cJSON_Duplicate(doc, 1);
    assert_false(in_region(copy));
    cJSON_Delete(cJSON_DetachItemFromObject(doc, "event"));
    cJSON_Delete(doc);
    jarena_release(slot);
    assert_int_equal(cJSON_GetObjectItem(copy, "attempt")->valueint, 3);
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(copy, "event"), "score")->valueint, 87);
    cJSON_Delete(copy);
}

static int setup(void **state)
{
    (void)state;
    return jarena_init(SLOTS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(parses_into_a_slot_and_gives_it_back),
        cmocka_unit_test(invalid_json_takes_no_slot),
        cmocka_unit_test(large_document_falls_back_to_malloc),
        cmocka_unit_test(exhausted_slots_fall_back_then_recover),
        cmocka_unit_test(mixed_documents_free_what_malloc_gave),
    };

    return cmocka_run_group_tests(tests, setup, NULL);
}
