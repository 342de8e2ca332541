-- The worker's fetch of Procrastinate jobs (migrations/0015_fair_fetch.sql).

-- name: job_fetch
SELECT id, status, task_name, priority, lock, queueing_lock, args, scheduled_at, queue_name, attempts, worker_id
FROM asyncproc_fetch_job(%(queues)s::varchar[], %(worker_id)s)
