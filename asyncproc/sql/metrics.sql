-- Named queries for GET /metrics, run at scrape time. The tasks table is the
-- ledger of every API and worker process on every host, so figures taken from
-- it are correct however many processes there are.

-- name: metrics_task_stats
-- One scan of tasks, three groupings: rows per (operation, status), and
-- bucketed run time and queue wait per operation. A task's figures are those
-- of its latest attempt: run = started_at to completed_at of a finished task,
-- wait = scheduled_at (when it became due) to started_at of a task that has
-- started. width_bucket(x, bounds) is the number of bounds <= x.
SELECT operation, status, run_bucket, wait_bucket,
       count(*) AS tasks,
       COALESCE(sum(run_seconds), 0)::float8 AS run_sum,
       COALESCE(sum(wait_seconds), 0)::float8 AS wait_sum,
       GROUPING(status) = 0 AS by_status,
       GROUPING(run_bucket) = 0 AS by_run,
       GROUPING(wait_bucket) = 0 AS by_wait
FROM (
    SELECT operation, status, run_seconds, wait_seconds,
           width_bucket(run_seconds, %(buckets)s::float8[]) AS run_bucket,
           width_bucket(wait_seconds, %(buckets)s::float8[]) AS wait_bucket
    FROM (
        SELECT operation, status,
               CASE WHEN status IN ('completed', 'failed')
                    THEN EXTRACT(EPOCH FROM completed_at - started_at)::float8 END AS run_seconds,
               CASE WHEN status IN ('running', 'completed', 'failed')
                    THEN GREATEST(EXTRACT(EPOCH FROM started_at - scheduled_at)::float8, 0) END AS wait_seconds
        FROM tasks
    ) AS timed
) AS bucketed
GROUP BY GROUPING SETS ((operation, status), (operation, run_bucket), (operation, wait_bucket))

-- name: metrics_queue
-- Depth counts pending tasks that are due now; tasks scheduled for later are
-- waiting on the clock, not on a worker. The age is measured from when the
-- oldest due task became due (its scheduled_at), so a delayed task does not
-- look stuck. Uses tasks_status_created_at_idx to find the pending rows.
SELECT count(*) FILTER (WHERE scheduled_at <= now()) AS due,
       count(*) FILTER (WHERE scheduled_at > now()) AS scheduled,
       COALESCE(EXTRACT(EPOCH FROM now() - min(scheduled_at) FILTER (WHERE scheduled_at <= now())), 0)::float8
           AS oldest_due_age_seconds
FROM tasks
WHERE status = 'pending'
