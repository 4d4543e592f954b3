-- The ERC-8004 backend's schema (SPEC section 1).
--
-- Choices: chain ids, block numbers, agent ids and unix timestamps are
-- bigint everywhere (chain ids exceed int on some networks); times are
-- timestamptz; ids that clients see are text (uuid strings by default).
-- Usernames and e-mails are unique case-insensitively, so "Alice" and
-- "alice" cannot both register.

CREATE TABLE users (
    id               text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    username         text NOT NULL,
    email            text NOT NULL,
    password_hash    text NOT NULL,
    telegram_chat_id text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_login_at    timestamptz,
    is_active        boolean NOT NULL DEFAULT true
);
CREATE UNIQUE INDEX users_username_key ON users (lower(username));
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE triggers (
    id          text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    user_id     text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        text NOT NULL,
    description text,
    chain_id    bigint NOT NULL,
    registry    text NOT NULL CHECK (registry IN ('identity', 'reputation', 'validation')),
    enabled     boolean NOT NULL DEFAULT true,
    is_stateful boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX triggers_match_idx ON triggers (chain_id, registry) WHERE enabled;

CREATE TABLE trigger_conditions (
    id             serial PRIMARY KEY,
    trigger_id     text NOT NULL REFERENCES triggers(id) ON DELETE CASCADE,
    condition_type text NOT NULL,
    field          text,
    operator       text,
    value          text,
    config         jsonb
);
CREATE INDEX trigger_conditions_trigger_idx ON trigger_conditions (trigger_id);

CREATE TABLE trigger_actions (
    id          serial PRIMARY KEY,
    trigger_id  text NOT NULL REFERENCES triggers(id) ON DELETE CASCADE,
    action_type text NOT NULL CHECK (action_type IN ('telegram', 'rest', 'mcp')),
    priority    int NOT NULL DEFAULT 1,
    config      jsonb NOT NULL
);
CREATE INDEX trigger_actions_trigger_idx ON trigger_actions (trigger_id);

CREATE TABLE trigger_state (
    trigger_id   text PRIMARY KEY REFERENCES triggers(id) ON DELETE CASCADE,
    state_data   jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_updated timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE events (
    id                text PRIMARY KEY,
    chain_id          bigint NOT NULL,
    block_number      bigint,
    block_hash        text,
    transaction_hash  text,
    log_index         int,
    registry          text NOT NULL CHECK (registry IN ('identity', 'reputation', 'validation')),
    event_type        text NOT NULL CHECK (event_type IN ('AgentRegistered', 'MetadataSet', 'NewFeedback',
                          'FeedbackRevoked', 'ResponseAppended', 'ValidationRequest', 'ValidationResponse')),
    agent_id          bigint,
    "timestamp"       bigint,
    owner             text,
    token_uri         text,
    metadata_key      text,
    metadata_value    text,
    client_address    text,
    feedback_index    bigint,
    score             int,
    tag1              text,
    tag2              text,
    file_uri          text,
    file_hash         text,
    validator_address text,
    request_hash      text,
    response          int,
    response_uri      text,
    response_hash     text,
    tag               text,
    created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX events_filter_idx ON events (chain_id, registry, event_type, agent_id);
CREATE INDEX events_timestamp_idx ON events ("timestamp");

-- NOTIFY is only a wake-up for the event-processor: it is lost when nobody
-- listens, so the processor's durable queue (0002) is the data path.
CREATE FUNCTION notify_new_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('new_event', NEW.id);
    RETURN NEW;
END $$;
CREATE TRIGGER events_notify_new_event AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION notify_new_event();

CREATE TABLE checkpoints (
    chain_id          bigint PRIMARY KEY,
    last_block_number bigint NOT NULL,
    last_block_hash   text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE action_results (
    id            bigserial PRIMARY KEY,
    job_id        text NOT NULL UNIQUE,
    trigger_id    text,
    event_id      text,
    action_type   text NOT NULL,
    status        text NOT NULL CHECK (status IN ('success', 'failed', 'retrying', 'dead')),
    executed_at   timestamptz NOT NULL DEFAULT now(),
    duration_ms   int,
    error_message text,
    response_data jsonb,
    retry_count   int NOT NULL DEFAULT 0
);

CREATE TABLE agent_mcp_tokens (
    agent_id bigint PRIMARY KEY,
    token    text NOT NULL
);

-- TimescaleDB is used when the extension is installed. events keeps a text
-- primary key (ids are idempotency keys for ingest), which a hypertable
-- cannot have without the time column in it, so the table stays plain and
-- the extension is only enabled for future use.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        BEGIN
            CREATE EXTENSION IF NOT EXISTS timescaledb;
            RAISE NOTICE 'timescaledb enabled';
        EXCEPTION WHEN OTHERS THEN
            -- Not preloaded, or the role may not create it: the schema
            -- works without it.
            RAISE NOTICE 'timescaledb is installed but could not be enabled (%): skipped', SQLERRM;
        END;
    ELSE
        RAISE NOTICE 'timescaledb is not installed: events stay a plain table';
    END IF;
END $$;
