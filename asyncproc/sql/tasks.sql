-- Named queries on the tasks table. The loader in db.py splits this file on
-- the "-- name:" lines; each query takes %(name)s parameters.

-- name: task_insert
INSERT INTO tasks (operation, payload, max_attempts, priority, scheduled_at, idempotency_key, request_id, owner)
VALUES (%(operation)s, %(payload)s, %(max_attempts)s, %(priority)s,
        COALESCE(%(run_at)s, now()), %(idempotency_key)s, %(request_id)s, %(owner)s)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING task_id, operation, payload, status, result, error_message, attempts, max_attempts,
          priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
          idempotency_key, request_id, owner

-- name: task_get_by_idempotency_key
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM tasks
WHERE idempotency_key = %(idempotency_key)s

-- name: task_get
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM tasks
WHERE task_id = %(task_id)s

-- name: task_mark_completed
UPDATE tasks
SET status = 'completed', result = %(result)s, progress = 100
WHERE task_id = %(task_id)s AND status = 'running' AND attempts = %(attempt)s
RETURNING task_id, operation, payload, status, result, error_message, attempts, max_attempts,
          priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
          idempotency_key, request_id, owner

-- name: task_mark_failed
UPDATE tasks
SET status = 'failed', error_message = %(error_message)s
WHERE task_id = %(task_id)s AND status = 'running' AND attempts = %(attempt)s
RETURNING task_id, operation, payload, status, result, error_message, attempts, max_attempts,
          priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
          idempotency_key, request_id, owner

-- name: task_mark_retry
UPDATE tasks
SET status = 'pending', error_message = %(error_message)s,
    scheduled_at = now() + make_interval(secs => %(delay_seconds)s)
WHERE task_id = %(task_id)s AND status = 'running' AND attempts = %(attempt)s
RETURNING task_id, operation, payload, status, result, error_message, attempts, max_attempts,
          priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
          idempotency_key, request_id, owner

-- name: task_requeue_stalled
SELECT asyncproc_requeue_stalled(%(stalled_seconds)s) AS requeued

-- name: task_retry
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM asyncproc_retry(%(task_id)s)

-- name: task_cancel
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM asyncproc_cancel(%(task_id)s)

-- name: tasks_retry_failed
SELECT asyncproc_retry_failed(%(since)s, %(operation)s) AS retried

-- name: task_set_progress
UPDATE tasks
SET progress = %(progress)s, progress_message = %(message)s
WHERE task_id = %(task_id)s AND status = 'running' AND attempts = %(attempt)s

-- name: task_insert_batch
-- One statement for the whole batch, so the statement-level trigger defers
-- every job in one call. The ids are chosen by the caller, which keeps the
-- answer in request order without relying on RETURNING's row order.
INSERT INTO tasks (task_id, operation, payload, max_attempts, priority, scheduled_at, request_id, owner)
SELECT t.task_id, t.operation, t.payload, t.max_attempts, t.priority, COALESCE(t.run_at, now()), %(request_id)s, t.owner
FROM unnest(%(task_ids)s::uuid[], %(operations)s::text[], %(payloads)s::jsonb[],
            %(max_attempts)s::integer[], %(priorities)s::integer[], %(run_ats)s::timestamptz[],
            %(owners)s::bigint[])
     AS t(task_id, operation, payload, max_attempts, priority, run_at, owner)
