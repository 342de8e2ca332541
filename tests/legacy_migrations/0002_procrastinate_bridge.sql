-- The only place where our SQL touches Procrastinate. Each of its versioned
-- functions that we call is wrapped here once, so that a Procrastinate upgrade
-- changes this file's successor and nothing else.
--
-- Every dispatch job carries only the task id, in args and as its queueing
-- lock: the lock's unique index (status 'todo') makes "does this task already
-- have a queued job?" one index probe, so deferring twice is harmless.
--
-- The functions are SECURITY DEFINER: an operator's role needs rights on
-- `tasks` only, never on Procrastinate's tables, to enqueue, retry or cancel.

-- Jobs are only ever looked up by task id while 'doing', and there are few.
CREATE INDEX asyncproc_jobs_doing_task_id_idx
    ON procrastinate_jobs ((args->>'task_id'))
    WHERE status = 'doing';

-- Queue one dispatch job for each given task that has none queued yet.
CREATE FUNCTION asyncproc_defer_jobs(task_ids uuid[], priorities integer[], run_ats timestamptz[])
    RETURNS bigint[]
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    SELECT procrastinate_defer_jobs_v1(
        ARRAY(
            SELECT ROW(
                'asyncproc',
                'asyncproc.run_task',
                t.priority,
                NULL,
                t.task_id::text,
                jsonb_build_object('task_id', t.task_id),
                -- NULL for "now" spares Procrastinate a 'scheduled' event row per job.
                CASE WHEN t.run_at > now() THEN t.run_at END
            )::procrastinate_job_to_defer_v1
            FROM unnest(task_ids, priorities, run_ats) AS t(task_id, priority, run_at)
            WHERE NOT EXISTS (
                SELECT 1 FROM procrastinate_jobs AS jobs
                WHERE jobs.queueing_lock = t.task_id::text AND jobs.status = 'todo'
            )
        )
    )
$$;

-- A cancelled pending task takes its queued job with it.
CREATE FUNCTION asyncproc_delete_queued_job(task_id uuid)
    RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    SELECT procrastinate_cancel_job_v1(jobs.id, false, true)
    FROM procrastinate_jobs AS jobs
    WHERE jobs.queueing_lock = task_id::text AND jobs.status = 'todo'
$$;

-- A cancelled running task asks its worker to stop: Procrastinate notifies the
-- worker, which cancels the run (see worker/runner.py).
CREATE FUNCTION asyncproc_abort_running_job(task_id uuid)
    RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    SELECT procrastinate_cancel_job_v1(jobs.id, true, false)
    FROM procrastinate_jobs AS jobs
    WHERE jobs.args->>'task_id' = task_id::text AND jobs.status = 'doing'
$$;

-- Repairs the tasks whose dispatch job died: jobs of workers that stopped
-- sending heartbeats, and jobs that ended in error or were aborted (a worker
-- cut off mid-claim, a shutdown, a database outage). Each such job is deleted;
-- its task, if still running with no other live job, goes back to pending, and
-- if pending, gets a fresh job. Returns how many tasks were repaired.
CREATE FUNCTION asyncproc_requeue_stalled(stalled_seconds double precision)
    RETURNS integer
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    lost uuid[];
    redeferred integer;
    requeued integer;
BEGIN
    PERFORM procrastinate_prune_stalled_workers_v1(stalled_seconds);

    WITH dead AS (
        SELECT id
        FROM procrastinate_jobs
        WHERE task_name = 'asyncproc.run_task'
          AND ((status = 'doing' AND worker_id IS NULL)
               OR status IN ('failed', 'aborted', 'cancelled'))
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM procrastinate_jobs AS jobs
        USING dead
        WHERE jobs.id = dead.id
        RETURNING (jobs.args->>'task_id')::uuid AS task_id
    )
    SELECT coalesce(array_agg(DISTINCT task_id), '{}') INTO lost FROM deleted;

    -- First the pending ones, so that tasks re-queued below are not deferred twice.
    SELECT coalesce(cardinality(asyncproc_defer_jobs(array_agg(task_id), array_agg(priority), array_agg(scheduled_at))), 0)
    INTO redeferred
    FROM tasks
    WHERE task_id = ANY (lost) AND status = 'pending';

    UPDATE tasks
    SET status = 'pending',
        error_message = format('worker lost during attempt %s', tasks.attempts)
    WHERE task_id = ANY (lost)
      AND status = 'running'
      AND NOT EXISTS (
          SELECT 1 FROM procrastinate_jobs AS jobs
          WHERE jobs.status = 'doing' AND jobs.args->>'task_id' = tasks.task_id::text
      );
    GET DIAGNOSTICS requeued = ROW_COUNT;
    RETURN redeferred + requeued;
END;
$$;
