-- Batched completion: a worker records the outcomes of many tasks that
-- finished close together in one statement and one commit. Each row keeps the
-- fence of asyncproc_worker_complete (0007): it is recorded only while the
-- task is still running the attempt that produced it, so a cancelled, re-queued
-- or superseded attempt records nothing.
--
-- The rows are locked in task_id order before they are changed, so that two
-- batches (two workers, or a batch and the sweep) never wait on each other in
-- a cycle. The planner settings keep each row an index probe whatever the
-- statistics say.
CREATE FUNCTION asyncproc_worker_complete_many(targets uuid[], attempts_run integer[], outcomes jsonb[])
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
    SET enable_seqscan = off
    SET enable_bitmapscan = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off
AS $$
    WITH outcome AS (
        SELECT target, attempt_run, result_value
        FROM unnest(targets, attempts_run, outcomes) AS o(target, attempt_run, result_value)
    ), locked AS (
        SELECT t.task_id
        FROM tasks t
        JOIN outcome o ON t.task_id = o.target
        WHERE t.status = 'running' AND t.attempts = o.attempt_run
        ORDER BY t.task_id
        FOR UPDATE OF t
    )
    UPDATE tasks t SET status = 'completed', result = o.result_value, progress = 100
    FROM outcome o, locked l
    WHERE t.task_id = o.target AND l.task_id = o.target
      AND t.status = 'running' AND t.attempts = o.attempt_run
    RETURNING t.*
$$;

REVOKE EXECUTE ON FUNCTION asyncproc_worker_complete_many(uuid[], integer[], jsonb[]) FROM PUBLIC;
