-- action_results: one row per delivery attempt.
--
-- SPEC 1 lists action_results.job_id as unique, and SPEC 4 says that every
-- attempt writes an action_results row (status, duration_ms, error_message,
-- response_data, retry_count). Both hold only if the unit of uniqueness is
-- the attempt: a job retried three times has three rows (retrying,
-- retrying, success), all with the same job_id. So the unique key becomes
-- (job_id, retry_count), where retry_count is the attempt number (0 for the
-- first). The action-workers upsert on that key: a job delivered again after
-- its worker died (the lease ran out before the outcome was recorded)
-- repeats its attempt number and updates that attempt's row instead of
-- failing, so the table never holds two rows for one attempt.
DO $$
DECLARE
    r record;
    job_col smallint;
BEGIN
    SELECT attnum INTO job_col FROM pg_attribute
     WHERE attrelid = 'action_results'::regclass AND attname = 'job_id';
    FOR r IN SELECT conname FROM pg_constraint
              WHERE conrelid = 'action_results'::regclass AND contype = 'u' AND conkey = ARRAY[job_col]
    LOOP
        EXECUTE format('ALTER TABLE action_results DROP CONSTRAINT %I', r.conname);
    END LOOP;
    FOR r IN SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
              WHERE x.indrelid = 'action_results'::regclass AND x.indisunique AND NOT x.indisprimary
                AND x.indnatts = 1 AND x.indkey[0] = job_col
    LOOP
        EXECUTE format('DROP INDEX %I', r.relname);
    END LOOP;
END $$;

UPDATE action_results SET retry_count = 0 WHERE retry_count IS NULL;
ALTER TABLE action_results ALTER COLUMN retry_count SET DEFAULT 0;
ALTER TABLE action_results ALTER COLUMN retry_count SET NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS action_results_job_attempt ON action_results (job_id, retry_count);
CREATE INDEX IF NOT EXISTS action_results_trigger_executed ON action_results (trigger_id, executed_at DESC);
