-- rtes_put_events (0021) with a plan that does not grow with the table.
-- Its redelivery check was a NOT EXISTS against rtes_events: on a table
-- not yet analyzed the planner guesses 10 pages and 10 rows from unnest,
-- so the generic plan that plpgsql caches after five calls hashed the whole
-- table (a sequential scan per burst) rather than probing the digest index
-- once per message, and a connection kept that plan while the table grew:
-- a fresh database (the benchmark's first round, a new deployment) spent
-- twice the PostgreSQL CPU per message, growing with every burst, until
-- autovacuum analyzed the table. Measured with auto_explain in
-- docs/realtime.md.
CREATE OR REPLACE FUNCTION rtes_put_events(p_eid text[], p_wid text[], p_node text[], p_key text[],
                                           p_digest bytea[], p_msg json[])
RETURNS TABLE (ord bigint, seq bigint) LANGUAGE plpgsql
-- The probe stays an index probe even on a table analyzed while nearly empty.
SET enable_seqscan = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH inp AS (
        SELECT * FROM unnest(p_eid, p_wid, p_node, p_key, p_digest, p_msg) WITH ORDINALITY
                 AS t(eid, wid, node, key, digest, msg, ord)),
    fresh AS (
        -- One probe of the digest index per message (LATERAL ... LIMIT 1
        -- cannot be flattened into a join), not NOT EXISTS: see above.
        SELECT DISTINCT ON (i.eid, i.digest) i.* FROM inp i
          LEFT JOIN LATERAL (SELECT 1 AS hit FROM rtes_events e
                              WHERE e.execution_id = i.eid AND e.digest = i.digest LIMIT 1) h ON true
         WHERE h.hit IS NULL
         ORDER BY i.eid, i.digest, i.ord),
    counts AS (
        SELECT f.eid, min(f.wid) AS wid, count(*) AS n,
               (array_agg(f.msg ORDER BY f.ord DESC) FILTER (WHERE f.node IS NULL))[1] AS done
          FROM fresh f GROUP BY f.eid),
    up AS (
        -- finished_at is set only by a completion: it says, in EXCLUDED,
        -- whether this burst brings one.
        INSERT INTO rtes_executions AS x (execution_id, workflow_id, last_seq, status, final_context,
                                          failure_reason, total_duration_ms, completed_at, finished_at)
        SELECT c.eid, c.wid, c.n, COALESCE(c.done->>'status', 'running'), (c.done->'final_context')::jsonb,
               c.done->>'failure_reason', (c.done->>'total_duration_ms')::numeric::bigint,
               c.done->>'completed_at', CASE WHEN c.done IS NOT NULL THEN now() END
          FROM counts c ORDER BY c.eid
        ON CONFLICT (execution_id) DO UPDATE
           SET last_seq = x.last_seq + EXCLUDED.last_seq, updated_at = now(),
               status = CASE WHEN EXCLUDED.finished_at IS NULL THEN x.status ELSE EXCLUDED.status END,
               final_context = CASE WHEN EXCLUDED.finished_at IS NULL THEN x.final_context
                                    ELSE EXCLUDED.final_context END,
               failure_reason = CASE WHEN EXCLUDED.finished_at IS NULL THEN x.failure_reason
                                     ELSE EXCLUDED.failure_reason END,
               total_duration_ms = CASE WHEN EXCLUDED.finished_at IS NULL THEN x.total_duration_ms
                                        ELSE EXCLUDED.total_duration_ms END,
               completed_at = CASE WHEN EXCLUDED.finished_at IS NULL THEN x.completed_at
                                   ELSE EXCLUDED.completed_at END,
               finished_at = COALESCE(EXCLUDED.finished_at, x.finished_at)
        RETURNING x.execution_id, x.last_seq),
    numbered AS (
        SELECT f.*, up.last_seq - c.n + row_number() OVER (PARTITION BY f.eid ORDER BY f.ord) AS s
          FROM fresh f JOIN up ON up.execution_id = f.eid JOIN counts c ON c.eid = f.eid),
    ins AS (
        INSERT INTO rtes_events (execution_id, seq, node_id, lineage_key, digest, msg)
        SELECT n.eid, n.s, n.node, n.key, n.digest, n.msg FROM numbered n)
    SELECT n.ord, n.s FROM numbered n;
END $$;
