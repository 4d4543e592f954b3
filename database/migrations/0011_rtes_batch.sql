-- RTES stores a burst of node statuses and completions in one statement
-- (see docs/realtime.md): rtes_put_event took two statements per message
-- (about 60 us of PostgreSQL CPU each); here a burst costs one upsert per
-- execution and one multi-row insert.
--
-- The arrays are parallel, one element per message, in the order the
-- consumer sorted them (by execution, arrival order kept). A message whose
-- digest is already stored (a redelivery), or repeated within the burst, is
-- skipped and takes no seq. Each execution's row is upserted once, adding
-- the number of its new events to last_seq under the row's lock, and its
-- events are numbered from the old value in arrival order: seqs stay dense
-- and in commit order. Returns (ord, seq) for each stored message, ord being
-- its 1-based position in the arrays. Completions are applied to the
-- execution row by rtes_put_completion afterwards, in the same transaction
-- (a second update of a row in one statement would not see the first).
CREATE FUNCTION rtes_put_events(p_eid text[], p_wid text[], p_node text[], p_key text[], p_digest bytea[],
                                p_msg json[])
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
        SELECT f.eid, min(f.wid) AS wid, count(*) AS n FROM fresh f GROUP BY f.eid),
    up AS (
        INSERT INTO rtes_executions AS x (execution_id, workflow_id, last_seq)
        SELECT c.eid, c.wid, c.n FROM counts c ORDER BY c.eid
        ON CONFLICT (execution_id) DO UPDATE SET last_seq = x.last_seq + EXCLUDED.last_seq, updated_at = now()
        RETURNING x.execution_id, x.last_seq),
    numbered AS (
        SELECT f.*, up.last_seq - c.n + row_number() OVER (PARTITION BY f.eid ORDER BY f.ord) AS s
          FROM fresh f JOIN up ON up.execution_id = f.eid JOIN counts c ON c.eid = f.eid),
    ins AS (
        INSERT INTO rtes_events (execution_id, seq, node_id, lineage_key, digest, msg)
        SELECT n.eid, n.s, n.node, n.key, n.digest, n.msg FROM numbered n)
    SELECT n.ord, n.s FROM numbered n;
END $$;

-- The completion's fields on its execution row (idempotent: a redelivered
-- completion writes the same values).
CREATE FUNCTION rtes_put_completion(p_eid text, p_msg json) RETURNS void
LANGUAGE sql AS $$
    UPDATE rtes_executions
       SET finished_at = now(), updated_at = now(), status = p_msg->>'status',
           final_context = (p_msg->'final_context')::jsonb,
           failure_reason = p_msg->>'failure_reason',
           total_duration_ms = (p_msg->>'total_duration_ms')::numeric::bigint,
           completed_at = p_msg->>'completed_at'
     WHERE execution_id = p_eid;
$$;
