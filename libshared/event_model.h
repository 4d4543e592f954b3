/* event_model: the chain event of SPEC section 1 (table `events`), shared by
 * the gateway (ingest and queries), the event-processor (matching) and the
 * action-workers (templates), so every program agrees on the columns, their
 * types and the JSON shape of an event.
 *
 * JSON shape: one member per column, named as the column. Integer columns
 * are JSON numbers; text columns are JSON strings; SQL NULL is JSON null;
 * created_at is an RFC 3339 UTC string. Integers beyond +-2^53 cannot be
 * carried exactly by a double: on output they are emitted as raw JSON
 * numbers (cJSON_IsRaw, exact digits); on input they must be sent as
 * decimal strings ("12345678901234567890" is accepted for any integer
 * column). event_model_get_i64() reads either form.
 *
 * Thread safety: everything here is stateless and reentrant. */
#ifndef AE_EVENT_MODEL_H
#define AE_EVENT_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>
#include <libpq-fe.h>

typedef enum {
    EVENT_COL_TEXT = 0, /* text */
    EVENT_COL_INT,      /* integer (int4) */
    EVENT_COL_BIGINT,   /* bigint (int8) */
    EVENT_COL_TIME      /* timestamptz, server-set (created_at) */
} event_col_type;

typedef struct {
    const char *name;    /* column name and JSON member name */
    event_col_type type;
    int required;        /* nonzero: an ingested event must carry it */
    int insertable;      /* nonzero: taken from the ingested JSON */
} event_column;

/* Number of columns in the table (event_model_columns has this many). */
#define EVENT_MODEL_NCOLS 28
/* Number of insertable columns (every column but created_at). */
#define EVENT_MODEL_NINSERT 27
/* Longest accepted id, and longest accepted text value, in bytes. */
#define EVENT_MODEL_MAX_ID 256
#define EVENT_MODEL_MAX_TEXT 65536
/* The seven event types of SPEC section 1. */
#define EVENT_MODEL_NTYPES 7

/* The columns in table order: id, chain_id, block_number, block_hash,
 * transaction_hash, log_index, registry, event_type, agent_id, timestamp,
 * owner, token_uri, metadata_key, metadata_value, client_address,
 * feedback_index, score, tag1, tag2, file_uri, file_hash,
 * validator_address, request_hash, response, response_uri, response_hash,
 * tag, created_at. The first EVENT_MODEL_NINSERT are the insertable ones,
 * in that order. */
extern const event_column event_model_columns[EVENT_MODEL_NCOLS];

/* "AgentRegistered", "MetadataSet", "NewFeedback", "FeedbackRevoked",
 * "ResponseAppended", "ValidationRequest", "ValidationResponse". */
extern const char *const event_model_types[EVENT_MODEL_NTYPES];

/* A SELECT list of every column, in table order, with created_at rendered
 * as RFC 3339 UTC text, for "SELECT " EVENT_MODEL_SELECT " FROM events e".
 * Columns are qualified with the alias `e`. Rows fetched with it (or with
 * any list naming the columns) are turned into JSON by event_model_from_row. */
#define EVENT_MODEL_SELECT                                                                                    \
    "e.id, e.chain_id, e.block_number, e.block_hash, e.transaction_hash, e.log_index, e.registry, "           \
    "e.event_type, e.agent_id, e.\"timestamp\", e.owner, e.token_uri, e.metadata_key, e.metadata_value, "     \
    "e.client_address, e.feedback_index, e.score, e.tag1, e.tag2, e.file_uri, e.file_hash, "                  \
    "e.validator_address, e.request_hash, e.response, e.response_uri, e.response_hash, e.tag, "               \
    "to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at"

/* The insertable column names, comma-separated in table order (quoted where
 * needed), for "INSERT INTO events (" EVENT_MODEL_INSERT_COLS ") VALUES ...". */
#define EVENT_MODEL_INSERT_COLS                                                                               \
    "id, chain_id, block_number, block_hash, transaction_hash, log_index, registry, event_type, agent_id, "   \
    "\"timestamp\", owner, token_uri, metadata_key, metadata_value, client_address, feedback_index, score, "  \
    "tag1, tag2, file_uri, file_hash, validator_address, request_hash, response, response_uri, "              \
    "response_hash, tag"

/* The column descriptor for `name`, or NULL when it is not a column. */
const event_column *event_model_column(const char *name);

/* Nonzero when `s` is one of the seven event types (exact spelling). */
int event_model_type_valid(const char *s);

/* Nonzero when `s` is identity, reputation or validation. */
int event_model_registry_valid(const char *s);

/* The registry an event type belongs to ("identity" for AgentRegistered
 * and MetadataSet, "reputation" for NewFeedback, FeedbackRevoked and
 * ResponseAppended, "validation" for the two validation types), or NULL. */
const char *event_model_registry_of(const char *event_type);

/* Validates one ingested event (a JSON object). Each problem is added to
 * `details` (a cJSON object owned by the caller) as member
 * "<prefix><column>" (prefix may be NULL or e.g. "events[3].") with a
 * short reason ("required", "must be a string", "must be an integer",
 * "out of range", "must be one of AgentRegistered, ..." ...). Members that
 * are not insertable columns are ignored (forward compatibility with
 * indexers that send more). Returns the number of problems added (0 when
 * the event is valid). */
int event_model_validate(const cJSON *ev, cJSON *details, const char *prefix);

/* Text parameters for one validated event, for PQexecParams: values[i] is
 * the text of insertable column i (NULL for SQL NULL). Pointers reference
 * either the cJSON strings of `ev` (valid while `ev` lives) or buffers in
 * this struct (valid while it lives). */
typedef struct {
    const char *values[EVENT_MODEL_NINSERT];
    char num[EVENT_MODEL_NINSERT][24];
} event_model_params;

/* Fills `out` from an event that passed event_model_validate. Returns 0, or
 * -1 when the event is not valid (then `out` is unusable). */
int event_model_to_params(const cJSON *ev, event_model_params *out);

/* Turns row `row` of `res` into an event object: every column of the table
 * that `res` has (looked up by name with PQfnumber, so SELECT * works as
 * well as EVENT_MODEL_SELECT) becomes a member; columns absent from `res`
 * are absent from the object. Returns a new object the caller frees with
 * cJSON_Delete, or NULL on OOM. */
cJSON *event_model_from_row(const PGresult *res, int row);

/* Reads integer member `name` of `obj` whether it is a JSON number with an
 * integral value, a raw number (from event_model_from_row) or a decimal
 * string. Returns 0 and stores it in *out, or -1 when the member is
 * missing, null, not an integer or out of the int64 range. */
int event_model_get_i64(const cJSON *obj, const char *name, int64_t *out);

/* Parses a decimal integer string (optional leading '-', digits only, no
 * spaces) into *out. Returns 0, or -1 when malformed or out of range. */
int event_model_parse_i64(const char *s, int64_t *out);

#endif
