/* trigger_model: the trigger, condition and action model of SPEC 2a and 3,
 * in one place: parsing and validation of a trigger body (api-gateway) and
 * evaluation of a trigger's conditions against an event (event-processor),
 * so the gateway accepts exactly what the processor can evaluate.
 *
 * Body (SPEC 2a):
 *   {name, description?, chain_id, registry, enabled?,
 *    conditions:[{condition_type, field?, operator?, value?, config?}],
 *    actions:[{action_type, priority?, config}]}
 *
 * Condition types and what each needs:
 *   agent_id_equals    value: an integer (number or decimal string)
 *   event_type_equals  value: one of the seven event types
 *   score_threshold    operator, value: a number
 *   tag_equals         field: tag1|tag2, value: a string
 *   ema_threshold      config {window_size: integer > 0}, operator, value: a number
 *   rate_limit         config {time_window: "<n>s|m|h|d", reset_on_trigger?: bool},
 *                      operator, value: a number (0..TRIGGER_MODEL_MAX_RATE)
 * At most TRIGGER_MODEL_MAX_STATEFUL of the last two per trigger.
 * Operators: < > = == <= >= != <> ("=" and "==" are equality, "!=" and "<>"
 * inequality). Stored values are text (trigger_conditions.value): a number
 * given as 50 is stored as "50".
 * Action types:
 *   telegram  config {chat_id (string or integer) required, message_template?: string,
 *             parse_mode?: Markdown|MarkdownV2|HTML}
 *   rest      config {method: GET|POST|PUT|PATCH|DELETE, url: http(s) URL required,
 *             headers?: {string: string}, body_template?: string|object,
 *             timeout_ms?: 1..300000}
 *   mcp       config {server_url: http(s) URL required, tool: string required,
 *             arguments_template?: object|string}
 *   priority: integer 1..100, default 1 (higher is delivered first).
 *
 * Thread safety: parsing and validation are stateless and reentrant. A
 * matcher is immutable after trigger_model_matcher_new and may be shared by
 * threads; the state a match reads and writes is passed in and out
 * explicitly. */
#ifndef AE_TRIGGER_MODEL_H
#define AE_TRIGGER_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

/* Limits applied by validation. */
#define TRIGGER_MODEL_MAX_NAME 200        /* bytes */
#define TRIGGER_MODEL_MAX_DESCRIPTION 2000
#define TRIGGER_MODEL_MAX_CONDITIONS 32
#define TRIGGER_MODEL_MAX_ACTIONS 16
#define TRIGGER_MODEL_MAX_PRIORITY 100
#define TRIGGER_MODEL_MAX_WINDOW_SIZE 100000 /* ema_threshold window_size */
#define TRIGGER_MODEL_MAX_RATE 100000        /* rate_limit threshold */
#define TRIGGER_MODEL_MAX_TIMEOUT_MS 300000
/* What one user can make the shared matching loop do (issue 10): a trigger
 * has at most this many stateful conditions (ema_threshold and rate_limit
 * together; a stored trigger beyond it never matches), and a user at most
 * this many triggers and this many stateful conditions over all of them
 * (enforced by the gateway on every write). Each stateful condition an
 * event reaches is state written back with the batch: the per-user budget
 * bounds what one user adds to every batch's commit (see
 * scripts/bench.d/45-trigger-limits.sh). */
#define TRIGGER_MODEL_MAX_STATEFUL 8
#define TRIGGER_MODEL_MAX_TRIGGERS_PER_USER 100
#define TRIGGER_MODEL_MAX_STATEFUL_PER_USER 32
/* rate_limit counts events in this many time buckets per window, whatever
 * the count: a window of w seconds has buckets of ceil(w/128) seconds, so
 * windows up to 128 s are exact to the second and longer ones have their
 * far edge rounded to a bucket (less than 1/128 of the window). */
#define TRIGGER_MODEL_RATE_BUCKETS 128

typedef enum {
    TRIGGER_COND_UNKNOWN = 0, /* only from stored rows: never matches */
    TRIGGER_COND_AGENT_ID_EQUALS,
    TRIGGER_COND_EVENT_TYPE_EQUALS,
    TRIGGER_COND_SCORE_THRESHOLD,
    TRIGGER_COND_TAG_EQUALS,
    TRIGGER_COND_EMA_THRESHOLD,
    TRIGGER_COND_RATE_LIMIT
} trigger_model_cond_type;

typedef enum {
    TRIGGER_ACTION_UNKNOWN = 0,
    TRIGGER_ACTION_TELEGRAM,
    TRIGGER_ACTION_REST,
    TRIGGER_ACTION_MCP
} trigger_model_action_type;

