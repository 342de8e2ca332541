-- Fairness between API keys. With access control on, one key's backlog must
-- not starve another key's tasks of the same priority: Procrastinate's fetch
-- takes the oldest queued job first, so one key's 10k queued tasks ran before
-- another key's task queued after them.
--
-- Each job now carries its task's owner (api_keys.id) in its args, and the
-- worker fetches through asyncproc_fetch_job instead of Procrastinate's
-- procrastinate_fetch_job_v2 (worker/app.py): among due jobs of the top
-- priority, a job of the owner with the fewest tasks running goes first, the
-- oldest first within one owner. Jobs without an owner (access control off,
-- or inserted with psql) keep Procrastinate's order. This is a function of our
-- own rather than a replacement of Procrastinate's, so that a Procrastinate
-- migration can never silently undo it.

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
            -- One probe each of the queueing-lock index and of the tasks' key (see 0007).
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

REVOKE EXECUTE ON FUNCTION asyncproc_defer_jobs(uuid[], integer[], timestamptz[]) FROM PUBLIC;

-- The fetch reads due jobs only. A job is due when its scheduled_at is NULL:
-- the defer leaves it NULL for "now", and the fetch clears it once it falls
-- due. Procrastinate's fetch walks every queued job in priority order and
-- filters on scheduled_at, so with a million tasks scheduled for tomorrow a
-- fetch that found nothing due read a million index entries (about a second).
CREATE INDEX asyncproc_jobs_scheduled_idx ON procrastinate_jobs (scheduled_at)
    WHERE status = 'todo' AND scheduled_at IS NOT NULL;
CREATE INDEX asyncproc_jobs_due_idx ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND scheduled_at IS NULL;
-- The owners that have due jobs at a priority, walked one owner at a time (a
-- skip scan), with each owner's oldest due job at that priority.
CREATE INDEX asyncproc_jobs_owner_due_idx ON procrastinate_jobs (priority, ((args->>'owner')::bigint), id)
    WHERE status = 'todo' AND scheduled_at IS NULL AND args ? 'owner';
-- How many jobs an owner has running.
CREATE INDEX asyncproc_jobs_owner_doing_idx ON procrastinate_jobs (((args->>'owner')::bigint))
    WHERE status = 'doing' AND args ? 'owner';

-- The worker's fetch. Procrastinate's contract (one job, marked doing for the
-- worker, or a row of NULLs) over asyncproc's queue, whose jobs never take a
-- Procrastinate lock.
--
-- The cost: one index probe for jobs fallen due (and one UPDATE of those, up
-- to a hundred a fetch, once each); one for the head of the queue; then, when
-- the head has an owner who has tasks running, one look per other owner with
-- due jobs at the head's priority, stopping at the first owner with nothing
-- running. Every row is taken with SKIP LOCKED, so concurrent fetches never
-- wait on each other, and the rows a fetch looked at but did not take are
-- released when it commits.
CREATE FUNCTION asyncproc_fetch_job(target_queue_names character varying[], p_worker_id bigint)
    RETURNS procrastinate_jobs
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
    -- On unanalysed tables the planner took the queue-name index and sorted
    -- the whole backlog for the head; every walk below is in index order.
    SET enable_seqscan = off
    SET enable_bitmapscan = off
    SET enable_sort = off
AS $$
DECLARE
    head procrastinate_jobs;
    head_owner bigint;
    fewest bigint;
    other record;
    running bigint;
    candidate bigint;
    chosen bigint;
    fetched procrastinate_jobs;
BEGIN
    UPDATE procrastinate_jobs SET scheduled_at = NULL
    WHERE id IN (
        SELECT id FROM procrastinate_jobs
        WHERE status = 'todo' AND scheduled_at IS NOT NULL AND scheduled_at <= now()
          AND (target_queue_names IS NULL OR queue_name = ANY (target_queue_names))
        ORDER BY scheduled_at
        LIMIT 100
        FOR UPDATE SKIP LOCKED
    );
    SELECT * INTO head FROM procrastinate_jobs
    WHERE status = 'todo' AND scheduled_at IS NULL
      AND (target_queue_names IS NULL OR queue_name = ANY (target_queue_names))
    ORDER BY priority DESC, id ASC
    LIMIT 1
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN fetched;
    END IF;
    chosen := head.id;
    head_owner := (head.args->>'owner')::bigint;
    IF head_owner IS NOT NULL THEN
        SELECT count(*) INTO fewest FROM procrastinate_jobs
        WHERE status = 'doing' AND args ? 'owner' AND (args->>'owner')::bigint = head_owner;
        IF fewest > 0 THEN
            FOR other IN
                WITH RECURSIVE owners(owner) AS (
                    (SELECT (args->>'owner')::bigint FROM procrastinate_jobs
                     WHERE status = 'todo' AND scheduled_at IS NULL AND args ? 'owner' AND priority = head.priority
                     ORDER BY (args->>'owner')::bigint LIMIT 1)
                    UNION ALL
                    SELECT (SELECT (j.args->>'owner')::bigint FROM procrastinate_jobs AS j
                            WHERE j.status = 'todo' AND j.scheduled_at IS NULL AND j.args ? 'owner'
                              AND j.priority = head.priority AND (j.args->>'owner')::bigint > owners.owner
                            ORDER BY (j.args->>'owner')::bigint LIMIT 1)
                    FROM owners
                    WHERE owners.owner IS NOT NULL
                )
                SELECT owner FROM owners WHERE owner IS NOT NULL AND owner <> head_owner
            LOOP
                SELECT count(*) INTO running FROM procrastinate_jobs
                WHERE status = 'doing' AND args ? 'owner' AND (args->>'owner')::bigint = other.owner;
                CONTINUE WHEN running >= fewest;
                SELECT id INTO candidate FROM procrastinate_jobs
                WHERE status = 'todo' AND scheduled_at IS NULL AND args ? 'owner' AND priority = head.priority
                  AND (args->>'owner')::bigint = other.owner
                  AND (target_queue_names IS NULL OR queue_name = ANY (target_queue_names))
                ORDER BY id
                LIMIT 1
                FOR UPDATE SKIP LOCKED;
                CONTINUE WHEN NOT FOUND;
                chosen := candidate;
                fewest := running;
                EXIT WHEN fewest = 0;
            END LOOP;
        END IF;
    END IF;
    UPDATE procrastinate_jobs
    SET status = 'doing', worker_id = p_worker_id
    WHERE id = chosen
    RETURNING * INTO fetched;
    RETURN fetched;
END;
$$;

REVOKE EXECUTE ON FUNCTION asyncproc_fetch_job(character varying[], bigint) FROM PUBLIC;

-- Jobs queued before this migration get their owner too, so that fairness
-- holds for the backlog an upgrade finds.
UPDATE procrastinate_jobs AS jobs
SET args = jobs.args || jsonb_build_object('owner', tasks.owner)
FROM tasks
WHERE jobs.status = 'todo' AND jobs.task_name = 'asyncproc.run_task'
  AND tasks.task_id::text = jobs.queueing_lock AND tasks.owner IS NOT NULL;
