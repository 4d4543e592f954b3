-- The runtime's append in fewer writes (0014 made one append cost ten
-- statements: the event, the run, a summary row, a checkpoint row, a topic
-- counter row, a copy of the event as a Khala message...).
--
-- * A Khala message is its log row: the run topic's message N is run event
--   N (kind = event_type, sequence = seq, published_at = recorded_at), a
--   worker topic's message N is worker event N (kind and message payload
--   stored with it). The run row (the worker row) is the per-topic counter:
--   every writer of the topic locks it, so sequence N+1 is only taken once
--   N is committed, and a reader never sees N+1 without N. No copy of any
--   payload is written twice.
-- * The retention floor is a window over the log: the last
--   RUNTIME_KHALA_RETENTION_MESSAGES sequences of a topic can be resumed
--   from (oldest_available_cursor = head - window); the log itself is the
--   authority's and is never pruned for the sync stream's sake.
-- * The run summary and the run's checkpoint are columns of the run row,
--   written by the same UPDATE as its status. projected_seq is what the
--   projector last applied; an append whose seq is not projected_seq + 1
--   (the log's sequence jumped) is recorded as drift.

DROP TRIGGER run_events_project ON runtime.run_events;
DROP TRIGGER worker_events_project ON runtime.worker_events;
DROP FUNCTION runtime.on_run_event();
DROP FUNCTION runtime.on_worker_event();
DROP FUNCTION runtime.append_run_event(uuid, text, jsonb, text, bigint, bigint);
DROP FUNCTION runtime.create_run(uuid, text, jsonb, bigint);
DROP FUNCTION runtime.worker_register(text, bigint, text, text, text, text, jsonb, bigint, bigint);
DROP FUNCTION runtime.worker_heartbeat(text, bigint, text, jsonb, bigint, bigint);
DROP FUNCTION runtime.worker_transition(text, bigint, text, text, text, bigint, bigint);
DROP FUNCTION runtime.worker_append(text, text, jsonb, bigint);

ALTER TABLE runtime.runs
    ADD COLUMN event_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN projection_hash text,
    ADD COLUMN projected_seq bigint NOT NULL DEFAULT 0,
    ADD COLUMN projected_event_type text,
    ADD COLUMN projected_at timestamptz;
UPDATE runtime.runs r SET event_count = s.event_count, projection_hash = s.projection_hash,
    projected_seq = s.last_seq, projected_at = s.updated_at
FROM runtime.run_summaries s WHERE s.run_id = r.id;
UPDATE runtime.runs r SET projected_event_type = c.last_event_type
FROM runtime.projection_checkpoints c WHERE c.topic = 'run:' || r.id || ':events';

ALTER TABLE runtime.workers
    ADD COLUMN last_event_type text,
    ADD COLUMN last_event_at timestamptz;
ALTER TABLE runtime.worker_events
    ADD COLUMN kind text,
    ADD COLUMN message jsonb;
UPDATE runtime.worker_events e SET kind = m.kind, message = m.payload
FROM runtime.khala_messages m WHERE m.topic = 'worker:' || e.worker_id || ':lifecycle' AND m.seq = e.seq;
UPDATE runtime.worker_events SET kind = 'worker.unknown', message = '{}' WHERE kind IS NULL;
ALTER TABLE runtime.worker_events ALTER COLUMN kind SET NOT NULL, ALTER COLUMN message SET NOT NULL;
UPDATE runtime.workers w SET last_event_type = e.event_type, last_event_at = e.occurred_at
FROM runtime.worker_events e WHERE e.worker_id = w.worker_id AND e.seq = w.latest_seq;

DROP FUNCTION runtime.khala_publish(text, text, jsonb);
DROP FUNCTION runtime.project_checkpoint(text, bigint, text);
DROP TABLE runtime.run_summaries, runtime.projection_checkpoints, runtime.khala_topics, runtime.khala_messages;

CREATE FUNCTION runtime.summary_hash(r uuid, st text, s bigint, n bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'sha256:' || encode(sha256(convert_to(format('{"event_count":%s,"last_seq":%s,"run_id":%s,"status":%s}',
        n, s, to_json(r::text), to_json(st)), 'UTF8')), 'hex')
$$;

-- Wakes the subscribers of topic `t` (only when some instance holds one:
-- NOTIFY takes a database-wide lock at commit that would otherwise order
-- every writer's commit). The payload carries the message when it fits.
CREATE FUNCTION runtime.khala_notify(t text, s bigint, k text, p jsonb, at timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    note text;
BEGIN
    IF EXISTS (SELECT 1 FROM runtime.khala_listeners WHERE topic = t) THEN
        note := json_build_object('topic', t, 'sequence', s, 'kind', k, 'payload', p, 'published_at', runtime.ts(at))::text;
        IF octet_length(note) > 7900 THEN
            note := json_build_object('topic', t, 'sequence', s)::text;
        END IF;
        PERFORM pg_notify('runtime_khala', note);
    END IF;
END $$;

-- Records a gap the projector saw on topic t.
CREATE FUNCTION runtime.record_drift(t text, last bigint, incoming bigint) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO runtime.projection_drift AS d (topic, expected_next_seq, last_seen_seq, incoming_seq, reason)
    VALUES (t, last + 1, last, incoming, 'sequence_gap')
    ON CONFLICT (topic) DO UPDATE SET expected_next_seq = excluded.expected_next_seq,
        last_seen_seq = excluded.last_seen_seq, incoming_seq = excluded.incoming_seq, reason = excluded.reason,
        detected_at = now()
$$;

-- One append to a run's log, in one round trip: the run row is locked (which
-- orders every writer of the run), then the idempotency key, the expected
-- previous sequence and the state machine of SPEC 6 are checked in that
-- order. outcome is appended, replayed (the key was seen: nothing appended),
-- not_found, conflict or invalid (message says why); the other columns are
-- the run after the call (seq its last seq), so that an answer without the
-- events needs no second round trip.
CREATE FUNCTION runtime.append_run_event(p_run uuid, p_type text, p_payload jsonb, p_key text, p_expected bigint)
RETURNS TABLE (outcome text, seq bigint, status text, message text, worker_id text, metadata text,
               created_at text, updated_at text)
LANGUAGE plpgsql AS $$
DECLARE
    r runtime.runs%ROWTYPE;
    nxt text;
    fin text;
    why text;
    s bigint;
    at timestamptz := now();
BEGIN
    SELECT * INTO r FROM runtime.runs x WHERE x.id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, 0::bigint, NULL::text, 'run not found'::text, NULL::text, NULL::text,
            NULL::text, NULL::text;
        RETURN;
    END IF;
    IF p_key IS NOT NULL AND EXISTS (SELECT 1 FROM runtime.run_events e WHERE e.run_id = p_run AND e.idempotency_key = p_key) THEN
        RETURN QUERY SELECT 'replayed'::text, r.last_seq, r.status, NULL::text, r.worker_id, r.metadata::text,
            runtime.ts(r.created_at), runtime.ts(r.updated_at);
        RETURN;
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> r.last_seq THEN
        RETURN QUERY SELECT 'conflict'::text, r.last_seq, r.status,
            format('expected_previous_seq %s does not match the run''s last seq %s', p_expected, r.last_seq),
            r.worker_id, r.metadata::text, runtime.ts(r.created_at), runtime.ts(r.updated_at);
        RETURN;
    END IF;
    nxt := r.status;
    IF p_type = 'run.started' THEN
        IF r.status NOT IN ('created', 'running') THEN
            why := format('invalid run transition: %s -> run.started', r.status);
        END IF;
        nxt := 'running';
    ELSIF p_type = 'run.cancel_requested' THEN
        IF r.status NOT IN ('created', 'running', 'canceling') THEN
            why := format('invalid run transition: %s -> run.cancel_requested', r.status);
        END IF;
        nxt := 'canceling';
    ELSIF p_type = 'run.finished' THEN
        fin := replace(p_payload ->> 'status', 'cancelled', 'canceled');
        IF jsonb_typeof(p_payload -> 'status') IS DISTINCT FROM 'string' THEN
            why := 'run.finished requires payload.status';
        ELSIF fin NOT IN ('succeeded', 'failed', 'canceled') THEN
            why := format('invalid run.finished payload.status: %s', p_payload ->> 'status');
        ELSIF NOT (r.status IN ('created', 'running') OR (r.status = 'canceling' AND fin IN ('canceled', 'failed'))
                   OR r.status = fin) THEN
            why := format('invalid run transition: %s -> %s', r.status, fin);
        END IF;
        nxt := fin;
    END IF;
    IF why IS NOT NULL THEN
        RETURN QUERY SELECT 'invalid'::text, r.last_seq, r.status, why, r.worker_id, r.metadata::text,
            runtime.ts(r.created_at), runtime.ts(r.updated_at);
        RETURN;
    END IF;
    s := r.last_seq + 1;
    INSERT INTO runtime.run_events (run_id, seq, event_type, payload, idempotency_key, recorded_at)
    VALUES (p_run, s, p_type, p_payload, p_key, at);
    IF s <> r.projected_seq + 1 THEN
        PERFORM runtime.record_drift('run:' || p_run || ':events', r.projected_seq, s);
    END IF;
    UPDATE runtime.runs x SET status = nxt, last_seq = s, updated_at = at, event_count = x.event_count + 1,
        projected_seq = s, projected_event_type = p_type, projected_at = at,
        projection_hash = runtime.summary_hash(p_run, nxt, s, x.event_count + 1)
    WHERE x.id = p_run RETURNING * INTO r;
    PERFORM runtime.khala_notify('run:' || p_run || ':events', s, p_type, p_payload, at);
    RETURN QUERY SELECT 'appended'::text, s, nxt, NULL::text, r.worker_id, r.metadata::text, runtime.ts(r.created_at),
        runtime.ts(r.updated_at);
END $$;

-- A new run and its run.started at seq 1 (so a new run is running), in one
-- transaction and one round trip.
CREATE FUNCTION runtime.create_run(p_id uuid, p_worker text, p_metadata jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := now();
BEGIN
    INSERT INTO runtime.runs (id, worker_id, status, metadata, last_seq, event_count, projection_hash, projected_seq,
                              projected_event_type, projected_at, created_at, updated_at)
    VALUES (p_id, p_worker, 'running', p_metadata, 1, 1, runtime.summary_hash(p_id, 'running', 1, 1), 1,
            'run.started', at, at, at);
    INSERT INTO runtime.run_events (run_id, seq, event_type, payload, recorded_at)
    VALUES (p_id, 1, 'run.started', '{"source":"runtime"}', at);
END $$;

-- Appends one lifecycle event to worker p_id (its row locked and updated by
-- the caller except for the sequence) with its Khala message.
CREATE FUNCTION runtime.worker_append(p_id text, p_type text, p_payload jsonb, p_stale_ms bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
    m jsonb;
    at timestamptz := now();
BEGIN
    UPDATE runtime.workers SET latest_seq = latest_seq + 1, updated_at = at, last_event_type = p_type,
        last_event_at = at
    WHERE workers.worker_id = p_id RETURNING * INTO w;
    m := jsonb_build_object('worker_id', p_id, 'status', w.status, 'latest_seq', w.latest_seq,
                            'heartbeat_state', runtime.heartbeat_state(w.status, w.last_heartbeat_at, p_stale_ms));
    INSERT INTO runtime.worker_events (worker_id, seq, event_type, payload, occurred_at, kind, message)
    VALUES (p_id, w.latest_seq, p_type, p_payload, at, 'worker.' || w.status, m);
    PERFORM runtime.khala_notify('worker:' || p_id || ':lifecycle', w.latest_seq, 'worker.' || w.status, m, at);
END $$;

-- Registers a worker or reattaches its owner to it. outcome: created,
-- reattached or forbidden (another owner holds the id).
CREATE FUNCTION runtime.worker_register(p_id text, p_uid bigint, p_guest text, p_workspace text, p_home text,
                                        p_adapter text, p_metadata jsonb, p_stale_ms bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
    outcome text := 'created';
BEGIN
    INSERT INTO runtime.workers (worker_id, owner_user_id, owner_guest_scope, workspace_ref, codex_home_ref, adapter,
                                 status, metadata, last_heartbeat_at)
    VALUES (p_id, p_uid, CASE WHEN p_uid IS NULL THEN btrim(p_guest) END, p_workspace, p_home, p_adapter, 'running',
            coalesce(p_metadata, '{}'), now())
    ON CONFLICT (worker_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO w FROM runtime.workers x WHERE x.worker_id = p_id FOR UPDATE;
        IF NOT runtime.worker_owner_matches(w, p_uid, p_guest) THEN
            RETURN 'forbidden';
        END IF;
        UPDATE runtime.workers x SET workspace_ref = p_workspace, codex_home_ref = p_home, adapter = p_adapter,
            metadata = CASE WHEN jsonb_typeof(x.metadata) = 'object' AND jsonb_typeof(p_metadata) = 'object'
                            THEN x.metadata || p_metadata ELSE x.metadata END,
            status = CASE WHEN x.status IN ('stopped', 'failed') THEN 'running' ELSE x.status END,
            stopped_at = CASE WHEN x.status IN ('stopped', 'failed') THEN NULL ELSE x.stopped_at END
        WHERE x.worker_id = p_id;
        outcome := 'reattached';
    END IF;
    PERFORM runtime.worker_append(p_id, 'worker.started', '{"status":"running","reason":"register"}', p_stale_ms);
    RETURN outcome;
END $$;

-- outcome: ok, not_found or forbidden.
CREATE FUNCTION runtime.worker_heartbeat(p_id text, p_uid bigint, p_guest text, p_patch jsonb, p_stale_ms bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
BEGIN
    SELECT * INTO w FROM runtime.workers x WHERE x.worker_id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF NOT runtime.worker_owner_matches(w, p_uid, p_guest) THEN
        RETURN 'forbidden';
    END IF;
    UPDATE runtime.workers x SET last_heartbeat_at = now(),
        metadata = CASE WHEN jsonb_typeof(x.metadata) = 'object' AND jsonb_typeof(p_patch) = 'object'
                        THEN x.metadata || p_patch ELSE x.metadata END
    WHERE x.worker_id = p_id;
    PERFORM runtime.worker_append(p_id, 'worker.heartbeat', jsonb_build_object('status', w.status), p_stale_ms);
    RETURN 'ok';
END $$;

-- The worker state machine of the original. outcome: ok, not_found,
-- forbidden or invalid.
CREATE FUNCTION runtime.worker_transition(p_id text, p_uid bigint, p_guest text, p_status text, p_reason text,
                                          p_stale_ms bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
BEGIN
    SELECT * INTO w FROM runtime.workers x WHERE x.worker_id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF NOT runtime.worker_owner_matches(w, p_uid, p_guest) THEN
        RETURN 'forbidden';
    END IF;
    IF NOT (w.status = p_status
            OR (w.status = 'starting' AND p_status IN ('running', 'stopping', 'failed'))
            OR (w.status = 'running' AND p_status IN ('stopping', 'stopped', 'failed'))
            OR (w.status = 'stopping' AND p_status IN ('stopped', 'failed'))
            OR (w.status IN ('stopped', 'failed') AND p_status IN ('starting', 'running'))) THEN
        RETURN 'invalid';
    END IF;
    UPDATE runtime.workers x SET status = p_status,
        stopped_at = CASE WHEN p_status IN ('stopped', 'failed') THEN now() END,
        last_heartbeat_at = CASE WHEN p_status IN ('stopped', 'failed') THEN now() ELSE x.last_heartbeat_at END
    WHERE x.worker_id = p_id;
    PERFORM runtime.worker_append(p_id, 'worker.' || p_status,
        jsonb_build_object('status', p_status, 'reason', coalesce(p_reason, 'status_transition')), p_stale_ms);
    RETURN 'ok';
END $$;
