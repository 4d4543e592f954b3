-- api-gateway: revoking access tokens before they expire (issue 10.11).
--
-- An access token whose iat (unix seconds) is at or before its user's
-- tokens_valid_after is refused; POST /api/v1/auth/logout-all sets it. The
-- gateway caches each user's (is_active, tokens_valid_after) and LISTENs on
-- user_tokens: this trigger notifies the user's id when either changes or
-- the user is deleted, so every gateway instance drops its cached copy at
-- once, whoever made the change (the gateway or an administrator in SQL).
ALTER TABLE users ADD COLUMN IF NOT EXISTS tokens_valid_after timestamptz;

CREATE OR REPLACE FUNCTION users_notify_tokens() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('user_tokens', OLD.id);
        RETURN OLD;
    END IF;
    IF NEW.tokens_valid_after IS DISTINCT FROM OLD.tokens_valid_after
       OR NEW.is_active IS DISTINCT FROM OLD.is_active
       OR NEW.id IS DISTINCT FROM OLD.id THEN
        PERFORM pg_notify('user_tokens', OLD.id);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS users_notify_tokens ON users;
CREATE TRIGGER users_notify_tokens AFTER UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION users_notify_tokens();
