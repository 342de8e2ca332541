-- API limits (issue 11): idempotency keys scoped per owner and compared by
-- the whole request; per-key quotas; versioned cache invalidations.

-- Contract change: an Idempotency-Key is unique per owner (api_keys.id, or
-- none without access control), no longer across every client.
DROP INDEX tasks_idempotency_key_idx;
CREATE UNIQUE INDEX tasks_owner_idempotency_key_idx ON tasks ((COALESCE(owner, 0)), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- What a replay is compared with: a hash of the request that used the key.
-- NULL for rows inserted without the API: a replay then compares the stored fields.
ALTER TABLE tasks ADD COLUMN idempotency_fingerprint text;
COMMENT ON COLUMN tasks.idempotency_fingerprint IS
    'sha256 of the canonical request that used idempotency_key; a replay with another request is a 409';

-- Quotas per key, set with `asyncproc keys limit`; NULL: no limit.
ALTER TABLE api_keys
    ADD COLUMN max_active_tasks    integer CHECK (max_active_tasks >= 0),
    ADD COLUMN max_priority        integer,
    ADD COLUMN max_batch_tasks     integer CHECK (max_batch_tasks >= 1),
    ADD COLUMN max_timeout_seconds double precision CHECK (max_timeout_seconds > 0);

-- The quota check counts one owner's pending and running tasks.
CREATE INDEX tasks_owner_active_idx ON tasks (owner) WHERE status IN ('pending', 'running');

-- The announcement carries the new state's version (updated_at in microseconds),
-- so that each API process's cache invalidation refuses an older state put
-- afterwards by a reader that read the row before the change.
CREATE OR REPLACE FUNCTION asyncproc_tasks_notify_changed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('asyncproc_task_changed',
                      NEW.task_id::text || ' ' || NEW.status || ' '
                      || (extract(epoch FROM NEW.updated_at) * 1000000)::bigint::text);
    RETURN NULL;
END;
$$;

-- Rate-limit buckets untouched this long are full again, so they can go.
CREATE INDEX api_rate_buckets_updated_at_idx ON api_rate_buckets (updated_at);
