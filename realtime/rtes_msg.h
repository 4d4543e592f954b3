/* rtes_msg: the workflow messages of SPEC 5b as they arrive from RabbitMQ,
 * checked for their required fields and reduced to what the store and the
 * token set need.
 *
 * The JSON itself is not rebuilt here: the store keeps the body as the
 * worker sent it (jsonb, so numbers keep their precision) and builds the
 * frames from it. Pure functions, no I/O; safe from any thread. */
#ifndef RTES_MSG_H
#define RTES_MSG_H

#include <stddef.h>

struct buf;

/* The queues, in the order the consumer subscribes to them. */
typedef enum {
    RTES_NODE_STATUS = 0, /* workflow.node.status */
    RTES_COMPLETION,      /* workflow.completion */
    RTES_INITIATED,       /* workflow.worker.initiated */
    RTES_TOKEN,           /* execution.token */
    RTES_NKINDS
} rtes_kind;

/* Longest execution, workflow, node and user id accepted (bytes). */
#define RTES_ID_MAX 256
/* Largest message body accepted (bytes). */
#define RTES_BODY_MAX (4u * 1024 * 1024)
/* Bytes of the body's SHA-256 kept to recognise a redelivered message. */
#define RTES_DIGEST_LEN 16

typedef struct {
    rtes_kind kind;
    char execution_id[RTES_ID_MAX]; /* "" for a workflow-wide token */
    char workflow_id[RTES_ID_MAX];
    char node_id[RTES_ID_MAX];      /* node status; current_node when initiated */
    char lineage_key[RTES_ID_MAX];  /* node status: lineage_hash, UUIDv5 of lineage_stack, or "default" */
    char user_id[RTES_ID_MAX];      /* token */
    long long exp;                  /* token: expiry, unix seconds */
    char *body;        /* the body as stored: valid UTF-8, NUL-terminated; malloc'd */
    size_t body_len;
    char *member;      /* token: the sorted-set member (the token as JSON); malloc'd */
    char *frame;       /* node status, completion: the WebSocket frame; malloc'd */
    size_t frame_len;
    unsigned char digest[RTES_DIGEST_LEN]; /* SHA-256 of the body, first bytes */
} rtes_msg;

/* The queue (and routing key) of a kind. */
const char *rtes_kind_queue(rtes_kind k);

/* Parses `len` bytes from the queue of kind `k` into *m (overwritten; clear
 * with rtes_msg_clear even on failure). Bytes that are not UTF-8 are
 * replaced with U+FFFD first. Returns 0, or -1 with a one-line reason in
 * err ("not JSON at byte 12", "missing execution_id", ...). */
int rtes_msg_parse(rtes_kind k, const char *data, size_t len, rtes_msg *m, char *err, size_t errlen);

/* The WebSocket frame of SPEC 5b for a stored message (a node status when
 * `node` is nonzero, else a completion), `body` being its JSON text as
 * stored and `key` its lineage key: {node_id, input, params, output, status,
 * lineage_hash, lineage_stack, split_node_id, branch_id, item_index,
 * total_items, processed_count, aggregator_state, used_inputs}, every key
 * present, null when the message lacks it. Values are copied from the text
 * as the worker wrote them (numbers keep every digit); output is the JSON
 * text of the node's output, as the original sent it; lineage_hash is the
 * key (null for "default"). A completion is {node_id: null, ..., status}
 * with its own status. The same function serves live and history frames,
 * so both are the same bytes. Appends to out; 0 or -1 (OOM, or a body that
 * is not a JSON object). */
int rtes_msg_frame(int node, const char *body, size_t len, const char *key, struct buf *out);

/* Frees what rtes_msg_parse allocated; *m can be parsed into again. */
void rtes_msg_clear(rtes_msg *m);

/* The original's lineage key for a lineage_stack (a JSON array text of
 * {split_node_id, branch_id, item_index, total_items}): the UUIDv5 in the
 * OID namespace of the stack serialized compactly in that field order.
 * Writes 36 characters and a NUL into out. Returns 0, or -1 when the stack
 * does not have that shape (err says why). Exposed for tests. */
int rtes_lineage_uuid(const char *stack_json, char out[37], char *err, size_t errlen);

#endif
