-- Durable event processing for the event-processor (SPEC 3; see
-- docs/event-processor.md).
--
-- event_queue: one row per committed event that the processor has not yet
-- handled. It is filled by a statement-level AFTER INSERT trigger on
-- events, inside the inserting transaction, so a row becomes visible
-- exactly when its event does (at commit). The processor takes rows with
-- DELETE ... FOR UPDATE SKIP LOCKED in the same transaction that advances
-- trigger_state and records the jobs, so an event is handled once in
-- effect whatever the commit order of the inserting transactions (a high-
-- water mark on events.id or seq would skip a transaction that holds a
-- lower seq and commits later; deleting queue rows cannot).
CREATE TABLE event_queue (
    seq      bigserial PRIMARY KEY,
    event_id text NOT NULL
);

CREATE FUNCTION enqueue_new_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_queue (event_id) SELECT id FROM new_events ORDER BY id;
    RETURN NULL;
END $$;

-- Statement level with a transition table: one INSERT per ingest batch
-- rather than one per row.
CREATE TRIGGER events_enqueue AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION enqueue_new_events();

-- Events that existed before this migration are considered processed: the
-- processor starts with the events that arrive after it was installed.

-- job_outbox: the jobs of one processed batch, written in the batch's
-- transaction and deleted once they are in Redis. One row per batch that
-- matched, holding references (event, trigger, action) rather than whole
-- job documents: writing a full row per job would cost far more than the
-- events themselves. After a crash between COMMIT and the Redis push, the
-- processor rebuilds the jobs from these references (joined to events,
-- triggers and trigger_actions) and pushes them. A row's jobs go to Redis
-- in one MULTI/EXEC that also sets ep:batch:{id}:{created_at in us} (under
-- WATCH), so a row whose jobs were already pushed is skipped on replay.
-- This needs the row durable before its push: the processor commits with
-- synchronous_commit on.
CREATE TABLE job_outbox (
    id          bigserial PRIMARY KEY,
    event_ids   text[] NOT NULL,
    trigger_ids text[] NOT NULL,
    action_ids  int[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(event_ids) = cardinality(trigger_ids) AND cardinality(event_ids) = cardinality(action_ids))
);
