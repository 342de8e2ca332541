-- The worker's side of the queue, on Procrastinate's procrastinate_jobs:
-- fetching jobs fairly, claiming their tasks in the same transaction, and
-- giving back jobs that were fetched but never run. These touch
-- Procrastinate's table and rely on its fetch contract, not on its functions.

-- A task is claimed (pending -> running, attempts + 1) in the same transaction
-- in which a worker fetches its dispatch job, and the claimed row travels to
-- the worker inside the fetched job's args, under "claimed" (null when the task
-- was no longer pending). This saves the worker one round trip and one commit
-- per task, and a worker cannot die between fetching a job and claiming
-- its task.
--
-- The task is taken with SKIP LOCKED: a task that another transaction holds
-- (an operator's UPDATE, a psql SELECT ... FOR UPDATE) costs this fetch one
-- consumed job, which asyncproc_requeue_unclaimed below defers again a second
-- later, never a wait. A task is claimed only when it is pending, due and has
-- an attempt left; one with no attempt left fails here. Its operation's limits
-- are checked first (40_limits.sql). The payload travels as JSON text, so that
-- no payload, however deep or large its numbers, can fail the fetch itself:
-- the worker decodes it where a failure fails that task only. The claim opens
-- the run's row in the attempts ledger.
CREATE OR REPLACE FUNCTION asyncproc_claim_on_fetch() RETURNS trigger
    LANGUAGE plpgsql
    SET asyncproc.writer = 'worker'
AS $$
DECLARE
    target tasks%ROWTYPE;
    claimed jsonb;
    held text;
BEGIN
    IF NEW.args->>'task_id' !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        NEW.args := NEW.args || jsonb_build_object('claimed', NULL);
        RETURN NEW;
    END IF;
    SELECT * INTO target FROM tasks
    WHERE task_id = (NEW.args->>'task_id')::uuid
    FOR NO KEY UPDATE SKIP LOCKED;
    IF FOUND AND target.status = 'pending' AND target.scheduled_at <= now() THEN
        IF target.attempts >= target.max_attempts THEN
            UPDATE tasks
            SET status = 'failed',
                error_message = format('no attempt left (%s of %s used); last error: %s',
                                       target.attempts, target.max_attempts, coalesce(target.error_message, 'none'))
            WHERE task_id = target.task_id;
        ELSE
            held := asyncproc_operation_admit(target.operation);
            IF held IS NULL THEN
                UPDATE tasks
                SET status = 'running', attempts = attempts + 1, started_at = now(), progress = NULL,
                    progress_message = NULL, wait_reason = NULL
                WHERE task_id = target.task_id
                RETURNING * INTO target;
                INSERT INTO asyncproc_attempts (task_id, attempt, worker_id, host, pid, started_at)
                SELECT target.task_id, target.attempts, NEW.worker_id, hosts.host, hosts.pid, target.started_at
                FROM (SELECT NEW.worker_id AS worker_id) AS me
                LEFT JOIN asyncproc_worker_hosts AS hosts ON hosts.worker_id = me.worker_id;
                claimed := to_jsonb(target) - 'payload' || jsonb_build_object('payload_json', target.payload::text);
            ELSE
                -- For asyncproc_park_held, after the fetch; the job's args stay as the worker expects them.
                PERFORM set_config('asyncproc.held', held, true);
            END IF;
        END IF;
    END IF;
    NEW.args := NEW.args || jsonb_build_object('claimed', claimed);
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS asyncproc_claim_on_fetch ON procrastinate_jobs;
CREATE TRIGGER asyncproc_claim_on_fetch
    BEFORE UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'todo' AND NEW.status = 'doing' AND NEW.task_name = 'asyncproc.run_task')
    EXECUTE FUNCTION asyncproc_claim_on_fetch();

-- A fetched job that claimed nothing is consumed; if its task is still
-- pending (held by another transaction, or not yet due), a new job is queued
-- for it: at its time, or a second from now when it was only held. The old
-- job already left the queue in this transaction, so this is no duplicate.
CREATE OR REPLACE FUNCTION asyncproc_requeue_unclaimed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM asyncproc_defer_jobs(
        ARRAY[task_id], ARRAY[priority],
        ARRAY[CASE WHEN scheduled_at > now() THEN scheduled_at ELSE now() + interval '1 second' END])
    FROM tasks
    WHERE task_id::text = NEW.args->>'task_id' AND status = 'pending';
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS asyncproc_requeue_unclaimed ON procrastinate_jobs;
CREATE TRIGGER asyncproc_requeue_unclaimed
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'todo' AND NEW.status = 'doing' AND NEW.task_name = 'asyncproc.run_task'
          AND NEW.args->'claimed' = 'null'::jsonb)
    EXECUTE FUNCTION asyncproc_requeue_unclaimed();

-- A held task is parked: until its next rate token, or, held by pause or
-- max_running, until a wake (40_limits.sql; a minute at most, should a wake be
-- missed). A task held back only because another transaction had its
-- operation's limits row waits a second (or until a task of its operation
-- frees a place, which wakes it), not the minute of a pause.
-- Its job was consumed by the fetch, so moving scheduled_at queues the new one
-- (the dispatch trigger of 21_dispatch.sql); this trigger runs before
-- asyncproc_requeue_unclaimed (triggers fire in name order), which then finds
-- that job queued.
CREATE OR REPLACE FUNCTION asyncproc_park_held() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    held text := nullif(current_setting('asyncproc.held', true), '');
    rate double precision;
