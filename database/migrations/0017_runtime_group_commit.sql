-- Group commit: the appends that arrived together, in one transaction (one
-- commit, one WAL flush, one round trip for all). p is a JSON array of
-- {"r": run id, "t": event type, "p": payload, "k": key, "e": expected
-- seq as text}; each row of the answer is append_run_event's for element
-- `ord` (1-based). Elements are taken in run id order, and in their given
-- order within a run, so two batches lock their runs in one order (no
-- deadlock between them) and a run's appends keep their order. An outcome
-- other than appended (a 409, a 400) does not fail the others; an error
-- fails the whole call, and the caller then runs each append alone.
CREATE FUNCTION runtime.append_run_events(p jsonb)
RETURNS TABLE (ord int, outcome text, seq bigint, status text, message text, worker_id text, metadata text,
               created_at text, updated_at text)
LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    FOR e IN SELECT x.ordinality::int AS i, x.value AS v FROM jsonb_array_elements(p) WITH ORDINALITY x
             ORDER BY x.value ->> 'r', x.ordinality LOOP
        RETURN QUERY SELECT e.i, a.* FROM runtime.append_run_event((e.v ->> 'r')::uuid, e.v ->> 't', e.v -> 'p',
            e.v ->> 'k', (e.v ->> 'e')::bigint) a;
    END LOOP;
END $$;
