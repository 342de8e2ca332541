-- The wrappers of Procrastinate's versioned SQL functions that our dispatch
-- calls (procrastinate_defer_jobs_v1, procrastinate_cancel_job_v1). Each is
-- wrapped here once, so that a Procrastinate upgrade that renames one changes
-- this file. Our SQL touches Procrastinate in a few other places, each in a
-- file named procrastinate_*: the claim and fetch (30_procrastinate_claim_and_fetch.sql),
-- the sweep (41_procrastinate_sweep.sql), our indexes on procrastinate_jobs (the
-- baseline's last section); and asyncproc_worker_complete_jobs
-- (31_worker_outcomes.sql) deletes the jobs it finishes. Procrastinate's own
-- schema is 0001's.
--
-- Every dispatch job carries the task id, in args and as its queueing
-- lock: the lock's unique index (status 'todo') makes "does this task already
-- have a queued job?" one index probe, so deferring twice is harmless. It
-- carries the task's owner too, for the fair fetch (30_procrastinate_claim_and_fetch.sql).
--
-- The functions are SECURITY DEFINER: an operator's role needs rights on
-- `tasks` only, never on Procrastinate's tables, to enqueue, retry or cancel.
--
-- The lock order. Two kinds of transaction touch both tables:
--   * a job fetch holds a job row and then claims its task (job -> task);
--   * a change of a task (insert, retry, cancel, reschedule, by the API, the
--     CLI or psql) holds the task row and then changes its job (task -> job).
-- Every step of the second kind that locks a job uses SKIP LOCKED, and the
-- claim takes the task with SKIP LOCKED too, so no transaction ever waits for
-- a lock while holding one of the other table: there is no cycle to deadlock
-- on. Whatever a skip leaves undone is finished by the fetch itself (a job
-- whose task it cannot claim is consumed and, if the task is still pending,
-- deferred again) or by the sweep's reconciliation (asyncproc_sweep).

-- A task's queued job, locked without waiting; NULL when there is none or
-- when another transaction holds it.
CREATE OR REPLACE FUNCTION asyncproc_lock_queued_job(target uuid)
    RETURNS bigint
    LANGUAGE sql
    SET search_path FROM CURRENT
AS $$
    SELECT id FROM procrastinate_jobs
    WHERE queueing_lock = target::text AND status = 'todo'
    FOR UPDATE SKIP LOCKED
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_lock_queued_job(uuid) FROM PUBLIC;

-- The owner of a task, as its job's args show it; added to new jobs only.
CREATE OR REPLACE FUNCTION asyncproc_defer_jobs(task_ids uuid[], priorities integer[], run_ats timestamptz[])
    RETURNS bigint[]
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
    SET enable_seqscan = off
    SET enable_bitmapscan = off
AS $$
    SELECT procrastinate_defer_jobs_v1(
        ARRAY(
            SELECT ROW(
                'asyncproc',
                'asyncproc.run_task',
                t.priority,
                NULL,
                t.task_id::text,
                jsonb_build_object('task_id', t.task_id)
                    || CASE WHEN owners.owner IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('owner', owners.owner) END,
                -- NULL for "now" spares Procrastinate a 'scheduled' event row per job.
                CASE WHEN t.run_at > now() THEN t.run_at END
            )::procrastinate_job_to_defer_v1
            FROM unnest(task_ids, priorities, run_ats) AS t(task_id, priority, run_at)
            -- One probe each of the queueing-lock index and of the tasks' key.
            LEFT JOIN LATERAL (
                SELECT 1 AS found FROM procrastinate_jobs AS jobs
                WHERE jobs.queueing_lock = t.task_id::text AND jobs.status = 'todo'
                LIMIT 1
            ) AS queued ON true
            LEFT JOIN LATERAL (
                SELECT tasks.owner FROM tasks WHERE tasks.task_id = t.task_id
            ) AS owners ON true
            WHERE queued.found IS NULL
        )
    )
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_defer_jobs(uuid[],integer[],timestamp with time zone[]) FROM PUBLIC;

-- A cancelled pending task takes its queued job with it, unless a fetch holds
-- that job right now: the fetch then finds the task cancelled and runs nothing.
CREATE OR REPLACE FUNCTION asyncproc_delete_queued_job(task_id uuid)
    RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    SELECT procrastinate_cancel_job_v1(job_id, false, true)
    FROM asyncproc_lock_queued_job(task_id) AS job_id
    WHERE job_id IS NOT NULL
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_delete_queued_job(uuid) FROM PUBLIC;

-- A cancelled running task asks its worker to stop. A job that another
-- transaction holds is finishing or being swept: its run is over, and its
-- outcome write will find the task cancelled.
CREATE OR REPLACE FUNCTION asyncproc_abort_running_job(task_id uuid)
    RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    SELECT procrastinate_cancel_job_v1(jobs.id, true, false)
    FROM procrastinate_jobs AS jobs
    WHERE jobs.id IN (
        SELECT id FROM procrastinate_jobs
        WHERE args->>'task_id' = task_id::text AND status = 'doing'
        FOR UPDATE SKIP LOCKED
    )
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_abort_running_job(uuid) FROM PUBLIC;

-- A pending task moved in time or priority gets a job that says so. An edit
-- that finds the queued job held (by a fetch, or a psql session) is remembered
-- and applied by the next sweep, instead of being dropped.
CREATE OR REPLACE FUNCTION asyncproc_redefer_job(task_id uuid, priority integer, run_at timestamptz)
    RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    queued bigint;
BEGIN
    queued := asyncproc_lock_queued_job(task_id);
    IF queued IS NULL AND EXISTS (
        SELECT 1 FROM procrastinate_jobs WHERE queueing_lock = task_id::text AND status = 'todo'
    ) THEN
        INSERT INTO asyncproc_redefer_wanted (task_id) VALUES (asyncproc_redefer_job.task_id) ON CONFLICT DO NOTHING;
        RETURN;
    END IF;
    IF queued IS NOT NULL THEN
        PERFORM procrastinate_cancel_job_v1(queued, false, true);
    END IF;
    PERFORM asyncproc_defer_jobs(ARRAY[task_id], ARRAY[priority], ARRAY[run_at]);
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_redefer_job(uuid,integer,timestamp with time zone) FROM PUBLIC;
