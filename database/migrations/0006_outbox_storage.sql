-- job_outbox rows are written once, read only after a crash, and deleted
-- within milliseconds: compressing their arrays (hundreds of kB under
-- load) cost the processor's transaction more than storing them as they
-- are. EXTERNAL keeps them out of line, uncompressed.
ALTER TABLE job_outbox
    ALTER COLUMN event_ids SET STORAGE EXTERNAL,
    ALTER COLUMN trigger_ids SET STORAGE EXTERNAL,
    ALTER COLUMN action_ids SET STORAGE EXTERNAL;
