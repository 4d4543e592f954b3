/* evrow: the events of a fetched batch, read straight from the PGresult.
 *
 * The processor needs two things per event: a small cJSON object with the
 * members that matching reads (trigger_model_match), and, only for events
 * that matched, the event's full JSON text for the job documents. Going
 * through event_model_from_row + cJSON_PrintUnformatted costs a column
 * lookup by name per column and row, three allocations per member and a
 * printf/scanf round trip per number; at tens of thousands of events per
 * second that was the largest part of the processing thread's time. The
 * JSON produced here has the shape event_model documents (one member per
 * column in table order, integers as exact JSON numbers, NULL as null,
 * created_at as the RFC 3339 string the query produced). */
#ifndef AE_EVROW_H
#define AE_EVROW_H

#include <stddef.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

#include "event_model.h"

/* Field numbers of the event columns in one result (-1: absent). */
typedef struct {
    int f[EVENT_MODEL_NCOLS];
} evrow_cols;

/* Looks the event columns up in `res` (once per result). */
void evrow_cols_init(evrow_cols *c, const PGresult *res);

/* The members matching reads (id, chain_id, registry, event_type,
 * agent_id, score, tag1, tag2, timestamp, created_at) of row `row` as a
 * new cJSON object, with the types event_model_from_row gives them. The
 * caller frees it with cJSON_Delete. NULL on OOM. */
cJSON *evrow_match_obj(const evrow_cols *c, const PGresult *res, int row);

/* The whole event of row `row` as JSON text (every column present in
 * `res`). Returns a malloc'd string the caller frees, its length in
 * *len; NULL on OOM. */
char *evrow_json(const evrow_cols *c, const PGresult *res, int row, size_t *len);

#endif
