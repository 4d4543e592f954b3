/* khala: the in-process parts of Khala sync: per-topic limits (publish
 * rate, payload size, replay budget), the stale-cursor decision, and the
 * bounded tables behind the publish rate limit and the poll interval guard.
 *
 * The stream itself (sequence, messages, retention floor) lives in
 * PostgreSQL (runtime.khala_*); what is kept here is per process, like the
 * original's, and bounded: a table forgets its least recently used keys. */
#ifndef RT_KHALA_H
#define RT_KHALA_H

#include <stddef.h>

typedef enum { KHALA_CLASS_RUN = 0, KHALA_CLASS_WORKER = 1, KHALA_CLASS_OTHER = 2 } khala_class;

typedef struct {
    long publish_per_second;
    long replay_budget;
    long max_payload_bytes;
} khala_limits;

/* The class of a topic ("run:*:events", "worker:*:lifecycle", else other)
 * and its name for answers ("run_events", "worker_lifecycle", "fallback"). */
khala_class khala_topic_class(const char *topic);
const char *khala_class_name(khala_class c);

/* Stale-cursor reasons (SPEC 6). A cursor `after` below the retention
 * floor `floor_seq` (the highest pruned sequence) is retention_floor_breach;
 * one more than `budget` messages behind `head` is replay_budget_exceeded.
 * Writes up to two static reason strings into reasons and returns how
 * many (0: the cursor can be served). */
int khala_stale_reasons(long long after, long long floor_seq, long long head, long long budget,
                        const char *reasons[2]);

/* A bounded table of keys with a time and a count, 8-way set associative:
 * a key that does not fit evicts the least recently touched of its set.
 * Thread-safe. */
typedef struct khala_table khala_table;

/* `capacity` is rounded up to a multiple of 8. NULL on OOM. */
khala_table *khala_table_new(size_t capacity);
void khala_table_free(khala_table *t);

/* Publish rate: counts one publish on `key` in the current one-second
 * window and returns 0, or returns -1 (not counted) when `limit` were
 * already counted in it, with *retry_after_ms set to the window's rest. */
int khala_rate_take(khala_table *t, const char *key, long limit, long long now_ms, long *retry_after_ms);
/* Gives back a publish counted by khala_rate_take at `taken_ms` (nothing
 * was published: a replay, a refusal), when its window is still the
 * key's current one. */
void khala_rate_give(khala_table *t, const char *key, long long taken_ms);

/* Poll interval guard: returns 0 and records `now_ms` when the key's last
 * poll was at least `min_interval_ms` ago (or never), else -1 with
 * *retry_after_ms set; a refused poll also counts as the last poll, as in
 * the original, so hammering keeps being refused. */
int khala_guard_poll(khala_table *t, const char *key, long min_interval_ms, long long now_ms, long *retry_after_ms);

#endif
