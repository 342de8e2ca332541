-- Named queries for GET /metrics, run at scrape time. The database sees every
-- API and worker process on every host, so figures taken from it are correct
-- however many processes there are.

-- name: metrics_task_counts
-- Exact counts, totals and histograms per operation, kept by the triggers of
-- migrations/current/50_ledger_counts.sql: a few rows per operation, however many
-- tasks there are.
SELECT operation, pending, running, completed, failed, cancelled,
       enqueued_total, completed_total, failed_total, cancelled_total,
       run_histogram, run_sum, wait_histogram, wait_sum
FROM asyncproc_operation_counts
ORDER BY operation

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
