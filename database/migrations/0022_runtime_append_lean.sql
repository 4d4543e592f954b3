-- PostgreSQL's work per append, measured by profiling the backend that runs
-- the one-statement append (perf, pgbench -M prepared; docs/runtime.md,
-- "Where an append's time went"):
--
-- * runtime.ts was declared IMMUTABLE over to_char, which is only STABLE,
--   so the planner would not inline it: every statement calling it ran it
--   as a SQL function (fmgr_sql), which parses and plans its body again on
--   each statement's first call, 15% of the append backend's CPU and most of
--   the statement's execution time (exec 50-70 us down to about 25). STABLE
--   is what it is (no index uses it), and inlined it is a to_char call.
-- * The CHECK constraints of runs (status) and run_events (seq > 0) are
--   rebuilt from their stored node trees (stringToNode) and evaluated by
--   every UPDATE of the run row and INSERT of an event, whatever columns
--   change: 4-6% of the backend per append. Both columns are written only
--   by this schema's functions and the runtime's statements, from the state
--   machine's constants and last_seq + 1 (never from a client's value).
-- * runs gets fillfactor 20: a run row is updated by every append to it,
--   and a HOT update needs room on the row's own page. At 100 a page holds
--   about fifty runs and no room, so updates to busy runs went non-HOT (a
--   new index entry each, and a bloating primary key) until pruning freed
--   space; at 20 a page keeps room for several versions of each of its
--   runs. It applies to runs created from now on.

CREATE OR REPLACE FUNCTION runtime.ts(t timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

ALTER TABLE runtime.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runtime.run_events DROP CONSTRAINT run_events_seq_check;
ALTER TABLE runtime.runs SET (fillfactor = 20);
