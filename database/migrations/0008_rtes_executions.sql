-- Workflow execution history for the realtime program's RTES part (SPEC 5b;
-- see docs/realtime.md).
--
-- rtes_executions: one row per execution, created by whichever message is
-- seen first (a node status may arrive before workflow.worker.initiated).
-- last_seq is the execution's event counter: every stored node status and
-- completion takes the next value under the row's lock, so the order of
-- seq is the commit order of that execution's events, on every instance.
-- A watcher loads the history up to some seq S and then takes live frames
-- above S: nothing is lost or repeated at the seam.
CREATE TABLE rtes_executions (
    execution_id        text PRIMARY KEY,
    workflow_id         text NOT NULL,
    workflow_definition jsonb,
    accumulated_context jsonb,
    current_node        text,
    status              text NOT NULL DEFAULT 'running'
                        CHECK (status IN ('running', 'completed', 'failed', 'halted')),
    final_context       jsonb,
    failure_reason      text,
    total_duration_ms   bigint,
    completed_at        text,            -- as the worker reported it
    finished_at         timestamptz,     -- when the completion was stored
    initiated_at        timestamptz,
    last_seq            bigint NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rtes_executions_workflow ON rtes_executions (workflow_id);

-- rtes_events: every node status and completion, in seq order: the history
-- a watcher replays. digest is the SHA-256 (first 16 bytes) of the message
-- body: a message redelivered after a crash between COMMIT and ack is
-- recognised and stored once.
CREATE TABLE rtes_events (
    execution_id text NOT NULL REFERENCES rtes_executions ON DELETE CASCADE,
    seq          bigint NOT NULL,
    node_id      text,                   -- NULL for the completion
    lineage_key  text,
    digest       bytea NOT NULL,
    msg          jsonb NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (execution_id, seq)
);
CREATE UNIQUE INDEX rtes_events_digest ON rtes_events (execution_id, digest);

-- rtes_node_states: each node's state per lineage (lineage_key is the
-- message's lineage_hash, else a UUIDv5 of its lineage_stack, else
-- 'default'), pointing at the event that holds it. A node's latest state
-- is its row with the highest seq.
CREATE TABLE rtes_node_states (
    execution_id text NOT NULL,
    node_id      text NOT NULL,
    lineage_key  text NOT NULL,
    seq          bigint NOT NULL,
    PRIMARY KEY (execution_id, node_id, lineage_key),
    FOREIGN KEY (execution_id, seq) REFERENCES rtes_events (execution_id, seq) ON DELETE CASCADE
);

