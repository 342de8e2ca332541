-- A worker with several free slots fetches a job for each in one statement and
-- one commit (asyncproc_fetch_jobs), where Procrastinate fetches one job per
-- round trip: each pick is asyncproc_fetch_job's (0015), fairness included.
-- The worker asks for no more jobs than it has free slots, so every job fetched
-- starts at once (worker/app.py).
CREATE FUNCTION asyncproc_fetch_jobs(target_queue_names character varying[], p_worker_id bigint, how_many integer)
    RETURNS SETOF procrastinate_jobs
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    fetched procrastinate_jobs;
BEGIN
    FOR i IN 1..how_many LOOP
        fetched := asyncproc_fetch_job(target_queue_names, p_worker_id);
        EXIT WHEN fetched.id IS NULL;
        RETURN NEXT fetched;
    END LOOP;
END;
$$;

-- Jobs a worker fetched but never started, because it was stopping: their
-- tasks go back to pending with the attempt given back (a new job is queued
-- for each by the dispatch trigger), and the jobs are deleted. Task rows
-- first, then the jobs with SKIP LOCKED, as every task-side change (0007).
CREATE FUNCTION asyncproc_worker_return_jobs(job_ids bigint[])
    RETURNS integer
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    job record;
    returned integer := 0;
BEGIN
    FOR job IN
        SELECT args FROM procrastinate_jobs
        WHERE id = ANY (job_ids) AND status = 'doing' AND jsonb_typeof(args->'claimed') = 'object'
        ORDER BY args->>'task_id'
    LOOP
        PERFORM asyncproc_worker_release((job.args->>'task_id')::uuid, (job.args->'claimed'->>'attempts')::integer,
                                         'not started: its worker was stopping; attempt not counted');
        returned := returned + 1;
    END LOOP;
    DELETE FROM procrastinate_jobs
    WHERE id IN (SELECT id FROM procrastinate_jobs WHERE id = ANY (job_ids) AND status = 'doing' FOR UPDATE SKIP LOCKED);
    RETURN returned;
END;
$$;

REVOKE EXECUTE ON FUNCTION asyncproc_fetch_jobs(character varying[], bigint, integer),
                           asyncproc_worker_return_jobs(bigint[]) FROM PUBLIC;
