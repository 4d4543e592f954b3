-- A completion is applied to its execution row by the upsert that takes
-- the burst's seqs (see docs/realtime.md): 0011 updated the row a second
-- time with rtes_put_completion, one more statement and one more row
-- version per completion. The upsert now writes the execution's last fresh
-- completion of the burst (by arrival order, as the separate updates did:
-- the last one won) with its seqs, in the same row version.
--
-- A redelivered completion (its digest already stored) is not applied
-- again: the transaction that stored its event applied it, so only
-- finished_at and updated_at would have moved.
CREATE OR REPLACE FUNCTION rtes_put_events(p_eid text[], p_wid text[], p_node text[], p_key text[],
                                           p_digest bytea[], p_msg json[])
RETURNS TABLE (ord bigint, seq bigint) LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH inp AS (
        SELECT * FROM unnest(p_eid, p_wid, p_node, p_key, p_digest, p_msg) WITH ORDINALITY
                 AS t(eid, wid, node, key, digest, msg, ord)),
    fresh AS (
        SELECT DISTINCT ON (i.eid, i.digest) i.* FROM inp i
         WHERE NOT EXISTS (SELECT 1 FROM rtes_events e WHERE e.execution_id = i.eid AND e.digest = i.digest)
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

DROP FUNCTION rtes_put_completion(text, json);
