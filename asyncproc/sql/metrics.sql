-- Named queries for GET /metrics, run at scrape time. The tasks table is the
-- ledger of every API and worker process on every host, so figures taken from
-- it are correct however many processes there are.

-- name: metrics_task_counts
SELECT operation, status, count(*) AS tasks
FROM tasks
GROUP BY operation, status

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
