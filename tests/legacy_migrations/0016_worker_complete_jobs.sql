-- A completed task's job is finished in the statement that records the
-- outcome: one statement and one commit for many tasks and their jobs, where
-- Procrastinate would finish each job in a statement and a commit of its own
-- (an UPDATE to 'succeeded' that adds an event row, then a DELETE). The worker
-- tells Procrastinate's job manager which jobs are gone (worker/app.py).
--
-- The order is the one of every task-side change (0007): the task rows first,
-- then the jobs, taken with SKIP LOCKED. A job another transaction holds (a
-- cancel's abort request, the sweep) is not finished here; it is not in the
-- returned list, and Procrastinate finishes it as before.
CREATE FUNCTION asyncproc_worker_complete_jobs(targets uuid[], attempts_run integer[], outcomes jsonb[], job_ids bigint[])
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

REVOKE EXECUTE ON FUNCTION asyncproc_worker_complete_jobs(uuid[], integer[], jsonb[], bigint[]) FROM PUBLIC;
