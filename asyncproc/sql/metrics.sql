-- Named queries for GET /metrics, run at scrape time. The database sees every
-- API and worker process on every host, so figures taken from it are correct
-- however many processes there are.

-- name: metrics_task_counts
-- Exact counts, totals and histograms per operation, from the per-session
-- rows the triggers of migrations/0010_ledger_scale.sql keep: a few rows per
-- operation, however many tasks there are.
SELECT operation,
       sum(pending)::bigint AS pending, sum(running)::bigint AS running, sum(completed)::bigint AS completed,
       sum(failed)::bigint AS failed, sum(cancelled)::bigint AS cancelled,
       sum(enqueued_total)::bigint AS enqueued_total, sum(completed_total)::bigint AS completed_total,
       sum(failed_total)::bigint AS failed_total, sum(cancelled_total)::bigint AS cancelled_total,
       asyncproc_histogram_sum(run_histogram) AS run_histogram, sum(run_sum)::float8 AS run_sum,
       asyncproc_histogram_sum(wait_histogram) AS wait_histogram, sum(wait_sum)::float8 AS wait_sum
FROM asyncproc_counts
GROUP BY operation
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
