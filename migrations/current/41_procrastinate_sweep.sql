-- The sweep: repairs dead jobs and restores the invariant that ties the two
-- tables (every pending task has exactly one queued job carrying its time and
-- priority; every running task has one doing job; nothing else). It takes
-- every lock with SKIP LOCKED, so it never waits and never deadlocks; what it
-- skips, the next sweep sees. Pending tasks are checked oldest first, a
-- window per operation: a task without a job stays pending while the tasks
-- around it drain, so it reaches the head of its window. It also releases the
-- jobs of workers that left thread handlers running (once their lease has
-- lapsed), applies the edits asyncproc_redefer_job remembered, and records
-- the runs it recovers as lost in the attempts ledger.
--
-- It is Procrastinate-facing: it reads and writes procrastinate_jobs and calls
-- Procrastinate's procrastinate_cancel_job_v1 and
-- procrastinate_prune_stalled_workers_v1, so a Procrastinate upgrade reviews it.
--
-- Planned for statistics that predate a backlog. Statistics taken when every
-- task had finished (a month of history analysed, then a million tasks
-- queued) say no task is pending: every index on status then looks like the
-- cheapest way to any pending task, and the planner once joined the window of
-- oldest pending tasks back to `tasks` by walking every pending task for each
-- one of them (over a minute per sweep at a million pending; the workers'
-- throughput fell to a fifth), and probed each queued job at the head of the
-- queue for its pending task by walking every pending task too. So the window
-- carries what the check needs, and every lookup of a task by its id goes by key.
--
-- The sweep drops only its own stray jobs: the head of the queue it checks is
-- that of asyncproc's own jobs (task_name 'asyncproc.run_task'), so the jobs
-- of another Procrastinate app sharing the database are never deleted.
-- Another app's jobs queued ahead of ours lengthen the walk, not the window.
CREATE OR REPLACE FUNCTION asyncproc_sweep(stalled_seconds double precision, window_size integer DEFAULT 1000)
    RETURNS TABLE (requeued integer, failed integer, redeferred integer, dropped integer)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
    SET asyncproc.writer = 'worker'
    SET asyncproc.attempt_outcome = 'lost'
    -- Each step walks an index over the few rows it wants (the LATERAL
    -- probes cannot become joins over the whole queue); on unanalysed tables
    -- the planner would read the whole backlog instead.
    SET enable_seqscan = off
    SET enable_bitmapscan = off
AS $$
DECLARE
    abandoned jsonb[];
    job jsonb;
    adrift record;
    wanted uuid;
    strays bigint[];