-- The WebSocket frame of a stored event: every key of SPEC 5b present, in
-- its order (json_build_object keeps it), null when unknown. output is the
-- JSON text of the node's output, as the original sent it. A completion
-- (no node_id) is {node_id: null, ..., status} with its real status. Live
-- and history frames both come from here, so they are the same bytes.
CREATE FUNCTION rtes_frame(m jsonb, k text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN m ? 'node_id' THEN
        json_build_object(
            'node_id', m->'node_id', 'input', m->'input', 'params', m->'parameters',
            'output', CASE WHEN jsonb_typeof(m->'output') IN ('null') OR m->'output' IS NULL
                           THEN NULL ELSE to_json((m->'output')::text) END,
            'status', m->'status',
            'lineage_hash', CASE WHEN k = 'default' THEN NULL ELSE k END,
            'lineage_stack', m->'lineage_stack', 'split_node_id', m->'split_node_id',
            'branch_id', m->'branch_id', 'item_index', m->'item_index',
            'total_items', m->'total_items', 'processed_count', m->'processed_count',
            'aggregator_state', m->'aggregator_state', 'used_inputs', m->'used_inputs')::text
    ELSE
        json_build_object(
            'node_id', NULL, 'input', NULL, 'params', NULL, 'output', NULL, 'status', m->'status',
            'lineage_hash', NULL, 'lineage_stack', NULL, 'split_node_id', NULL, 'branch_id', NULL,
            'item_index', NULL, 'total_items', NULL, 'processed_count', NULL,
            'aggregator_state', NULL, 'used_inputs', NULL)::text
    END
$$;

-- Stores one event. Returns its seq and frame, or NULLs when a message with the same
-- digest is already stored for the execution (a redelivery). The row lock
-- taken first serializes the execution's writers, so the duplicate check
-- sees every earlier commit; the unique index backs it up.
CREATE FUNCTION rtes_put_event(p_eid text, p_wid text, p_node text, p_key text,
                               p_digest bytea, p_msg jsonb, OUT o_seq bigint, OUT o_frame text)
LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
BEGIN
    INSERT INTO rtes_executions (execution_id, workflow_id) VALUES (p_eid, p_wid)
        ON CONFLICT (execution_id) DO NOTHING;
    SELECT last_seq INTO s FROM rtes_executions WHERE execution_id = p_eid FOR UPDATE;
    IF EXISTS (SELECT 1 FROM rtes_events WHERE execution_id = p_eid AND digest = p_digest) THEN
        RETURN;
    END IF;
    s := s + 1;
    INSERT INTO rtes_events (execution_id, seq, node_id, lineage_key, digest, msg)
        VALUES (p_eid, s, p_node, p_key, p_digest, p_msg);
    IF p_node IS NOT NULL THEN
        INSERT INTO rtes_node_states (execution_id, node_id, lineage_key, seq)
            VALUES (p_eid, p_node, p_key, s)
            ON CONFLICT (execution_id, node_id, lineage_key) DO UPDATE SET seq = EXCLUDED.seq;
        UPDATE rtes_executions SET last_seq = s, updated_at = now() WHERE execution_id = p_eid;
    ELSE
        UPDATE rtes_executions
           SET last_seq = s, updated_at = now(), finished_at = now(),
               status = p_msg->>'status',
               final_context = p_msg->'final_context',
               failure_reason = p_msg->>'failure_reason',
               total_duration_ms = (p_msg->>'total_duration_ms')::numeric::bigint,
               completed_at = p_msg->>'completed_at'
         WHERE execution_id = p_eid;
    END IF;
    o_seq := s;
    o_frame := rtes_frame(p_msg, p_key);
END $$;

-- workflow.worker.initiated: the definition and the context so far. The
-- row may already exist (a status came first); a later initiation (the
-- next node of the same execution) replaces both.
-- Workflow definitions carry each node's credentials for the worker; they
-- are not kept here (GET /executions hands the definition to browsers).
CREATE FUNCTION rtes_redact(d jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE jsonb_typeof(d->'nodes')
    WHEN 'array' THEN jsonb_set(d, '{nodes}', COALESCE((
        SELECT jsonb_agg(CASE WHEN jsonb_typeof(n) = 'object' AND n ? 'credentials'
                              THEN n || '{"credentials": null}' ELSE n END ORDER BY i)
          FROM jsonb_array_elements(d->'nodes') WITH ORDINALITY AS a(n, i)), '[]'))
    WHEN 'object' THEN jsonb_set(d, '{nodes}', COALESCE((
        SELECT jsonb_object_agg(k, CASE WHEN jsonb_typeof(n) = 'object' AND n ? 'credentials'
                                        THEN n || '{"credentials": null}' ELSE n END)
          FROM jsonb_each(d->'nodes') AS b(k, n)), '{}'))
    ELSE d END
$$;

CREATE FUNCTION rtes_put_initiated(p_eid text, p_wid text, p_node text,
                                   p_def jsonb, p_ctx jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO rtes_executions (execution_id, workflow_id, current_node, workflow_definition,
                                 accumulated_context, initiated_at)
    VALUES (p_eid, p_wid, p_node, rtes_redact(p_def), p_ctx, now())
    ON CONFLICT (execution_id) DO UPDATE
       SET current_node = EXCLUDED.current_node,
           workflow_definition = COALESCE(EXCLUDED.workflow_definition, rtes_executions.workflow_definition),
           accumulated_context = COALESCE(EXCLUDED.accumulated_context, rtes_executions.accumulated_context),
           initiated_at = COALESCE(rtes_executions.initiated_at, EXCLUDED.initiated_at),
           updated_at = now();
$$;

-- One node state as GET /executions/{id} shows it: the stored message
-- without the ids its place already says, with the lineage key.
CREATE FUNCTION rtes_node_state(m jsonb, k text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT (m - 'workflow_id' - 'execution_id' - 'node_id')
           || jsonb_build_object('lineage_hash', CASE WHEN k = 'default' THEN NULL ELSE k END)
$$;

-- GET /executions/{id}: the document of SPEC 5b, or NULL when unknown.
-- nodes.<id>.latest is the node's state with the highest seq; lineages
-- holds the state of each lineage key other than 'default'.
CREATE FUNCTION rtes_execution_doc(p_eid text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'execution_id', e.execution_id, 'workflow_id', e.workflow_id,
        'workflow_definition', e.workflow_definition,
        'accumulated_context', e.accumulated_context,
        'nodes', COALESCE((
            SELECT json_object_agg(n.node_id, json_build_object(
                       'latest', n.latest, 'lineages', COALESCE(n.lineages, '{}'::json)))
              FROM (SELECT s.node_id,
                           (array_agg(rtes_node_state(ev.msg, s.lineage_key) ORDER BY s.seq DESC))[1] AS latest,
                           json_object_agg(s.lineage_key, rtes_node_state(ev.msg, s.lineage_key))
                               FILTER (WHERE s.lineage_key <> 'default') AS lineages
                      FROM rtes_node_states s
                      JOIN rtes_events ev ON ev.execution_id = s.execution_id AND ev.seq = s.seq
                     WHERE s.execution_id = e.execution_id
                     GROUP BY s.node_id) n), '{}'::json),
        'status', e.status,
        'created_at', e.created_at, 'updated_at', e.updated_at,
        'completed_at', e.completed_at, 'failure_reason', e.failure_reason,
        'total_duration_ms', e.total_duration_ms)::text
      FROM rtes_executions e WHERE e.execution_id = p_eid
$$;