BEGIN
    IF held IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('asyncproc.held', '', true);
    SELECT rate_per_second INTO rate FROM asyncproc_operation_settings
    WHERE operation = (SELECT operation FROM tasks WHERE task_id = (NEW.args->>'task_id')::uuid);
    UPDATE tasks
    SET wait_reason = held,
        scheduled_at = now() + CASE WHEN held LIKE 'rate:%' THEN make_interval(secs => 1 / rate)
                                    WHEN held LIKE 'busy:%' THEN interval '1 second'
                                    ELSE interval '1 minute' END
    WHERE task_id = (NEW.args->>'task_id')::uuid AND status = 'pending';
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS asyncproc_park_held ON procrastinate_jobs;
CREATE TRIGGER asyncproc_park_held
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'todo' AND NEW.status = 'doing' AND NEW.task_name = 'asyncproc.run_task'
          AND NEW.args->'claimed' = 'null'::jsonb)
    EXECUTE FUNCTION asyncproc_park_held();

-- Fairness between API keys. With access control on, one key's backlog must
-- not starve another key's tasks of the same priority: Procrastinate's fetch
-- takes the oldest queued job first, so one key's 10k queued tasks ran before
-- another key's task queued after them.
--
-- Each job carries its task's owner (api_keys.id) in its args, and the
-- worker fetches through asyncproc_fetch_job instead of Procrastinate's
-- procrastinate_fetch_job_v2 (worker/app.py): among due jobs of the top
-- priority, a job of the owner with the fewest tasks running goes first, the
-- oldest first within one owner. Jobs without an owner (access control off,
-- or inserted with psql) keep Procrastinate's order. This is a function of our
-- own rather than a replacement of Procrastinate's, so that a Procrastinate
-- migration can never silently undo it.
--
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
CREATE OR REPLACE FUNCTION asyncproc_fetch_job(target_queue_names character varying[], p_worker_id bigint)
    RETURNS procrastinate_jobs
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
    -- On unanalysed tables the planner took the queue-name index and sorted
    -- the whole backlog for the head; every walk below is in index order.
    SET enable_seqscan = off
    SET enable_bitmapscan = off
    SET enable_sort = off
    -- The fetch's statements are planned once per session. PL/pgSQL plans a
    -- statement afresh for its first five calls and then keeps a generic plan
    -- only if its estimated cost is no higher than the fresh plans': with a
    -- million jobs queued for later it never was, so every fetch planned its
    -- statements again, 0.25 ms of an empty fetch's 0.5 ms, twice per dispatch
    -- (the job, then the look that finds no more). Every statement in it is
    -- written to walk an index whatever the parameters, so the generic plan is
    -- the same walk; tests/integration/test_plans.py checks both.
    SET plan_cache_mode = force_generic_plan
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
REVOKE EXECUTE ON FUNCTION asyncproc_fetch_job(character varying[],bigint) FROM PUBLIC;

-- A worker with several free slots fetches a job for each in one statement and
-- one commit (asyncproc_fetch_jobs), where Procrastinate fetches one job per
-- round trip: each pick is asyncproc_fetch_job's, fairness included.
-- The worker asks for no more jobs than it has free slots, so every job fetched
-- starts at once (worker/app.py).
CREATE OR REPLACE FUNCTION asyncproc_fetch_jobs(target_queue_names character varying[], p_worker_id bigint, how_many integer)
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
REVOKE EXECUTE ON FUNCTION asyncproc_fetch_jobs(character varying[],bigint,integer) FROM PUBLIC;

-- Jobs a worker fetched but never started, because it was stopping: their
-- tasks go back to pending with the attempt given back (a new job is queued
-- for each by the dispatch trigger), and the jobs are deleted. Task rows
-- first, then the jobs with SKIP LOCKED, as every task-side change
-- (20_procrastinate_bridge.sql, "The lock order").
CREATE OR REPLACE FUNCTION asyncproc_worker_return_jobs(job_ids bigint[])
    RETURNS integer
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
    -- Fetched jobs returned unstarted leave no run behind in the attempts ledger.
    SET asyncproc.attempt_outcome = 'unstarted'
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
REVOKE EXECUTE ON FUNCTION asyncproc_worker_return_jobs(bigint[]) FROM PUBLIC;

-- A worker about to exit with thread handlers it cannot stop marks their jobs;
-- the sweep gives their attempts back once the worker's lease has lapsed.
CREATE OR REPLACE FUNCTION asyncproc_worker_abandon_jobs(job_ids bigint[])
    RETURNS integer
    LANGUAGE sql
    SET search_path FROM CURRENT
AS $$
    WITH marked AS (
        UPDATE procrastinate_jobs SET args = args || '{"abandoned": true}'
        WHERE id = ANY (job_ids) AND status = 'doing'
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_worker_abandon_jobs(bigint[]) FROM PUBLIC;
