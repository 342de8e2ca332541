-- The worker's writes. Each is fenced on the attempt it ran: a run that was
-- cancelled, re-queued or superseded records nothing. They run with
-- asyncproc.writer = 'worker', which the status machine checks
-- (10_tasks_status_machine.sql).
CREATE OR REPLACE FUNCTION asyncproc_worker_complete(target uuid, attempt integer, outcome jsonb)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks SET status = 'completed', result = outcome, progress = 100
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_complete(uuid,integer,jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION asyncproc_worker_fail(target uuid, attempt integer, error text)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks SET status = 'failed', error_message = error
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_fail(uuid,integer,text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION asyncproc_worker_retry(target uuid, attempt integer, error text, delay_seconds double precision)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks
    SET status = 'pending', error_message = error, scheduled_at = now() + make_interval(secs => delay_seconds)
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_retry(uuid,integer,text,double precision) FROM PUBLIC;

-- A claim that ran nothing gives its attempt back, and the task waits
-- `delay_seconds`: a run cut short by the worker's own shutdown (the task did
-- not fail, the worker left), or a task this worker cannot run.
CREATE OR REPLACE FUNCTION asyncproc_worker_release(target uuid, attempt integer, reason text, delay_seconds double precision DEFAULT 0)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks
    SET status = 'pending', attempts = attempts - 1, error_message = reason,
        scheduled_at = now() + make_interval(secs => delay_seconds)
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_release(uuid,integer,text,double precision) FROM PUBLIC;

CREATE OR REPLACE FUNCTION asyncproc_worker_progress(target uuid, attempt integer, percent integer, message text)
    RETURNS void
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks SET progress = percent, progress_message = message
    WHERE task_id = target AND status = 'running' AND attempts = attempt
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_progress(uuid,integer,integer,text) FROM PUBLIC;

-- Batched completion: a worker records the outcomes of many tasks that
-- finished close together in one statement and one commit. Each row keeps the
-- fence of asyncproc_worker_complete: it is recorded only while the
-- task is still running the attempt that produced it, so a cancelled, re-queued
-- or superseded attempt records nothing.
--
-- The rows are locked in task_id order before they are changed, so that two
-- batches (two workers, or a batch and the sweep) never wait on each other in
-- a cycle. The planner settings keep each row an index probe whatever the
-- statistics say.
CREATE OR REPLACE FUNCTION asyncproc_worker_complete_many(targets uuid[], attempts_run integer[], outcomes jsonb[])
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
REVOKE EXECUTE ON FUNCTION asyncproc_worker_complete_many(uuid[],integer[],jsonb[]) FROM PUBLIC;

-- A completed task's job is finished in the statement that records the
-- outcome: one statement and one commit for many tasks and their jobs, where
-- Procrastinate would finish each job in a statement and a commit of its own
-- (an UPDATE to 'succeeded' that adds an event row, then a DELETE). The worker
-- tells Procrastinate's job manager which jobs are gone (worker/app.py).
--
-- The order is the one of every task-side change (20_procrastinate_bridge.sql,
-- "The lock order"): the task rows first, then the jobs, taken with SKIP
-- LOCKED. A job another transaction holds (a
-- cancel's abort request, the sweep) is not finished here; it is not in the
-- returned list, and Procrastinate finishes it as before.
CREATE OR REPLACE FUNCTION asyncproc_worker_complete_jobs(targets uuid[], attempts_run integer[], outcomes jsonb[], job_ids bigint[])
    RETURNS TABLE (finished_jobs bigint[], task tasks)
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
    SET enable_seqscan = off
    SET enable_bitmapscan = off
AS $$
DECLARE
    done tasks[];
    finished bigint[];
BEGIN
    IF cardinality(targets) = 1 THEN
        -- Alone, the one-row statement is cheaper than the batch's join.
        SELECT coalesce(array_agg(t), '{}') INTO done
        FROM asyncproc_worker_complete(targets[1], attempts_run[1], outcomes[1]) AS t;
    ELSE
        SELECT coalesce(array_agg(t), '{}') INTO done
        FROM asyncproc_worker_complete_many(targets, attempts_run, outcomes) AS t;
    END IF;
    WITH taken AS (
        SELECT id FROM procrastinate_jobs
        WHERE id = ANY (job_ids) AND status = 'doing'
        ORDER BY id
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM procrastinate_jobs AS jobs USING taken WHERE jobs.id = taken.id RETURNING jobs.id
    )
    SELECT coalesce(array_agg(id), '{}') INTO finished FROM gone;
    IF cardinality(done) = 0 THEN
        RETURN QUERY SELECT finished, NULL::tasks;
    ELSE
        RETURN QUERY SELECT finished, d FROM unnest(done) AS d;
    END IF;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_complete_jobs(uuid[],integer[],jsonb[],bigint[]) FROM PUBLIC;
