-- Named queries on api_keys and the rate-limit buckets.

-- name: api_key_insert
INSERT INTO api_keys (name, key_hash)
VALUES (%(name)s, %(key_hash)s)
RETURNING id

-- name: api_key_get_live
SELECT id, key_hash, max_active_tasks, max_priority, max_batch_tasks, max_timeout_seconds
FROM api_keys
WHERE id = %(id)s AND revoked_at IS NULL

-- name: api_key_set_quota
UPDATE api_keys
SET (max_active_tasks, max_priority, max_batch_tasks, max_timeout_seconds) =
    (%(max_active_tasks)s, %(max_priority)s, %(max_batch_tasks)s, %(max_timeout_seconds)s)
WHERE name = %(name)s AND revoked_at IS NULL
RETURNING id

-- name: api_key_lock
-- Serialises one key's quota checks with its inserts, across API processes.
SELECT id FROM api_keys WHERE id = %(id)s FOR UPDATE

-- name: api_key_revoke
UPDATE api_keys
SET revoked_at = now()
WHERE name = %(name)s AND revoked_at IS NULL
RETURNING id

-- name: api_key_list
SELECT id, name, created_at, revoked_at, max_active_tasks, max_priority, max_batch_tasks, max_timeout_seconds,
       dashboard_role
FROM api_keys
ORDER BY created_at, id

-- name: rate_bucket_take
-- One atomic statement per request: refill the bucket for the time since its
-- last update, then take a token if there is one. Concurrent requests on one
-- bucket serialise on its row, whichever API process they reach.
INSERT INTO api_rate_buckets AS b (bucket, tokens, granted, updated_at)
VALUES (%(bucket)s, %(burst)s - 1, true, clock_timestamp())
ON CONFLICT (bucket) DO UPDATE
SET (tokens, granted, updated_at) = (
    SELECT CASE WHEN refill.tokens >= 1 THEN refill.tokens - 1 ELSE refill.tokens END,
           refill.tokens >= 1,
           refill.now
    FROM (SELECT t.now,
                 LEAST(%(burst)s::float8,
                       b.tokens + %(rate)s::float8 * GREATEST(0, EXTRACT(EPOCH FROM t.now - b.updated_at))::float8)
                     AS tokens
          FROM (SELECT clock_timestamp() AS now) AS t) AS refill
)
RETURNING granted, tokens


-- name: rate_bucket_prune
-- A bucket untouched for longer than it takes to refill is full: forgetting it changes nothing.
DELETE FROM api_rate_buckets
WHERE updated_at < clock_timestamp() - make_interval(secs => %(idle_seconds)s)

-- name: api_key_callback_secret
SELECT callback_secret
FROM api_keys
WHERE name = %(name)s AND revoked_at IS NULL
