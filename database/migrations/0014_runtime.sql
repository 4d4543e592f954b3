-- The runtime's authority (SPEC 6): runs and their append-only event log,
-- workers and their lifecycle log, the projections that follow from them and
-- the Khala sync stream, all in schema runtime. Every write is one
-- transaction: the append, its projections and its Khala message commit
-- together or not at all.

CREATE SCHEMA IF NOT EXISTS runtime;

-- One text format for every timestamp the runtime answers with (RFC 3339,
-- UTC, microseconds), so a receipt hashed twice hashes the same text.
CREATE FUNCTION runtime.ts(t timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

CREATE TABLE runtime.runs (
    id uuid PRIMARY KEY,
    worker_id text,
    status text NOT NULL
        CHECK (status IN ('created', 'running', 'canceling', 'succeeded', 'failed', 'canceled')),
    metadata jsonb,
    last_seq bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE runtime.run_events (
    run_id uuid NOT NULL REFERENCES runtime.runs (id),
    seq bigint NOT NULL CHECK (seq > 0),
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    idempotency_key text,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
CREATE UNIQUE INDEX run_events_idempotency ON runtime.run_events (run_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE runtime.workers (
    worker_id text PRIMARY KEY,
    owner_user_id bigint,
    owner_guest_scope text,
    workspace_ref text,
    codex_home_ref text,
    adapter text NOT NULL,
    status text NOT NULL CHECK (status IN ('starting', 'running', 'stopping', 'stopped', 'failed')),
    latest_seq bigint NOT NULL DEFAULT 0,
    metadata jsonb NOT NULL DEFAULT '{}',
    started_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz,
    last_heartbeat_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((owner_user_id IS NULL) <> (owner_guest_scope IS NULL))
);
CREATE INDEX workers_owner_user ON runtime.workers (owner_user_id) WHERE owner_user_id IS NOT NULL;
CREATE INDEX workers_owner_guest ON runtime.workers (owner_guest_scope) WHERE owner_guest_scope IS NOT NULL;

CREATE TABLE runtime.worker_events (
    worker_id text NOT NULL REFERENCES runtime.workers (worker_id),
    seq bigint NOT NULL CHECK (seq > 0),
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (worker_id, seq)
);

-- Projections (the original's projector, kept in the same transaction).
-- projection_hash is sha256 over the canonical JSON of {event_count,
-- last_seq, run_id, status}.
CREATE TABLE runtime.run_summaries (
    run_id uuid PRIMARY KEY,
    status text NOT NULL,
    last_seq bigint NOT NULL,
    event_count bigint NOT NULL,
    projection_hash text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE runtime.projection_checkpoints (
    topic text PRIMARY KEY,
    last_seq bigint NOT NULL,
    last_event_type text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE runtime.projection_drift (
    topic text PRIMARY KEY,
    expected_next_seq bigint NOT NULL,
    last_seen_seq bigint NOT NULL,
    incoming_seq bigint NOT NULL,
    reason text NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now()
);

-- Khala. The topic row is the per-topic counter: a writer increments it
-- inside its transaction and holds the row lock until it commits, so the
-- next writer to the topic gets N+1 only after N is committed. A reader
-- therefore never sees N+1 without N. floor_seq is the retention floor
-- (messages up to it were pruned; oldest_available_cursor).
CREATE TABLE runtime.khala_topics (
    topic text PRIMARY KEY,
    head_seq bigint NOT NULL,
    floor_seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE runtime.khala_messages (
    topic text NOT NULL,
    seq bigint NOT NULL,
    kind text NOT NULL,
    payload jsonb NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, seq)
);

-- Topics some runtime instance holds WebSocket subscribers for. A write
-- sends NOTIFY only for these: NOTIFY takes a database-wide lock at commit
-- that would otherwise serialise every writer's commit.
CREATE TABLE runtime.khala_listeners (
    topic text NOT NULL,
    instance text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, instance)
);

-- Publishes one message on `t`: the next sequence of the topic, the stored
-- message, retention pruning (runtime.khala_retention_messages, set by the
-- writing transaction; 0 or unset keeps everything) and the NOTIFY that
-- wakes subscribers. Returns the sequence.
CREATE FUNCTION runtime.khala_publish(t text, k text, p jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    h bigint;
    f bigint;
    keep bigint := coalesce(nullif(current_setting('runtime.khala_retention_messages', true), ''), '0')::bigint;
    at timestamptz := now();
    note text;
BEGIN
    INSERT INTO runtime.khala_topics AS kt (topic, head_seq) VALUES (t, 1)
    ON CONFLICT (topic) DO UPDATE SET head_seq = kt.head_seq + 1, updated_at = at
    RETURNING kt.head_seq, kt.floor_seq INTO h, f;
    INSERT INTO runtime.khala_messages (topic, seq, kind, payload, published_at) VALUES (t, h, k, p, at);
    -- Pruning in steps of an eighth of the window keeps the DELETE rare.
    IF keep > 0 AND h - f >= keep + greatest(keep / 8, 1) THEN
        DELETE FROM runtime.khala_messages WHERE topic = t AND seq <= h - keep;
        UPDATE runtime.khala_topics SET floor_seq = h - keep WHERE topic = t;
    END IF;
    IF EXISTS (SELECT 1 FROM runtime.khala_listeners WHERE topic = t) THEN
        note := json_build_object('topic', t, 'sequence', h, 'kind', k, 'payload', p,
                                  'published_at', runtime.ts(at))::text;
        IF octet_length(note) > 7900 THEN
            note := json_build_object('topic', t, 'sequence', h)::text;
        END IF;
        PERFORM pg_notify('runtime_khala', note);
    END IF;
    RETURN h;
END $$;

-- Checkpoint and drift of a topic for an incoming sequence. Returns false
-- when the sequence was already seen (nothing to apply).
CREATE FUNCTION runtime.project_checkpoint(t text, incoming bigint, etype text) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    last bigint;
BEGIN
    SELECT last_seq INTO last FROM runtime.projection_checkpoints WHERE topic = t FOR UPDATE;
    IF FOUND AND incoming <= last THEN
        RETURN false;
    END IF;
    last := coalesce(last, 0);
    IF incoming > last + 1 THEN
        INSERT INTO runtime.projection_drift AS d (topic, expected_next_seq, last_seen_seq, incoming_seq, reason)
        VALUES (t, last + 1, last, incoming, 'sequence_gap')
        ON CONFLICT (topic) DO UPDATE SET expected_next_seq = excluded.expected_next_seq,
            last_seen_seq = excluded.last_seen_seq, incoming_seq = excluded.incoming_seq,
            reason = excluded.reason, detected_at = now();
    END IF;
    INSERT INTO runtime.projection_checkpoints AS c (topic, last_seq, last_event_type) VALUES (t, incoming, etype)
    ON CONFLICT (topic) DO UPDATE SET last_seq = excluded.last_seq, last_event_type = excluded.last_event_type,
        updated_at = now();
    RETURN true;
END $$;

-- Every row of the run log, however it got there, goes through the
-- projector and onto the run's Khala topic in the inserting transaction.
CREATE FUNCTION runtime.on_run_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    t text := 'run:' || NEW.run_id || ':events';
    st text;
    n bigint;
BEGIN
    IF runtime.project_checkpoint(t, NEW.seq, NEW.event_type) THEN
        SELECT status, event_count INTO st, n FROM runtime.run_summaries WHERE run_id = NEW.run_id FOR UPDATE;
        st := coalesce(st, 'created');
        n := coalesce(n, 0) + 1;
        IF NEW.event_type = 'run.started' THEN
            st := 'running';
        ELSIF NEW.event_type = 'run.cancel_requested' THEN
            st := 'canceling';
        ELSIF NEW.event_type = 'run.finished' AND jsonb_typeof(NEW.payload -> 'status') = 'string' THEN
            st := NEW.payload ->> 'status';
            IF st = 'cancelled' THEN
                st := 'canceled';
            END IF;
        END IF;
        INSERT INTO runtime.run_summaries AS s (run_id, status, last_seq, event_count, projection_hash)
        VALUES (NEW.run_id, st, NEW.seq, n,
                'sha256:' || encode(sha256(convert_to(format('{"event_count":%s,"last_seq":%s,"run_id":%s,"status":%s}',
                    n, NEW.seq, to_json(NEW.run_id::text), to_json(st)), 'UTF8')), 'hex'))
        ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, last_seq = excluded.last_seq,
            event_count = excluded.event_count, projection_hash = excluded.projection_hash, updated_at = now();
    END IF;
    PERFORM runtime.khala_publish(t, NEW.event_type, NEW.payload);
    RETURN NULL;
END $$;

CREATE TRIGGER run_events_project AFTER INSERT ON runtime.run_events
    FOR EACH ROW EXECUTE FUNCTION runtime.on_run_event();

CREATE FUNCTION runtime.on_worker_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM runtime.project_checkpoint('worker:' || NEW.worker_id || ':lifecycle', NEW.seq, NEW.event_type);
    RETURN NULL;
END $$;

CREATE TRIGGER worker_events_project AFTER INSERT ON runtime.worker_events
    FOR EACH ROW EXECUTE FUNCTION runtime.on_worker_event();

-- One append to a run's log, in one round trip: the run row is locked (which
-- orders every writer of the run), then the idempotency key, the expected
-- previous sequence and the state machine of SPEC 6 are checked in that
-- order. outcome is appended, replayed (the key was seen: nothing appended),
-- not_found, conflict (message holds the current last seq) or invalid
-- (message says why).
CREATE FUNCTION runtime.append_run_event(p_run uuid, p_type text, p_payload jsonb, p_key text,
                                         p_expected bigint, p_retention bigint)
RETURNS TABLE (outcome text, seq bigint, status text, message text)
LANGUAGE plpgsql AS $$
DECLARE
    cur text;
    last bigint;
    nxt text;
    fin text;
    s bigint;
BEGIN
    SELECT r.status, r.last_seq INTO cur, last FROM runtime.runs r WHERE r.id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found'::text, 0::bigint, NULL::text, 'run not found'::text;
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT e.seq INTO s FROM runtime.run_events e WHERE e.run_id = p_run AND e.idempotency_key = p_key;
        IF FOUND THEN
            RETURN QUERY SELECT 'replayed'::text, s, cur, NULL::text;
            RETURN;
        END IF;
    END IF;
    IF p_expected IS NOT NULL AND p_expected <> last THEN
        RETURN QUERY SELECT 'conflict'::text, last, cur,
            format('expected_previous_seq %s does not match the run''s last seq %s', p_expected, last);
        RETURN;
    END IF;
    nxt := cur;
    IF p_type = 'run.started' THEN
        IF cur NOT IN ('created', 'running') THEN
            RETURN QUERY SELECT 'invalid'::text, last, cur, format('invalid run transition: %s -> run.started', cur);
            RETURN;
        END IF;
        nxt := 'running';
    ELSIF p_type = 'run.cancel_requested' THEN
        IF cur NOT IN ('created', 'running', 'canceling') THEN
            RETURN QUERY SELECT 'invalid'::text, last, cur,
                format('invalid run transition: %s -> run.cancel_requested', cur);
            RETURN;
        END IF;
        nxt := 'canceling';
    ELSIF p_type = 'run.finished' THEN
        IF jsonb_typeof(p_payload -> 'status') IS DISTINCT FROM 'string' THEN
            RETURN QUERY SELECT 'invalid'::text, last, cur, 'run.finished requires payload.status'::text;
            RETURN;
        END IF;
        fin := p_payload ->> 'status';
        IF fin = 'cancelled' THEN
            fin := 'canceled';
        END IF;
        IF fin NOT IN ('succeeded', 'failed', 'canceled') THEN
            RETURN QUERY SELECT 'invalid'::text, last, cur,
                format('invalid run.finished payload.status: %s', p_payload ->> 'status');
            RETURN;
        END IF;
        IF NOT (cur IN ('created', 'running') OR (cur = 'canceling' AND fin IN ('canceled', 'failed'))
                OR cur = fin) THEN
            RETURN QUERY SELECT 'invalid'::text, last, cur, format('invalid run transition: %s -> %s', cur, fin);
            RETURN;
        END IF;
        nxt := fin;
    END IF;
    PERFORM set_config('runtime.khala_retention_messages', p_retention::text, true);
    s := last + 1;
    INSERT INTO runtime.run_events (run_id, seq, event_type, payload, idempotency_key)
    VALUES (p_run, s, p_type, p_payload, p_key);
    UPDATE runtime.runs SET status = nxt, last_seq = s, updated_at = now() WHERE id = p_run;
    RETURN QUERY SELECT 'appended'::text, s, nxt, NULL::text;
END $$;

-- A new run and its run.started at seq 1 (so a new run is running), in one
-- transaction and one round trip.
CREATE FUNCTION runtime.create_run(p_id uuid, p_worker text, p_metadata jsonb, p_retention bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('runtime.khala_retention_messages', p_retention::text, true);
    INSERT INTO runtime.runs (id, worker_id, status, metadata, last_seq) VALUES (p_id, p_worker, 'running', p_metadata, 1);
    INSERT INTO runtime.run_events (run_id, seq, event_type, payload) VALUES (p_id, 1, 'run.started', '{"source":"runtime"}');
END $$;

-- Worker liveness as SPEC 6 reports it.
CREATE FUNCTION runtime.heartbeat_state(st text, last_hb timestamptz, stale_ms bigint) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN st IN ('stopped', 'failed') THEN st
                WHEN last_hb IS NULL THEN 'missing'
                WHEN (extract(epoch FROM now() - last_hb) * 1000) > stale_ms THEN 'stale'
                ELSE 'fresh' END
$$;

CREATE FUNCTION runtime.worker_owner_matches(w runtime.workers, p_uid bigint, p_guest text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN w.owner_user_id IS NOT NULL OR p_uid IS NOT NULL THEN w.owner_user_id IS NOT DISTINCT FROM p_uid
                ELSE btrim(w.owner_guest_scope) = btrim(p_guest) END
$$;

-- Appends one lifecycle event to a locked worker row `w` (already updated
-- by the caller except for latest_seq) and publishes its Khala message.
CREATE FUNCTION runtime.worker_append(p_id text, p_type text, p_payload jsonb, p_stale_ms bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
BEGIN
    UPDATE runtime.workers SET latest_seq = latest_seq + 1, updated_at = now() WHERE worker_id = p_id
    RETURNING * INTO w;
    INSERT INTO runtime.worker_events (worker_id, seq, event_type, payload) VALUES (p_id, w.latest_seq, p_type, p_payload);
    PERFORM runtime.khala_publish('worker:' || p_id || ':lifecycle', 'worker.' || w.status,
        jsonb_build_object('worker_id', p_id, 'status', w.status, 'latest_seq', w.latest_seq,
                           'heartbeat_state', runtime.heartbeat_state(w.status, w.last_heartbeat_at, p_stale_ms)));
END $$;

-- Registers a worker or reattaches its owner to it. outcome: created,
-- reattached or forbidden (another owner holds the id).
CREATE FUNCTION runtime.worker_register(p_id text, p_uid bigint, p_guest text, p_workspace text, p_home text,
                                        p_adapter text, p_metadata jsonb, p_stale_ms bigint, p_retention bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
    outcome text := 'created';
BEGIN
    PERFORM set_config('runtime.khala_retention_messages', p_retention::text, true);
    INSERT INTO runtime.workers (worker_id, owner_user_id, owner_guest_scope, workspace_ref, codex_home_ref, adapter,
                                 status, metadata, last_heartbeat_at)
    VALUES (p_id, p_uid, CASE WHEN p_uid IS NULL THEN btrim(p_guest) END, p_workspace, p_home, p_adapter, 'running',
            coalesce(p_metadata, '{}'), now())
    ON CONFLICT (worker_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT * INTO w FROM runtime.workers WHERE worker_id = p_id FOR UPDATE;
        IF NOT runtime.worker_owner_matches(w, p_uid, p_guest) THEN
            RETURN 'forbidden';
        END IF;
        UPDATE runtime.workers SET workspace_ref = p_workspace, codex_home_ref = p_home, adapter = p_adapter,
            metadata = CASE WHEN jsonb_typeof(metadata) = 'object' AND jsonb_typeof(p_metadata) = 'object'
                            THEN metadata || p_metadata ELSE metadata END,
            status = CASE WHEN status IN ('stopped', 'failed') THEN 'running' ELSE status END,
            stopped_at = CASE WHEN status IN ('stopped', 'failed') THEN NULL ELSE stopped_at END
        WHERE worker_id = p_id;
        outcome := 'reattached';
    END IF;
    PERFORM runtime.worker_append(p_id, 'worker.started', '{"status":"running","reason":"register"}', p_stale_ms);
    RETURN outcome;
END $$;

-- outcome: ok, not_found or forbidden.
CREATE FUNCTION runtime.worker_heartbeat(p_id text, p_uid bigint, p_guest text, p_patch jsonb, p_stale_ms bigint,
                                         p_retention bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
BEGIN
    PERFORM set_config('runtime.khala_retention_messages', p_retention::text, true);
    SELECT * INTO w FROM runtime.workers WHERE worker_id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF NOT runtime.worker_owner_matches(w, p_uid, p_guest) THEN
        RETURN 'forbidden';
    END IF;
    UPDATE runtime.workers SET last_heartbeat_at = now(),
        metadata = CASE WHEN jsonb_typeof(metadata) = 'object' AND jsonb_typeof(p_patch) = 'object'
                        THEN metadata || p_patch ELSE metadata END
    WHERE worker_id = p_id;
    PERFORM runtime.worker_append(p_id, 'worker.heartbeat', jsonb_build_object('status', w.status), p_stale_ms);
    RETURN 'ok';
END $$;

-- The worker state machine of the original. outcome: ok, not_found,
-- forbidden or invalid.
CREATE FUNCTION runtime.worker_transition(p_id text, p_uid bigint, p_guest text, p_status text, p_reason text,
                                          p_stale_ms bigint, p_retention bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    w runtime.workers%ROWTYPE;
BEGIN
    PERFORM set_config('runtime.khala_retention_messages', p_retention::text, true);
    SELECT * INTO w FROM runtime.workers WHERE worker_id = p_id FOR UPDATE;
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
    UPDATE runtime.workers SET status = p_status,
        stopped_at = CASE WHEN p_status IN ('stopped', 'failed') THEN now() END,
        last_heartbeat_at = CASE WHEN p_status IN ('stopped', 'failed') THEN now() ELSE last_heartbeat_at END
    WHERE worker_id = p_id;
    PERFORM runtime.worker_append(p_id, 'worker.' || p_status,
        jsonb_build_object('status', p_status, 'reason', coalesce(p_reason, 'status_transition')), p_stale_ms);
    RETURN 'ok';
END $$;
