-- The operator's interface in SQL: retry and cancel functions, shared by psql,
-- the HTTP API and the CLI, and reporting views that read `tasks` only.

-- An operator's status change of one task, refused with a clear error when the
-- task is unknown or not in one of the `allowed` statuses.
CREATE FUNCTION asyncproc_operator_change(target uuid, allowed text[], new_status text, action text)
    RETURNS SETOF tasks
    LANGUAGE plpgsql
AS $$
DECLARE
    current_status text;
BEGIN
    SELECT status INTO current_status FROM tasks WHERE task_id = target FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no task with id %', target USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT current_status = ANY (allowed) THEN
        RAISE EXCEPTION 'task % is %: only % tasks can be %', target, current_status, array_to_string(allowed, ' or '), action
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN QUERY UPDATE tasks SET status = new_status WHERE task_id = target RETURNING *;
END;
$$;

-- Retry one failed or cancelled task: it goes back to pending and runs again.
CREATE FUNCTION asyncproc_retry(target uuid)
    RETURNS SETOF tasks
    LANGUAGE sql
AS $$
    SELECT * FROM asyncproc_operator_change(target, ARRAY['failed', 'cancelled'], 'pending', 'retried')
$$;

-- Retry every task that failed within `since`, optionally of one operation.
-- Returns how many were re-queued.
CREATE FUNCTION asyncproc_retry_failed(since interval, only_operation text DEFAULT NULL)
    RETURNS integer
    LANGUAGE plpgsql
AS $$
DECLARE
    retried integer;
BEGIN
    UPDATE tasks SET status = 'pending'
    WHERE status = 'failed'
      AND completed_at >= now() - since
      AND (only_operation IS NULL OR operation = only_operation);
    GET DIAGNOSTICS retried = ROW_COUNT;
    RETURN retried;
END;
$$;

-- Cancel a task: a pending one never runs; a running one is asked to stop,
-- which its handler honours where it checks for it.
CREATE FUNCTION asyncproc_cancel(target uuid)
    RETURNS SETOF tasks
    LANGUAGE sql
AS $$
    SELECT * FROM asyncproc_operator_change(target, ARRAY['pending', 'running'], 'cancelled', 'cancelled')
$$;

-- Reporting. Time windows are parameters of the functions; the views are the
-- usual questions with the usual windows.

CREATE INDEX tasks_completed_at_idx ON tasks (completed_at) WHERE completed_at IS NOT NULL;

-- How many tasks are in each status, per operation?
CREATE VIEW asyncproc_status_counts AS
SELECT status, operation, count(*) AS tasks
FROM tasks
GROUP BY status, operation;

-- How many tasks finished per bucket ('minute' or 'hour') over a window?
CREATE FUNCTION asyncproc_throughput(bucket text DEFAULT 'minute', since interval DEFAULT '1 hour')
    RETURNS TABLE (bucket_start timestamptz, operation text, completed bigint, failed bigint)
    LANGUAGE sql STABLE
AS $$
    SELECT date_trunc(bucket, completed_at), operation,
           count(*) FILTER (WHERE status = 'completed'),
           count(*) FILTER (WHERE status = 'failed')
    FROM tasks
    WHERE completed_at >= now() - since
      AND status IN ('completed', 'failed')
    GROUP BY 1, 2
    ORDER BY 1, 2
$$;

CREATE VIEW asyncproc_throughput_per_minute AS
SELECT * FROM asyncproc_throughput('minute', '1 hour');

CREATE VIEW asyncproc_throughput_per_hour AS
SELECT * FROM asyncproc_throughput('hour', '24 hours');

-- How long do tasks wait in the queue, and how long do they run, per operation?
-- Over tasks completed within the window. Queue wait runs from when the task
-- became runnable (created, or scheduled_at for a delayed or retried task) to
-- the start of the run that completed it.
CREATE FUNCTION asyncproc_latency(since interval DEFAULT '1 hour')
    RETURNS TABLE (operation text, tasks bigint,
                   wait_p50 interval, wait_p95 interval, wait_p99 interval,
                   run_p50 interval, run_p95 interval, run_p99 interval)
    LANGUAGE sql STABLE
AS $$
    SELECT operation, count(*),
           percentile_cont(0.50) WITHIN GROUP (ORDER BY started_at - GREATEST(created_at, scheduled_at)),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY started_at - GREATEST(created_at, scheduled_at)),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - GREATEST(created_at, scheduled_at)),
           percentile_cont(0.50) WITHIN GROUP (ORDER BY completed_at - started_at),
           percentile_cont(0.95) WITHIN GROUP (ORDER BY completed_at - started_at),
           percentile_cont(0.99) WITHIN GROUP (ORDER BY completed_at - started_at)
    FROM tasks
    WHERE status = 'completed' AND completed_at >= now() - since
    GROUP BY operation
    ORDER BY operation
$$;

CREATE VIEW asyncproc_latency_last_hour AS
SELECT * FROM asyncproc_latency('1 hour');

-- What failed in the last 24 hours, and why?
CREATE VIEW asyncproc_recent_failures AS
SELECT task_id, operation, error_message, attempts, max_attempts, completed_at AS failed_at, request_id
FROM tasks
WHERE status = 'failed' AND completed_at >= now() - interval '24 hours'
ORDER BY completed_at DESC;

-- Which tasks have been running for longer than a threshold?
CREATE FUNCTION asyncproc_stuck(older_than interval DEFAULT '10 minutes')
    RETURNS TABLE (task_id uuid, operation text, attempts integer, started_at timestamptz, running_for interval)
    LANGUAGE sql STABLE
AS $$
    SELECT task_id, operation, attempts, started_at, now() - started_at
    FROM tasks
    WHERE status = 'running' AND started_at < now() - older_than
    ORDER BY started_at
$$;

CREATE VIEW asyncproc_stuck_tasks AS
SELECT * FROM asyncproc_stuck('10 minutes');

-- How deep is the queue, and how old is its oldest task?
CREATE VIEW asyncproc_queue AS
SELECT count(*) AS pending,
       count(*) FILTER (WHERE scheduled_at <= now()) AS ready,
       now() - min(created_at) AS oldest_pending_age
FROM tasks
WHERE status = 'pending';
