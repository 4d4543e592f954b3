-- api-gateway: rotating refresh tokens, and the indexes behind the gateway's
-- keyset pagination.
--
-- A refresh token is 32 random bytes handed to the client once; only its
-- SHA-256 (hex) is stored. Every login starts a family; each refresh marks the
-- presented token used and issues the next one in the same family. Presenting
-- a token that was already used (a replay: one of the two holders is a thief)
-- revokes the whole family. Logout revokes the family too.
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash  text PRIMARY KEY,
    user_id     text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    family_id   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX IF NOT EXISTS refresh_tokens_user_idx ON refresh_tokens (user_id);

-- GET /api/v1/triggers: a user's triggers, newest first, keyset (created_at, id).
CREATE INDEX IF NOT EXISTS triggers_user_created_idx ON triggers (user_id, created_at DESC, id DESC);
-- GET /api/v1/triggers/{id}/results: newest first, keyset (executed_at, id).
CREATE INDEX IF NOT EXISTS action_results_trigger_executed_idx
    ON action_results (trigger_id, executed_at DESC, id DESC);
-- GET /api/v1/chain-events: newest first, keyset (created_at, id).
CREATE INDEX IF NOT EXISTS events_created_id_idx ON events (created_at DESC, id DESC);
