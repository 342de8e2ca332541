-- The worker's fetch of Procrastinate jobs (migrations/current/30_procrastinate_claim_and_fetch.sql).

-- name: jobs_fetch
-- Up to how_many jobs, in one statement and one commit.
SELECT id, status, task_name, priority, lock, queueing_lock, args, scheduled_at, queue_name, attempts, worker_id
FROM asyncproc_fetch_jobs(%(queues)s::varchar[], %(worker_id)s, %(how_many)s)

-- name: jobs_return
-- Jobs fetched and never started: their tasks back to pending, attempt not counted.
SELECT asyncproc_worker_return_jobs(%(job_ids)s) AS returned

-- name: jobs_abandon
-- Jobs whose thread handlers outlive their worker: released by the sweep once its lease lapses.
SELECT asyncproc_worker_abandon_jobs(%(job_ids)s) AS abandoned
