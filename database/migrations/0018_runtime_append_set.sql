-- Appends at less PostgreSQL CPU (issue 14's bars; measured with backend
-- CPU per append, pgbench -M prepared, synchronous_commit off, on the
-- loaded 2-core machine: see docs/runtime.md):
--
-- * runs.projection_hash is no longer stored: it is a pure function of
--   (id, status, projected_seq, event_count), all stored in the same row by
--   the same UPDATE, so the summary route computes it when read. Computing
--   the SHA-256 over format()ed JSON on every append cost more than the
--   rest of the run row's UPDATE.
-- * The foreign key from run_events to runs goes: its check (a KEY SHARE
--   lock and index probe of the run row per event) repeats what every
--   writer of run_events already did in the same transaction, locking and
--   updating that very run row, and runs are never deleted.
-- * runtime.append_run_events_set: the common append (no
--   expected_previous_seq, not a state-machine type) of many runs in one
--   transaction as a few set-based statements instead of one PL/pgSQL call
--   per append (0017's append_run_events loops).

ALTER TABLE runtime.run_events DROP CONSTRAINT run_events_run_id_fkey;

CREATE OR REPLACE FUNCTION runtime.append_run_event(p_run uuid, p_type text, p_payload jsonb, p_key text, p_expected bigint)
RETURNS TABLE (outcome text, seq bigint, status text, message text, worker_id text, metadata text,
               created_at text, updated_at text)
LANGUAGE plpgsql AS $$
DECLARE
    r_status text;
    r_last bigint;
    r_proj bigint;
    r_count bigint;
    r_worker text;
    r_meta jsonb;
    r_created timestamptz;
    r_updated timestamptz;
    nxt text;
    fin text;
    why text;
    s bigint;
    at timestamptz := now();
    ok boolean;
    note text;
BEGIN
    SELECT x.status, x.last_seq, x.projected_seq, x.event_count, x.worker_id, x.metadata, x.created_at, x.updated_at
    INTO r_status, r_last, r_proj, r_count, r_worker, r_meta, r_created, r_updated
    FROM runtime.runs x WHERE x.id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'not_found'; seq := 0; message := 'run not found';
        RETURN NEXT;
        RETURN;
    END IF;
    worker_id := r_worker; metadata := r_meta::text; created_at := runtime.ts(r_created);
    nxt := r_status;
    IF p_expected IS NOT NULL OR p_type IN ('run.started', 'run.cancel_requested', 'run.finished') THEN
        IF p_key IS NOT NULL AND EXISTS (SELECT 1 FROM runtime.run_events e WHERE e.run_id = p_run AND e.idempotency_key = p_key) THEN
            outcome := 'replayed'; seq := r_last; status := r_status; updated_at := runtime.ts(r_updated);
            RETURN NEXT;
            RETURN;
        END IF;
        IF p_expected IS NOT NULL AND p_expected <> r_last THEN
            outcome := 'conflict'; seq := r_last; status := r_status; updated_at := runtime.ts(r_updated);
            message := format('expected_previous_seq %s does not match the run''s last seq %s', p_expected, r_last);
            RETURN NEXT;
            RETURN;
        END IF;
        IF p_type = 'run.started' THEN
            IF r_status NOT IN ('created', 'running') THEN
                why := format('invalid run transition: %s -> run.started', r_status);
            END IF;
            nxt := 'running';
        ELSIF p_type = 'run.cancel_requested' THEN
            IF r_status NOT IN ('created', 'running', 'canceling') THEN
                why := format('invalid run transition: %s -> run.cancel_requested', r_status);
            END IF;
            nxt := 'canceling';
        ELSIF p_type = 'run.finished' THEN
            fin := replace(p_payload ->> 'status', 'cancelled', 'canceled');
            IF jsonb_typeof(p_payload -> 'status') IS DISTINCT FROM 'string' THEN
                why := 'run.finished requires payload.status';
            ELSIF fin NOT IN ('succeeded', 'failed', 'canceled') THEN
                why := format('invalid run.finished payload.status: %s', p_payload ->> 'status');
            ELSIF NOT (r_status IN ('created', 'running') OR (r_status = 'canceling' AND fin IN ('canceled', 'failed'))
                       OR r_status = fin) THEN
                why := format('invalid run transition: %s -> %s', r_status, fin);
            END IF;
            nxt := fin;
        END IF;
        IF why IS NOT NULL THEN
            outcome := 'invalid'; seq := r_last; status := r_status; updated_at := runtime.ts(r_updated);
            message := why;
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    s := r_last + 1;
    INSERT INTO runtime.run_events (run_id, seq, event_type, payload, idempotency_key, recorded_at)
    VALUES (p_run, s, p_type, p_payload, p_key, at)
    ON CONFLICT (run_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    IF NOT FOUND THEN
        outcome := 'replayed'; seq := r_last; status := r_status; updated_at := runtime.ts(r_updated);
        RETURN NEXT;
        RETURN;
    END IF;
    IF s <> r_proj + 1 THEN
        PERFORM runtime.record_drift('run:' || p_run || ':events', r_proj, s);
    END IF;
    UPDATE runtime.runs x SET status = nxt, last_seq = s, updated_at = at, event_count = r_count + 1,
        projected_seq = s, projected_event_type = p_type, projected_at = at
    WHERE x.id = p_run;
    IF EXISTS (SELECT 1 FROM runtime.khala_listeners l WHERE l.topic = 'run:' || p_run || ':events') THEN
        PERFORM runtime.khala_notify('run:' || p_run || ':events', s, p_type, p_payload, at);
    END IF;
    outcome := 'appended'; seq := s; status := nxt; updated_at := runtime.ts(at);
    RETURN NEXT;
END $$;

CREATE OR REPLACE FUNCTION runtime.create_run(p_id uuid, p_worker text, p_metadata jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := now();
BEGIN
    INSERT INTO runtime.runs (id, worker_id, status, metadata, last_seq, event_count, projected_seq,
                              projected_event_type, projected_at, created_at, updated_at)
    VALUES (p_id, p_worker, 'running', p_metadata, 1, 1, 1, 'run.started', at, at, at);
    INSERT INTO runtime.run_events (run_id, seq, event_type, payload, recorded_at)
    VALUES (p_id, 1, 'run.started', '{"source":"runtime"}', at);
END $$;

ALTER TABLE runtime.runs DROP COLUMN projection_hash;

-- The common appends of a group: p is a JSON array of {"o": ordinal, "r":
-- run id, "t": event type, "p": payload, "k": key or absent}, none with an
-- expected_previous_seq or a state-machine event type, no two with the same
-- run and key (the caller sends those through append_run_events). The runs
-- are locked first, in id order (so that two groups never deadlock), then,
-- with a snapshot taken after the locks (READ COMMITTED: each statement of
-- the function takes its own), each run's appends whose key is new get the
-- run's next sequences in their order, the run row moves by their count in
-- one UPDATE, and the events go in by one INSERT. One row per element:
-- outcome appended (seq its sequence), replayed (seq the run's last),
-- not_found, or retry when the run's projector is behind its log (the
-- caller then appends it with append_run_event, which records the drift).
CREATE FUNCTION runtime.append_run_events_set(p jsonb)
RETURNS TABLE (ord int, outcome text, seq bigint, status text, message text, worker_id text, metadata text,
               created_at text, updated_at text)
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := now();
BEGIN
    PERFORM 1 FROM runtime.runs x
    WHERE x.id IN (SELECT (e ->> 'r')::uuid FROM jsonb_array_elements(p) e) ORDER BY x.id FOR UPDATE;
    RETURN QUERY
    WITH a AS (
        SELECT v.o, v.r, v.t, v.p, v.k FROM jsonb_to_recordset(p) AS v(o int, r uuid, t text, p jsonb, k text)
    ), fresh AS (
        SELECT a.*, row_number() OVER (PARTITION BY a.r ORDER BY a.o) AS i, count(*) OVER (PARTITION BY a.r) AS c
        -- A probe of the key index per append (LATERAL ... LIMIT 1): as a
        -- NOT EXISTS the planner, guessing 100 rows from jsonb_to_recordset,
        -- hashed the whole run_events table instead.
        FROM a LEFT JOIN LATERAL (SELECT 1 AS hit FROM runtime.run_events e
                                  WHERE e.run_id = a.r AND e.idempotency_key = a.k LIMIT 1) h ON true
        WHERE h.hit IS NULL
    ), per_run AS (
        SELECT DISTINCT ON (f.r) f.r, f.c, f.t FROM fresh f ORDER BY f.r, f.i DESC
    ), u AS (
        UPDATE runtime.runs x SET last_seq = x.last_seq + m.c, event_count = x.event_count + m.c, updated_at = at,
            projected_seq = x.last_seq + m.c, projected_event_type = m.t, projected_at = at
        FROM per_run m
        WHERE x.id = m.r AND x.last_seq = x.projected_seq
        RETURNING x.id, x.last_seq AS last, m.c
    ), ins AS (
        INSERT INTO runtime.run_events (run_id, seq, event_type, payload, idempotency_key, recorded_at)
        SELECT f.r, u.last - u.c + f.i, f.t, f.p, f.k, at FROM fresh f JOIN u ON u.id = f.r
        RETURNING run_id, run_events.seq AS s, event_type, payload
    ), note AS (
        -- In sequence order, so that a subscriber gets each message as the
        -- next one and needs no read of the log.
        SELECT count(q.v) AS sent FROM (
            SELECT runtime.khala_notify('run:' || n.run_id || ':events', n.s, n.event_type, n.payload, at) AS v
            FROM (SELECT * FROM ins ORDER BY ins.run_id, ins.s) n
            WHERE EXISTS (SELECT 1 FROM runtime.khala_listeners l WHERE l.topic = 'run:' || n.run_id || ':events')) q
    )
    SELECT a.o,
           CASE WHEN x.id IS NULL THEN 'not_found' WHEN f.o IS NULL THEN 'replayed' WHEN u.id IS NULL THEN 'retry'
                ELSE 'appended' END,
           CASE WHEN x.id IS NULL THEN 0::bigint WHEN u.id IS NULL THEN x.last_seq WHEN f.o IS NULL THEN u.last
                ELSE u.last - u.c + f.i END,
           x.status, NULL::text, x.worker_id, x.metadata::text, runtime.ts(x.created_at),
           runtime.ts(CASE WHEN u.id IS NULL THEN x.updated_at ELSE at END)
    FROM a LEFT JOIN fresh f ON f.o = a.o LEFT JOIN u ON u.id = a.r
         LEFT JOIN runtime.runs x ON x.id = a.r
         CROSS JOIN note
    ORDER BY a.o;
END $$;
