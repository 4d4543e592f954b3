-- action_results had two indexes on (trigger_id, executed_at DESC): 0004's
-- (with id, the keyset of GET /api/v1/triggers/{id}/results) and 0005's.
-- The wider one serves every query the narrower did; each index costs the
-- action-workers an insertion per attempt written.
DROP INDEX IF EXISTS action_results_trigger_executed;
