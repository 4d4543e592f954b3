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

-- Stores one event. Returns its seq, or NULL when a message with the same
-- digest is already stored for the execution (a redelivery). The row lock
-- taken first serializes the execution's writers, so the duplicate check
-- sees every earlier commit; the unique index backs it up.
CREATE FUNCTION rtes_put_event(p_eid text, p_wid text, p_node text, p_key text,
                               p_digest bytea, p_msg jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
BEGIN
    INSERT INTO rtes_executions (execution_id, workflow_id) VALUES (p_eid, p_wid)
        ON CONFLICT (execution_id) DO NOTHING;
    SELECT last_seq INTO s FROM rtes_executions WHERE execution_id = p_eid FOR UPDATE;
    IF EXISTS (SELECT 1 FROM rtes_events WHERE execution_id = p_eid AND digest = p_digest) THEN
        RETURN NULL;
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
    RETURN s;
END $$;

-- workflow.worker.initiated: the definition and the context so far. The
-- row may already exist (a status came first); a later initiation (the
-- next node of the same execution) replaces both.
CREATE FUNCTION rtes_put_initiated(p_eid text, p_wid text, p_node text,
                                   p_def jsonb, p_ctx jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO rtes_executions (execution_id, workflow_id, current_node, workflow_definition,
                                 accumulated_context, initiated_at)
    VALUES (p_eid, p_wid, p_node, p_def, p_ctx, now())
    ON CONFLICT (execution_id) DO UPDATE
       SET current_node = EXCLUDED.current_node,
           workflow_definition = COALESCE(EXCLUDED.workflow_definition, rtes_executions.workflow_definition),
           accumulated_context = COALESCE(EXCLUDED.accumulated_context, rtes_executions.accumulated_context),
           initiated_at = COALESCE(rtes_executions.initiated_at, EXCLUDED.initiated_at),
           updated_at = now();
$$;
