-- The sweep drops only its own stray jobs. Its check of the head of the queue
-- (0020) took every queued job whose arguments name no pending task as a
-- stray, whatever its task: the jobs of another Procrastinate app sharing the
-- database were deleted within a sweep of being queued. The head is now that
-- of asyncproc's own jobs, and only those are ever dropped. Another app's
-- jobs queued ahead of ours lengthen the walk, not the window.

CREATE OR REPLACE FUNCTION asyncproc_sweep(stalled_seconds double precision, window_size integer DEFAULT 1000)
    RETURNS TABLE (requeued integer, failed integer, redeferred integer, dropped integer)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
    SET asyncproc.writer = 'worker'
    -- Each step walks an index over the few rows it wants (the LATERAL
    -- probes cannot become joins over the whole queue); on unanalysed tables
    -- the planner would read the whole backlog instead.
    SET enable_seqscan = off
    SET enable_bitmapscan = off
AS $$
DECLARE
    lost uuid[];
    adrift record;
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
        RETURNING (jobs.args->>'task_id')::uuid AS task_id
    )
    SELECT coalesce(array_agg(task_id), '{}') INTO lost FROM deleted;

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