typedef enum {
    TRIGGER_OP_NONE = 0, /* not given (types that take no operator) */
    TRIGGER_OP_LT,
    TRIGGER_OP_GT,
    TRIGGER_OP_EQ, /* "=" or "==" */
    TRIGGER_OP_LE,
    TRIGGER_OP_GE,
    TRIGGER_OP_NE /* "!=" or "<>" */
} trigger_model_op;

/* One validated condition. Strings point into the def's own storage. */
typedef struct {
    trigger_model_cond_type type;
    const char *field;   /* "tag1"/"tag2" for tag_equals, else NULL */
    const char *op_text; /* operator as given, or NULL */
    trigger_model_op op;
    const char *value;   /* the value as stored text, or NULL */
    cJSON *config;       /* the config object, or NULL when absent */
} trigger_model_condition;

/* One validated action. */
typedef struct {
    trigger_model_action_type type;
    int priority; /* 1..TRIGGER_MODEL_MAX_PRIORITY */
    cJSON *config;
} trigger_model_action;

/* A validated trigger body. */
typedef struct {
    const char *name;
    const char *description; /* NULL when absent or null */
    int64_t chain_id;
    const char *registry;
    int enabled; /* default 1 */
    int ncond;
    trigger_model_condition *conds;
    int naction;
    trigger_model_action *actions;
    void *priv_; /* storage; do not touch */
} trigger_model_def;

/* Validates trigger body `body` and collects EVERY problem into `details`
 * (a cJSON object owned by the caller) as members named after the field
 * ("name", "chain_id", "conditions[0].operator",
 * "actions[1].config.chat_id" ...) whose values are human messages.
 * Returns the parsed def when there is no problem (the caller frees it
 * with trigger_model_def_free), or NULL when there is at least one problem
 * (then `details` says why) or on OOM (then `details` may be empty). */
trigger_model_def *trigger_model_parse(const cJSON *body, cJSON *details);

/* Frees a def from trigger_model_parse. NULL is a no-op. */
void trigger_model_def_free(trigger_model_def *def);

/* Validation only: returns 0 when `body` is valid, or -1 with
 * *details_out set to a new object listing every problem (the caller frees
 * it with cJSON_Delete). On success *details_out is set to NULL. */
int trigger_model_validate(const cJSON *body, cJSON **details_out);

/* Nonzero when the def has an ema_threshold or rate_limit condition (the
 * value of triggers.is_stateful). */
int trigger_model_def_is_stateful(const trigger_model_def *def);

/* The number of ema_threshold and rate_limit conditions of the def. */
int trigger_model_def_stateful_count(const trigger_model_def *def);

/* The per-user limits, for the gateway's 400: a user whose other
 * triggers (all but the one being replaced) number `others`, with
 * `others_stateful` stateful conditions among them, may store `def` (a new
 * trigger when `creating`). Returns 0, else -1 with the problems added to
 * `details` (members "triggers" and "conditions"). */
int trigger_model_check_user_limits(long long others, long long others_stateful, const trigger_model_def *def,
                                    int creating, cJSON *details);

/* The same from a JSON array of conditions (body or stored form): nonzero
 * when any element's condition_type is ema_threshold or rate_limit. */
int trigger_model_is_stateful(const cJSON *conditions);

/* Names <-> enums. The *_name functions return a static string
 * ("unknown" for the UNKNOWN values); the parsers return UNKNOWN / NONE
 * for NULL or unrecognised text. */
const char *trigger_model_condition_type_name(trigger_model_cond_type t);
const char *trigger_model_action_type_name(trigger_model_action_type t);
trigger_model_cond_type trigger_model_condition_type_parse(const char *s);
trigger_model_action_type trigger_model_action_type_parse(const char *s);
trigger_model_op trigger_model_op_parse(const char *s);

/* Parses a rate_limit time window "<n>s|m|h|d" (n a positive integer, the
 * total at most 365 days) into seconds. Returns 0, or -1 when malformed. */
int trigger_model_parse_window(const char *s, int64_t *seconds);

/* Compares `a op b` as doubles (TRIGGER_OP_NONE compares false). */
int trigger_model_compare(double a, trigger_model_op op, double b);

/* ------------------------------------------------------------------ */
/* Evaluation (event-processor).                                        */

/* The compiled conditions of one trigger. Immutable once built. */
typedef struct trigger_model_matcher trigger_model_matcher;

/* Compiles `conditions`, a JSON array in the stored form (elements
 * {condition_type, field, operator, value (text or number), config}),
 * typically jsonb_agg of the trigger's trigger_conditions rows ordered by
 * id. Stored rows are not trusted: a condition of unknown type or with a
 * bad operator/value/config compiles into one that never matches, and is
 * logged once here (with `trigger_id` for context, may be NULL). An empty
 * or NULL array matches every event. Returns a matcher the caller frees
 * with trigger_model_matcher_free, or NULL on OOM. */
trigger_model_matcher *trigger_model_matcher_new(const cJSON *conditions, const char *trigger_id);

