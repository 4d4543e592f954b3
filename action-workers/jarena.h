/* jarena: parses jobs into slots of one reserved memory region instead of
 * one malloc per cJSON node.
 *
 * A job's document is about twenty nodes and as many strings; allocating
 * and freeing them one by one was a fifth of the event loop's CPU. Here a
 * parse bump-allocates from a fixed-size slot, and the whole slot is given
 * back when the job is done (jarena_free). Nodes made outside a parse (a
 * response object, a copy for a retry) still come from malloc; the hooks'
 * free skips slot memory, so cJSON_Delete of a copy or of an item
 * detached from a slot document works as usual.
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

/* Frees what jarena_parse returned: the slot whole, without walking the
 * document (its nodes are cold by then: the walk cost 5% of the event
 * loop), or cJSON_Delete for a document from malloc. A document in a slot
 * must not have been added to (that would leak). */
void jarena_free(cJSON *doc, void *slot);

/* Slots in use (tests, metrics). */
size_t jarena_in_use(void);

#endif
