/* queue: the reliable job queue in Redis (RESP2 commands and Lua scripts
 * that Redis 2.6+ runs; nothing needs LMOVE or streams).
 *
 * Keys (prefix "action_jobs" by default):
 *   action_jobs           list: producers LPUSH, consumers take from the
 *                         right; a producer puts urgent (priority > 1) jobs
 *                         with RPUSH so they are taken first.
 *   action_jobs_inflight  zset: job -> lease deadline (ms). A job is moved
 *                         here atomically when taken (one Lua script), and
 *                         removed when its outcome is recorded. Leases of
 *                         jobs still being worked on are extended; a job
 *                         whose lease expired (its worker died) goes back to
 *                         the list, so it is delivered again.
 *   action_jobs_delayed   zset: job -> due time (ms): retries, 429s, paced
 *                         Telegram messages and jobs for an open breaker.
 *                         Moved back to the list when due.
 *   action_jobs_dlq       list: jobs whose attempts are exhausted.
 *   action_jobs_pace:{chat} string: the next free send slot for a chat.
 *
 * Jobs are identified by their exact bytes. A queue is one Redis connection
 * and NOT thread-safe: each worker thread has its own. */
#ifndef AW_QUEUE_H
#define AW_QUEUE_H

#include <stddef.h>

#include "rconn.h"

typedef struct queue queue;

typedef enum {
    QUEUE_DONE = 0,    /* finished (success or final failure): drop */
    QUEUE_RETRY = 1,   /* schedule `payload` on the delayed set at `due_ms` */
    QUEUE_DEAD = 2,    /* push `payload` to the dead-letter list */
    QUEUE_RELEASE = 3, /* give the job back untouched (shutdown) */
    QUEUE_KEEP = 4     /* record nothing: the job stays leased until the
                        * reaper brings it back (out of memory) */
} queue_ack_kind;

typedef struct {
    const char *raw;     /* the job as taken */
    queue_ack_kind kind;
    const char *payload; /* RETRY/DEAD: the job to store */
    long long due_ms;    /* RETRY */
    int done;            /* set by queue_ack when Redis recorded it */
} queue_ack;

/* `prefix` NULL means "action_jobs". Does not connect. NULL on OOM. Free
 * with queue_free. */
queue *queue_new(const rconn_opts *o, const char *prefix, int timeout_ms);
void queue_free(queue *q);

/* Takes up to `max` jobs (at most 1000 per call) and leases them until
 * `deadline_ms`, in two halves, for an event loop that must not wait for
 * Redis. queue_take_send sends the script (connecting first when needed)
 * and returns the connection's socket, to watch for reading; -1 on
 * failure (reason in queue_errstr). queue_take_recv then reads what has
 * arrived: 1 once the whole answer is there, with *out a malloc'd array
 * of malloc'd strings (free each, then the array, with free()) and *n
 * their count (0 when the queue was empty); 0 when more is needed; -1 on
 * failure (the connection is dropped; the lease reaper recovers any job
 * the lost answer held). `block` waits for the answer instead (shutdown).
 * Between the two halves, nothing else may use this queue. */
int queue_take_send(queue *q, int max, long long deadline_ms);
int queue_take_recv(queue *q, int block, char ***out, int *n);
/* Closes the connection (its socket leaves any epoll set); the next call
 * reconnects. */
void queue_take_drop(queue *q);

/* Extends the leases of jobs still held (pipelined ZADD XX). Returns 0/-1. */
int queue_extend(queue *q, char *const *raws, int n, long long deadline_ms);

/* Moves due delayed jobs and jobs whose lease expired back to the list, at
 * most `limit` of each. Any number of workers may run it at once. Returns
 * 0/-1; counts go to *moved and *reaped (may be NULL). */
int queue_maintain(queue *q, long long now_ms, int limit, int *moved, int *reaped);

/* Records outcomes: one script call per batch of up to 512 jobs (each
 * job's ack is atomic; so is the batch). Sets done on each ack Redis
 * accepted. When our lease had been reaped and the job was
 * requeued, that copy is taken back first; if another worker holds it, the
 * ack is a no-op for us. Returns the number recorded, or -1 when Redis
 * failed before any answer. */
int queue_record(queue *q, queue_ack *acks, int n);

/* Reserves the next send slot for `chat`, `interval_ms` after the last one.
 * *wait_ms gets how long to wait before sending (0: now). Returns 0/-1. */
int queue_pace(queue *q, const char *chat, long interval_ms, long long now_ms, long *wait_ms);

/* Pushes the chat's next slot to at least `until_ms` (after a 429). */
int queue_pace_block(queue *q, const char *chat, long long until_ms);

/* Pushes a job to the list (tests and tools). Returns 0/-1. */
int queue_push(queue *q, const char *job);

const char *queue_errstr(const queue *q);

#endif