BEGIN
    requeued := 0; failed := 0; redeferred := 0; dropped := 0;
    PERFORM procrastinate_prune_stalled_workers_v1(stalled_seconds);

    -- Jobs whose worker is gone, or that ended in error or were aborted.
    WITH dead AS (
        SELECT id FROM procrastinate_jobs
        WHERE task_name = 'asyncproc.run_task'
          AND (status IN ('failed', 'aborted', 'cancelled') OR (status = 'doing' AND worker_id IS NULL))
        FOR UPDATE SKIP LOCKED
    ), deleted AS (
        DELETE FROM procrastinate_jobs AS jobs USING dead
        WHERE jobs.id = dead.id
        RETURNING jobs.args
    )
    SELECT coalesce(array_agg(args) FILTER (WHERE args->'abandoned' = 'true'::jsonb), '{}') INTO abandoned FROM deleted;

    -- A run its worker abandoned at exit was cut short by a shutdown: its
    -- attempt is given back. The worker's lease has lapsed, so its process,
    -- and the thread, are gone.
    FOREACH job IN ARRAY abandoned LOOP
        PERFORM asyncproc_worker_release((job->>'task_id')::uuid, (job->'claimed'->>'attempts')::integer,
                                         'interrupted by worker shutdown; attempt not counted');
    END LOOP;

    -- Running tasks with no doing job: their run is lost. Each counts as an
    -- attempt; one that used the last attempt fails, so a task that kills its
    -- worker cannot loop.
    WITH orphans AS (
        SELECT task_id FROM tasks
        WHERE status = 'running'
          AND NOT EXISTS (
              -- A doing job that claimed nothing is a no-op on its way out; it runs nothing.
              SELECT 1 FROM procrastinate_jobs AS jobs
              WHERE jobs.status = 'doing' AND jobs.args->>'task_id' = tasks.task_id::text
                AND jsonb_typeof(jobs.args->'claimed') = 'object')
        FOR NO KEY UPDATE SKIP LOCKED
    ), changed AS (
        UPDATE tasks
        SET status = CASE WHEN attempts < max_attempts THEN 'pending' ELSE 'failed' END,
            error_message = CASE WHEN attempts < max_attempts
                THEN format('worker lost during attempt %s of %s (killed, crashed or stalled)', attempts, max_attempts)
                ELSE format('worker lost during attempt %s of %s (killed, crashed or stalled); no attempt left', attempts, max_attempts)
            END
        FROM orphans
        WHERE tasks.task_id = orphans.task_id
        RETURNING tasks.status
    )
    SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'failed')
    INTO requeued, failed
    FROM changed;

    -- Edits that found their job held. One that finds it held again stays for the next sweep.
    FOR wanted IN SELECT task_id FROM asyncproc_redefer_wanted FOR UPDATE SKIP LOCKED LOOP
        SELECT tasks.task_id, tasks.priority, tasks.scheduled_at INTO adrift
        FROM tasks WHERE tasks.task_id = wanted AND (tasks.status = 'pending') IS TRUE
        FOR NO KEY UPDATE SKIP LOCKED;
        IF NOT FOUND AND EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = wanted AND (tasks.status = 'pending') IS TRUE) THEN
            CONTINUE;
        END IF;
        IF FOUND THEN
            IF asyncproc_lock_queued_job(wanted) IS NULL AND EXISTS (
                SELECT 1 FROM procrastinate_jobs WHERE queueing_lock = wanted::text AND status = 'todo'
            ) THEN
                CONTINUE;
            END IF;
            PERFORM asyncproc_delete_queued_job(wanted);
            redeferred := redeferred + coalesce(cardinality(asyncproc_defer_jobs(
                ARRAY[adrift.task_id], ARRAY[adrift.priority], ARRAY[adrift.scheduled_at])), 0);
        END IF;
        DELETE FROM asyncproc_redefer_wanted WHERE task_id = wanted;
    END LOOP;

    -- Pending tasks with no queued job, or one with the wrong time or priority.
    BEGIN
        FOR adrift IN
            WITH RECURSIVE operations AS (
                (SELECT operation FROM tasks WHERE status = 'pending' ORDER BY operation LIMIT 1)
                UNION ALL
                SELECT (SELECT t.operation FROM tasks AS t
                        WHERE t.status = 'pending' AND t.operation > operations.operation
                        ORDER BY t.operation LIMIT 1)
                FROM operations WHERE operations.operation IS NOT NULL
            ), candidates AS (
                SELECT w.task_id, w.priority, w.scheduled_at, jobs.id AS job_id
                FROM operations
                CROSS JOIN LATERAL (
                    SELECT t.task_id, t.priority, t.scheduled_at FROM tasks AS t
                    WHERE t.status = 'pending' AND t.operation = operations.operation
                    ORDER BY t.created_at LIMIT window_size
                ) AS w
                LEFT JOIN LATERAL (
                    SELECT j.id, j.priority, j.scheduled_at FROM procrastinate_jobs AS j
                    WHERE j.queueing_lock = w.task_id::text AND j.status = 'todo'
                    LIMIT 1
                ) AS jobs ON true
                WHERE operations.operation IS NOT NULL
                  AND (jobs.id IS NULL
                       OR jobs.priority <> w.priority
                       OR (w.scheduled_at > now() AND jobs.scheduled_at IS DISTINCT FROM w.scheduled_at)
                       OR (w.scheduled_at <= now() AND jobs.scheduled_at > now()))
            )
            -- Each candidate's row, locked and still as it was found, by its
            -- key. `IS TRUE` keeps the status out of the index conditions:
            -- under statistics from before a backlog (no task pending), an
            -- index on status looks like the cheapest way to reach any row,
            -- and the join walked every pending task for each candidate.
            SELECT tasks.task_id, tasks.priority, tasks.scheduled_at, candidates.job_id
            FROM candidates
            JOIN tasks ON tasks.task_id = candidates.task_id
            WHERE (tasks.status = 'pending') IS TRUE
              AND tasks.priority = candidates.priority
              AND tasks.scheduled_at = candidates.scheduled_at
            FOR NO KEY UPDATE OF tasks SKIP LOCKED
        LOOP
            IF adrift.job_id IS NOT NULL THEN
                IF asyncproc_lock_queued_job(adrift.task_id) IS DISTINCT FROM adrift.job_id THEN
                    CONTINUE;
                END IF;
                PERFORM procrastinate_cancel_job_v1(adrift.job_id, false, true);
            END IF;
            redeferred := redeferred + coalesce(cardinality(asyncproc_defer_jobs(
                ARRAY[adrift.task_id], ARRAY[adrift.priority], ARRAY[adrift.scheduled_at])), 0);
        END LOOP;
    EXCEPTION WHEN unique_violation THEN
        -- A fetch queued one of these tasks again meanwhile; the next sweep looks again.
        redeferred := 0;
    END;

    -- Our queued jobs at the head of the queue whose task is not pending, or gone,
    -- looked up by id: a join would walk the whole queue. `IS TRUE`, as above:
    -- the head of the queue is its newest tasks, at the far end of every index
    -- on status, where a walk from the oldest pending task reaches them last.
    SELECT coalesce(array_agg(head.id), '{}') INTO strays
    FROM (
        SELECT id, args->>'task_id' AS task_id FROM procrastinate_jobs
        WHERE status = 'todo' AND task_name = 'asyncproc.run_task'
        ORDER BY priority DESC, id ASC
        LIMIT window_size
    ) AS head
    LEFT JOIN LATERAL (
        SELECT 1 AS found FROM tasks
        WHERE tasks.task_id = CASE WHEN head.task_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                   THEN head.task_id::uuid END
          AND (tasks.status = 'pending') IS TRUE
        LIMIT 1
    ) AS pending ON true
    WHERE pending.found IS NULL;
    WITH stray AS (
        SELECT id FROM procrastinate_jobs
        WHERE id = ANY (strays) AND status = 'todo' AND task_name = 'asyncproc.run_task'
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM procrastinate_jobs AS jobs USING stray WHERE jobs.id = stray.id RETURNING 1
    )
    SELECT count(*) INTO dropped FROM gone;

    RETURN NEXT;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_sweep(double precision,integer) FROM PUBLIC;
