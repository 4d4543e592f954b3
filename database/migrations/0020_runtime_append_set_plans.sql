-- append_run_events_set (0019) with plans that stay per append: the
-- planner guesses 100 rows for jsonb_to_recordset and jsonb_array_elements,
-- so it read the runs table whole (a sequential scan, then a hash join) to
-- lock the group's runs and to read them back, once a table of a thousand
-- runs made that look cheaper than 100 index probes; with a group of a few
-- appends that was most of the statement's time, and it grows with the
-- table. Each run is now looked up through LATERAL (with LIMIT 1, so that
-- the planner cannot flatten it back into a join), a probe of the primary
-- key per element, in id order for the locks, and the UPDATE finds them
-- by = ANY of their ids (an index scan whatever the guess).
CREATE OR REPLACE FUNCTION runtime.append_run_events_set(p jsonb)
RETURNS TABLE (ord int, outcome text, seq bigint, status text, message text, worker_id text, metadata text,
               created_at text, updated_at text, khala_message text)
LANGUAGE plpgsql AS $$
DECLARE
    at timestamptz := now();
BEGIN
    PERFORM 1
    FROM (SELECT DISTINCT (e ->> 'r')::uuid AS id FROM jsonb_array_elements(p) e ORDER BY 1) g,
         LATERAL (SELECT 1 FROM runtime.runs x WHERE x.id = g.id FOR UPDATE) l;
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
        WHERE x.id = ANY (ARRAY(SELECT per_run.r FROM per_run)) AND x.id = m.r AND x.last_seq = x.projected_seq
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
         LEFT JOIN LATERAL (SELECT x0.id, x0.last_seq, x0.status, x0.worker_id, x0.metadata, x0.created_at,
                                   x0.updated_at FROM runtime.runs x0 WHERE x0.id = a.r LIMIT 1) x ON true
         LEFT JOIN note nm ON nm.run_id = a.r AND nm.s = u.last - u.c + f.i AND f.o IS NOT NULL
         CROSS JOIN sent
    ORDER BY a.o;
END $$;
