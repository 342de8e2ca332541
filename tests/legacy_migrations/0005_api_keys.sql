-- API keys for ASYNCPROC_AUTH=required, and the owner of each task.
-- Keys are stored only as SHA-256 hashes of their secret part; the key itself
-- is shown once, by `asyncproc keys create NAME`.

CREATE TABLE api_keys (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.@-]{1,100}$'),
    key_hash    bytea       NOT NULL CHECK (length(key_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

COMMENT ON TABLE api_keys IS 'asyncproc API keys; key_hash is sha256 of the secret, the key is never stored';

-- A name identifies one live key; a revoked name may be issued again.
CREATE UNIQUE INDEX api_keys_live_name_idx ON api_keys (name) WHERE revoked_at IS NULL;

-- Contract change: the key that created a task. NULL when access control was
-- off, or for rows inserted with psql; such tasks are readable by no key.
ALTER TABLE tasks ADD COLUMN owner bigint REFERENCES api_keys (id);
COMMENT ON COLUMN tasks.owner IS 'api_keys.id of the key that created the task; NULL without access control';

-- Token buckets for ASYNCPROC_RATE_LIMIT_*, shared by every API process.
-- UNLOGGED: losing them in a crash only refills every bucket.
CREATE UNLOGGED TABLE api_rate_buckets (
    bucket      text             PRIMARY KEY,
    tokens      double precision NOT NULL,
    granted     boolean          NOT NULL,
    updated_at  timestamptz      NOT NULL
);
