-- Appends committed from the runtime's loop (rtpipe) hand their Khala
-- message straight to this instance's subscribers: the statement returns
-- the message it NOTIFYs, so a local subscriber's frame does not wait for
-- the notification to come back through the LISTEN connection (a further
-- backend wake-up, then the listener's). The NOTIFY still goes out for the
-- other instances, and a subscriber that already has the sequence skips it.

-- khala_notify, returning the message (in full, whatever NOTIFY's size
-- limit), or NULL when no instance listens to the topic.
CREATE FUNCTION runtime.khala_notify_message(t text, s bigint, k text, p jsonb, at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    note text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM runtime.khala_listeners WHERE topic = t) THEN
        RETURN NULL;
    END IF;
    note := json_build_object('topic', t, 'sequence', s, 'kind', k, 'payload', p, 'published_at', runtime.ts(at))::text;
    IF octet_length(note) > 7900 THEN
        PERFORM pg_notify('runtime_khala', json_build_object('topic', t, 'sequence', s)::text);
    ELSE
        PERFORM pg_notify('runtime_khala', note);
    END IF;
    RETURN note;
END $$;

DROP FUNCTION runtime.append_run_events_set(jsonb);

-- append_run_events_set of 0018, each row with the Khala message it sent
-- (khala_message, NULL when none). The common appends of a group: p is a
-- JSON array of {"o": ordinal, "r": run id, "t": event type, "p": payload, "k": key or absent}, none with an
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
               created_at text, updated_at text, khala_message text)
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
        SELECT n.run_id, n.s,
               runtime.khala_notify_message('run:' || n.run_id || ':events', n.s, n.event_type, n.payload, at) AS m
        FROM (SELECT * FROM ins ORDER BY ins.run_id, ins.s) n
        WHERE EXISTS (SELECT 1 FROM runtime.khala_listeners l WHERE l.topic = 'run:' || n.run_id || ':events')
    ), sent AS (
        SELECT count(*) AS n FROM note
    )
    SELECT a.o,
           CASE WHEN x.id IS NULL THEN 'not_found' WHEN f.o IS NULL THEN 'replayed' WHEN u.id IS NULL THEN 'retry'
                ELSE 'appended' END,
           CASE WHEN x.id IS NULL THEN 0::bigint WHEN u.id IS NULL THEN x.last_seq WHEN f.o IS NULL THEN u.last
                ELSE u.last - u.c + f.i END,
           x.status, NULL::text, x.worker_id, x.metadata::text, runtime.ts(x.created_at),
           runtime.ts(CASE WHEN u.id IS NULL THEN x.updated_at ELSE at END), nm.m
    FROM a LEFT JOIN fresh f ON f.o = a.o LEFT JOIN u ON u.id = a.r
         LEFT JOIN runtime.runs x ON x.id = a.r
         LEFT JOIN note nm ON nm.run_id = a.r AND nm.s = u.last - u.c + f.i AND f.o IS NOT NULL
         CROSS JOIN sent
    ORDER BY a.o;
END $$;