/* Frees a matcher. NULL is a no-op. */
void trigger_model_matcher_free(trigger_model_matcher *m);

/* Nonzero when the matcher has a stateful condition (ema_threshold,
 * rate_limit), i.e. trigger_model_match may produce a new state. */
int trigger_model_matcher_stateful(const trigger_model_matcher *m);

/* Nonzero when some condition can never match (unknown type, bad stored
 * values): the processor may drop the trigger from its index. */
int trigger_model_matcher_never(const trigger_model_matcher *m);

/* Index hints: when the matcher requires an event type (an
 * event_type_equals condition) returns it, else NULL. The pointer lives as
 * long as the matcher. */
const char *trigger_model_matcher_event_type(const trigger_model_matcher *m);

/* Index hint: returns 1 and stores in *agent_id the agent the matcher
 * requires (an agent_id_equals condition), else 0. */
int trigger_model_matcher_agent_id(const trigger_model_matcher *m, int64_t *agent_id);

/* The stateful conditions' state of one trigger (opaque), made for one
 * matcher and changed in place by trigger_model_match: no copy per event.
 * Its size does not depend on the counts: an EMA and its count per
 * ema_threshold, TRIGGER_MODEL_RATE_BUCKETS counters per rate_limit. */
typedef struct trigger_model_state trigger_model_state;

/* A state for matcher `m` (which must outlive it), restored from the
 * stored state_data `stored` (NULL or not an object: a fresh state).
 * Entries whose type or window differ from the condition (the trigger was
 * edited) restart; rate_limit entries of the earlier layout (a "times"
 * array) are converted. Returns NULL on OOM; free with
 * trigger_model_state_free (NULL is a no-op). */
trigger_model_state *trigger_model_state_new(const trigger_model_matcher *m, const cJSON *stored);
void trigger_model_state_free(trigger_model_state *st);

/* The state as the JSON text stored in trigger_state.state_data: a
 * malloc'd string the caller frees (NULL on OOM), its length in *len when
 * `len` is not NULL. At most about 2.6 KiB per stateful condition (128
 * buckets of up to 19 digits), typically under 150 bytes. Layout:
 * {"<i>": {...}} keyed by the condition's index in the array given to
 * trigger_model_matcher_new, for conditions an event reached:
 *   ema_threshold  {"type":"ema_threshold","window_size":n,"ema":x,"count":k}
 *   rate_limit     {"type":"rate_limit","window_s":w,"bucket_s":b,"head":h,
 *                   "counts":"n1,,n3,...,nh"}: the events counted per
 *                  bucket (bucket = floor(time / b), b seconds each), one
 *                  comma-separated field per bucket up to the newest, h,
 *                  oldest first, at most nb = ceil(w/b) of them; a zero is
 *                  an empty field and leading empty fields are left out (a
 *                  quiet trigger stores "1"). One string rather than an
 *                  array of numbers: jsonb keeps it at its length, where
 *                  128 numbers took 2 KiB before compression, and the state
 *                  is written back every batch. */
char *trigger_model_state_text(const trigger_model_state *st, size_t *len);

/* Evaluates the matcher against `event` (an object as event_model_from_row
 * builds it; integer members may be numbers, raw numbers or decimal
 * strings). Stateless conditions are ANDed first; the stateful ones
 * (ema_threshold, rate_limit) are evaluated, and their state advanced,
 * only for events that pass every stateless condition. A field the event
 * lacks (missing or null) makes its condition false.
 *
 * `st` is the trigger's state (from trigger_model_state_new for this
 * matcher; may be NULL for a matcher that is not stateful). When the event
 * reached the stateful conditions, `st` is changed in place and *changed
 * (when not NULL) is set to 1, else 0. `now_s` is the clock (Unix seconds)
 * rate_limit uses when the event has no `timestamp` column.
 *
 * EMA: alpha = 2/(window_size+1); the first score seeds the EMA; each later
 * score gives ema = alpha*score + (1-alpha)*ema; the NEW ema is compared.
 * Events without a score leave the EMA unchanged and do not match.
 * rate_limit: counts the events that reached it within the window, this
 * event included, and compares the count. The window is the buckets up to
 * and including this event's (see TRIGGER_MODEL_RATE_BUCKETS), of those
 * the state keeps: the newest event seen so far decides which are kept, so
 * an event that arrives after newer ones counts the kept events up to its
 * own bucket, and one older than every kept bucket counts alone (1). With
 * reset_on_trigger the count restarts after the trigger matched.
 *
 * Returns 1 when every condition holds, 0 when not, -1 when a stateful
 * matcher gets no state (or one made for another matcher). */
int trigger_model_match(const trigger_model_matcher *m, const cJSON *event, trigger_model_state *st, int *changed,
                        int64_t now_s);

#endif
