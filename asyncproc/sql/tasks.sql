-- Named queries on the tasks table. The loader in db.py splits this file on
-- the "-- name:" lines; each query takes %(name)s parameters.

-- name: task_insert
INSERT INTO tasks (operation, payload, max_attempts, priority, scheduled_at, idempotency_key, request_id, owner,
                   timeout_seconds, idempotency_fingerprint, callback_url)
VALUES (%(operation)s, %(payload)s, %(max_attempts)s, %(priority)s,
        COALESCE(%(run_at)s, now()), %(idempotency_key)s, %(request_id)s, %(owner)s,
        %(timeout_seconds)s, %(idempotency_fingerprint)s, %(callback_url)s)
ON CONFLICT ((COALESCE(owner, 0)), idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING task_id, operation, payload, status, result, error_message, attempts, max_attempts,
          priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
          idempotency_key, request_id, owner

-- name: tasks_insert_many
-- The single-task requests of one group commit (asyncproc/group_commit.py) in
-- one statement, each as task_insert would store it. The ids are chosen by the
-- caller, so that each request finds its row; a row whose Idempotency-Key is
-- taken (by an earlier task, or by an earlier row of this statement) is not
-- returned.
INSERT INTO tasks (task_id, operation, payload, max_attempts, priority, scheduled_at, idempotency_key, request_id,
                   owner, timeout_seconds, idempotency_fingerprint, callback_url)
SELECT t.task_id, t.operation, t.payload, t.max_attempts, t.priority, COALESCE(t.run_at, now()), t.idempotency_key,
       t.request_id, t.owner, t.timeout_seconds, t.fingerprint, t.callback_url
FROM unnest(%(task_ids)s::uuid[], %(operations)s::text[], %(payloads)s::jsonb[], %(max_attempts)s::integer[],
            %(priorities)s::integer[], %(run_ats)s::timestamptz[], %(idempotency_keys)s::text[],
            %(request_ids)s::text[], %(owners)s::bigint[], %(timeouts)s::double precision[],
            %(fingerprints)s::text[], %(callback_urls)s::text[])
     AS t(task_id, operation, payload, max_attempts, priority, run_at, idempotency_key, request_id, owner,
          timeout_seconds, fingerprint, callback_url)
ON CONFLICT ((COALESCE(owner, 0)), idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING task_id, operation, payload, status, result, error_message, attempts, max_attempts,
          priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
          idempotency_key, request_id, owner

-- name: task_find_by_idempotency_key
-- Keys are unique per owner (NULL: access control off), as the index says.
SELECT task_id, idempotency_fingerprint
FROM tasks
WHERE COALESCE(owner, 0) = COALESCE(%(owner)s, 0) AND idempotency_key = %(idempotency_key)s

-- name: task_get
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner, wait_reason
FROM tasks
WHERE task_id = %(task_id)s

-- The worker's writes go through its functions (migrations/current/31_worker_outcomes.sql), which carry
-- the worker's right to record outcomes, each fenced on the attempt it ran.

-- name: tasks_mark_completed
-- Many outcomes in one statement, each fenced on its attempt (migrations/current/31_worker_outcomes.sql),
-- and their jobs finished with them (0016): the jobs gone come back as finished_jobs.
SELECT finished_jobs, (task).task_id, (task).operation, (task).payload, (task).status, (task).result,
       (task).error_message, (task).attempts, (task).max_attempts, (task).priority, (task).progress,
       (task).progress_message, (task).created_at, (task).scheduled_at, (task).started_at, (task).completed_at,
       (task).updated_at, (task).idempotency_key, (task).request_id, (task).owner
FROM asyncproc_worker_complete_jobs(%(task_ids)s, %(attempts)s, %(results)s, %(job_ids)s)

-- name: task_mark_failed
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM asyncproc_worker_fail(%(task_id)s, %(attempt)s, %(error_message)s)

-- name: task_mark_retry
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM asyncproc_worker_retry(%(task_id)s, %(attempt)s, %(error_message)s, %(delay_seconds)s)

-- name: task_release
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM asyncproc_worker_release(%(task_id)s, %(attempt)s, %(reason)s, %(delay_seconds)s)

-- name: tasks_sweep
SELECT requeued, failed, redeferred, dropped
FROM asyncproc_sweep(%(stalled_seconds)s)

-- name: task_count_running_jobs
-- A task's dispatch jobs that claimed it and that a live worker still runs:
-- more than one means an earlier attempt (cancelled, then retried) is still
-- being stopped. A job that claimed nothing runs nothing; one whose worker's
-- lease lapsed (worker_id NULL) was fenced and is the sweep's.
SELECT count(*) AS running
FROM procrastinate_jobs
WHERE args->>'task_id' = %(task_id)s::text AND status = 'doing' AND worker_id IS NOT NULL
  AND jsonb_typeof(args->'claimed') = 'object'

-- name: task_attempts
-- The attempts ledger of one task, oldest run first (migrations/current/60_attempts.sql).
SELECT attempt, worker_id, host, pid, started_at, finished_at, outcome, error
FROM asyncproc_attempts
WHERE task_id = %(task_id)s
ORDER BY id

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
SELECT asyncproc_worker_progress(%(task_id)s, %(attempt)s, %(progress)s, %(message)s)

-- name: task_insert_batch
-- One statement for the whole batch, so the statement-level trigger defers
-- every job in one call. The ids are chosen by the caller, which keeps the
-- answer in request order without relying on RETURNING's row order.
INSERT INTO tasks (task_id, operation, payload, max_attempts, priority, scheduled_at, request_id, owner,
                   timeout_seconds, callback_url)
SELECT t.task_id, t.operation, t.payload, t.max_attempts, t.priority, COALESCE(t.run_at, now()), %(request_id)s, t.owner,
       t.timeout_seconds, t.callback_url
FROM unnest(%(task_ids)s::uuid[], %(operations)s::text[], %(payloads)s::jsonb[],
            %(max_attempts)s::integer[], %(priorities)s::integer[], %(run_ats)s::timestamptz[],
            %(owners)s::bigint[], %(timeouts)s::double precision[], %(callback_urls)s::text[])
     AS t(task_id, operation, payload, max_attempts, priority, run_at, owner, timeout_seconds, callback_url)

-- name: tasks_count_active_of_owner
-- One key's pending and running tasks, for its quota (tasks_owner_active_idx).
SELECT count(*) AS n
FROM tasks
WHERE owner = %(owner)s AND status IN ('pending', 'running')

-- name: tasks_get_many
-- The tasks that event streams watch, read together once a second (asyncproc.waiting).
SELECT task_id, operation, payload, status, result, error_message, attempts, max_attempts,
       priority, progress, progress_message, created_at, scheduled_at, started_at, completed_at, updated_at,
       idempotency_key, request_id, owner
FROM tasks
WHERE task_id = ANY(%(task_ids)s)
