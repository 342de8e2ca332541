-- Named queries of the dashboard (asyncproc/dashboard/). Each panel's "Show
-- SQL" prints the query it ran with its parameters bound as literals, which is
-- also the text sent to the server, so what is shown is what ran.

-- name: dashboard_status_counts
SELECT status, operation, tasks
FROM asyncproc_status_counts
ORDER BY operation, status

-- name: dashboard_throughput
-- Finished tasks per minute over the window, all operations together.
SELECT bucket_start, sum(completed)::bigint AS completed, sum(failed)::bigint AS failed
FROM asyncproc_throughput('minute', %(since)s::interval)
GROUP BY bucket_start
ORDER BY bucket_start

-- name: dashboard_oldest_pending
SELECT task_id, operation, created_at, now() - created_at AS age
FROM tasks
WHERE status = 'pending'
ORDER BY created_at, task_id
LIMIT 1

-- name: dashboard_workers
-- Procrastinate's worker heartbeats, where each worker runs (its host and pid,
-- as it registered them), and the tasks each one's jobs are running. A worker
-- that stops beating is pruned by the sweep after stalled_seconds.
SELECT w.id, h.host, h.pid, w.last_heartbeat, now() - w.last_heartbeat AS silent_for,
       w.last_heartbeat > now() - make_interval(secs => %(alive_seconds)s) AS alive,
       count(j.id) AS running,
       COALESCE(array_agg(j.args->>'task_id' ORDER BY j.id) FILTER (WHERE j.id IS NOT NULL), '{}') AS task_ids
FROM procrastinate_workers AS w
LEFT JOIN asyncproc_worker_hosts AS h ON h.worker_id = w.id
LEFT JOIN procrastinate_jobs AS j ON j.worker_id = w.id AND j.status = 'doing'
GROUP BY w.id, w.last_heartbeat, h.host, h.pid
ORDER BY w.id

-- name: dashboard_task_attempts
-- Every run of one task from the attempts ledger, oldest first: what
-- GET /results/{id}/attempts serves.
SELECT attempt, worker_id, host, pid, started_at, finished_at, duration, outcome, error, counted
FROM asyncproc_task_attempts
WHERE task_id = %(task_id)s
ORDER BY started_at, attempt

-- name: dashboard_tasks_page
-- One page, newest first, after the keyset (created_at, task_id) of the last
-- row of the page before.
SELECT task_id, operation, status, attempts, max_attempts, progress, error_message, created_at, completed_at
FROM asyncproc_tasks_matching(%(status)s, %(operation)s, %(created_from)s, %(created_to)s, %(error)s, %(owner)s) AS t
WHERE (%(after_created_at)s::timestamptz IS NULL
       OR (t.created_at, t.task_id) < (%(after_created_at)s::timestamptz, %(after_task_id)s::uuid))
ORDER BY t.created_at DESC, t.task_id DESC
LIMIT %(limit)s

-- name: dashboard_tasks_bulk_count
-- How many tasks a bulk action would change: those matching the filter that
-- are in a status the action applies to.
SELECT count(*) AS tasks
FROM asyncproc_tasks_matching(%(status)s, %(operation)s, %(created_from)s, %(created_to)s, %(error)s, %(owner)s) AS t
WHERE t.status = ANY (%(from_statuses)s::text[])

-- name: dashboard_tasks_bulk_retry
SELECT count(*) AS changed
FROM asyncproc_tasks_matching(%(status)s, %(operation)s, %(created_from)s, %(created_to)s, %(error)s, %(owner)s) AS t,
     LATERAL asyncproc_retry(t.task_id) AS retried
WHERE t.status IN ('failed', 'cancelled')

-- name: dashboard_tasks_bulk_cancel
SELECT count(*) AS changed
FROM asyncproc_tasks_matching(%(status)s, %(operation)s, %(created_from)s, %(created_to)s, %(error)s, %(owner)s) AS t,
     LATERAL asyncproc_cancel(t.task_id) AS cancelled
WHERE t.status IN ('pending', 'running')

-- name: dashboard_operation_latency
-- Run time of the tasks completed within the window, per operation.
SELECT operation, tasks, run_p50, run_p95
FROM asyncproc_latency(%(since)s::interval)

-- name: dashboard_key_role
SELECT dashboard_role
FROM api_keys
WHERE id = %(id)s AND revoked_at IS NULL

-- name: dashboard_secret_get
SELECT secret
FROM asyncproc_dashboard_secret

-- name: api_key_set_dashboard_role
UPDATE api_keys
SET dashboard_role = %(dashboard_role)s
WHERE name = %(name)s AND revoked_at IS NULL
RETURNING id

-- name: dashboard_operation_limits
-- Per-operation limits, as `asyncproc limits` and SQL set them.
SELECT operation, max_running, rate_per_second, burst, paused, updated_at
FROM asyncproc_operation_settings
ORDER BY operation

-- name: dashboard_schedules
-- Periodic tasks, as `asyncproc schedules` and SQL set them.
SELECT name, cron, every_seconds, operation, enabled, catch_up, next_run_at, last_run_at
FROM asyncproc_schedules
ORDER BY name
