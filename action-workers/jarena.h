/* jarena: parses jobs into slots of one reserved memory region instead of
 * one malloc per cJSON node.
 *
 * A job's document is about twenty nodes and as many strings; allocating
 * and freeing them one by one was a fifth of the event loop's CPU. Here a
 * parse bump-allocates from a fixed-size slot, and the whole slot is given
 * back when the job is done. Nodes outside a parse (a response object, a
 * copy for a retry, a field added to a parsed document) still come from
 * malloc, and cJSON_Delete frees those and skips slot memory, so any mix
 * of the two is freed correctly by the usual cJSON_Delete.
 *
 * jarena_init installs cJSON hooks for the whole process; without it (unit
 * tests, or when the region cannot be reserved) jarena_parse is a plain
 * cJSON_Parse. Thread-safe. */
#ifndef AW_JARENA_H
#define AW_JARENA_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* Bytes per slot; a job whose parse needs more is parsed with malloc. */
#define JARENA_SLOT (16 * 1024)

/* Reserves address space for `slots` slots (only the pages touched use
 * memory) and installs the cJSON hooks. Call once, before other threads
 * use cJSON. Returns 0 or -1 (then parses use malloc). */
int jarena_init(size_t slots);

/* Parses `text`. *slot gets the slot holding the document (NULL when it
 * came from malloc); release it with jarena_release after cJSON_Delete.
 * NULL when the text is not JSON or on OOM (then *slot is NULL). */
cJSON *jarena_parse(const char *text, void **slot);

/* Gives a slot back (NULL is a no-op). Nothing may point into it after. */
void jarena_release(void *slot);

/* Slots in use (tests, metrics). */
size_t jarena_in_use(void);

#endif
