-- Dispatch and recovery with one lock order, bounded attempts, reconciliation
-- and a real worker identity. Replaces the dispatch functions of 0002, 0003
-- and 0006 (migrations are forward-only, so they are redefined here).
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
--
-- The worker's identity. Claiming a task and recording its outcome are the
-- worker's alone. The functions that do so run with the transaction-local
-- setting asyncproc.writer = 'worker' (their SET clause), which the status
-- machine checks. Any connection name works for the worker; a psql session
-- does not get the worker's rights by naming itself after it. (Anyone may
-- still SET the variable by hand: this guards against mistakes, as before.)

-- A task's queued job, locked without waiting; NULL when there is none or
-- when another transaction holds it.
CREATE FUNCTION asyncproc_lock_queued_job(target uuid)
    RETURNS bigint
    LANGUAGE sql
    SET search_path FROM CURRENT
AS $$
    SELECT id FROM procrastinate_jobs
    WHERE queueing_lock = target::text AND status = 'todo'
    FOR UPDATE SKIP LOCKED
$$;

-- Queue one dispatch job for each given task that has none queued yet. The
-- queued-job check is one probe of the queueing-lock index per task, whatever
-- the statistics say: a LATERAL subquery with LIMIT 1 can only run per task,
-- with its id as the key. (Written as NOT EXISTS, the planner, on a new or
-- unanalysed table, read every queued job for each enqueue: a one-row INSERT
-- ran ten times slower behind 10k queued jobs.)
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
                jsonb_build_object('task_id', t.task_id),
                -- NULL for "now" spares Procrastinate a 'scheduled' event row per job.
                CASE WHEN t.run_at > now() THEN t.run_at END
            )::procrastinate_job_to_defer_v1
            FROM unnest(task_ids, priorities, run_ats) AS t(task_id, priority, run_at)
            LEFT JOIN LATERAL (
                SELECT 1 AS found FROM procrastinate_jobs AS jobs
                WHERE jobs.queueing_lock = t.task_id::text AND jobs.status = 'todo'
                LIMIT 1
            ) AS queued ON true
            WHERE queued.found IS NULL
        )
    )
$$;

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

-- A pending task whose time or priority changed gets a job that carries the
-- new ones: the queued job is replaced (Procrastinate has no call to edit one).
CREATE FUNCTION asyncproc_redefer_job(task_id uuid, priority integer, run_at timestamptz)
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
        -- A fetch holds it: it re-reads the task's time when it claims.
        RETURN;
    END IF;
    IF queued IS NOT NULL THEN
        PERFORM procrastinate_cancel_job_v1(queued, false, true);
    END IF;
    PERFORM asyncproc_defer_jobs(ARRAY[task_id], ARRAY[priority], ARRAY[run_at]);
END;
$$;

-- The status machine, with the worker known by asyncproc.writer and the
-- worker's columns guarded on every update, not only on status changes.
CREATE OR REPLACE FUNCTION asyncproc_tasks_before_update() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    by_worker boolean := current_setting('asyncproc.writer', true) IS NOT DISTINCT FROM 'worker';
    allowed boolean;
BEGIN
    NEW.updated_at := now();
    IF NEW.task_id <> OLD.task_id THEN
        RAISE EXCEPTION 'a task''s id cannot change (task %)', OLD.task_id
            USING ERRCODE = 'check_violation';
    END IF;
    -- The outcome fence compares attempts: a change by anyone else would let a
    -- superseded run record its outcome, or refuse the live one's.
    IF NOT by_worker AND (NEW.attempts IS DISTINCT FROM OLD.attempts
                          OR NEW.started_at IS DISTINCT FROM OLD.started_at
                          OR NEW.result IS DISTINCT FROM OLD.result
                          OR NEW.progress IS DISTINCT FROM OLD.progress
                          OR NEW.progress_message IS DISTINCT FROM OLD.progress_message) THEN
        RAISE EXCEPTION 'attempts, started_at, result and progress are written by the worker only (task %)', OLD.task_id
            USING ERRCODE = 'check_violation',
                  HINT = 'operators change status (retry, cancel), scheduled_at, priority, max_attempts and payload';
    END IF;
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;

    allowed := CASE OLD.status
        WHEN 'pending'   THEN NEW.status = 'cancelled'
                              OR (by_worker AND (NEW.status = 'running'
                                                 OR (NEW.status = 'failed' AND OLD.attempts >= OLD.max_attempts)))
        WHEN 'running'   THEN NEW.status = 'cancelled'
                              OR (by_worker AND NEW.status IN ('completed', 'failed', 'pending'))
        WHEN 'failed'    THEN NEW.status = 'pending'
        WHEN 'cancelled' THEN NEW.status = 'pending'
        ELSE false
    END;
    IF NOT allowed THEN
        RAISE EXCEPTION 'invalid task status transition: % -> % (task %)', OLD.status, NEW.status, OLD.task_id
            USING ERRCODE = 'check_violation',
                  HINT = CASE
                      WHEN OLD.status = 'completed' THEN 'a completed task is final'
                      WHEN OLD.status IN ('pending', 'running') AND NEW.status = 'pending'
                          THEN 'the task is still queued or running: cancel it first, or wait for it to fail'
                      ELSE 'operators may retry (failed|cancelled -> pending) and cancel (pending|running -> cancelled); the worker does the rest'
                  END;
    END IF;

    IF NEW.status IN ('completed', 'failed', 'cancelled') THEN
        NEW.completed_at := now();
    END IF;

    IF OLD.status IN ('failed', 'cancelled') THEN
        -- A retry: the task runs again from scratch, with at least one more attempt.
        NEW.result := NULL;
        NEW.completed_at := NULL;
        NEW.progress := NULL;
        NEW.progress_message := NULL;
        NEW.max_attempts := GREATEST(NEW.max_attempts, OLD.attempts + 1);
        IF NEW.scheduled_at IS NOT DISTINCT FROM OLD.scheduled_at THEN
            NEW.scheduled_at := now();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

-- Any move back to pending queues a new dispatch job; a cancelled task drops
-- its queued job or asks its worker to stop; a pending task moved in time or
-- priority gets a job that says so.
CREATE OR REPLACE FUNCTION asyncproc_tasks_dispatch_changed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = 'pending' AND OLD.status = 'pending' THEN
        PERFORM asyncproc_redefer_job(NEW.task_id, NEW.priority, NEW.scheduled_at);
    ELSIF NEW.status = 'pending' THEN
        PERFORM asyncproc_defer_jobs(ARRAY[NEW.task_id], ARRAY[NEW.priority], ARRAY[NEW.scheduled_at]);
    ELSIF OLD.status = 'pending' THEN
        PERFORM asyncproc_delete_queued_job(NEW.task_id);
    ELSE
        PERFORM asyncproc_abort_running_job(NEW.task_id);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER tasks_dispatch_changed ON tasks;
CREATE TRIGGER tasks_dispatch_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN ((NEW.status = 'pending' AND OLD.status <> 'pending')
          OR (NEW.status = 'cancelled' AND OLD.status <> 'cancelled')
          OR (NEW.status = 'pending' AND OLD.status = 'pending'
              AND (NEW.scheduled_at IS DISTINCT FROM OLD.scheduled_at
                   OR NEW.priority IS DISTINCT FROM OLD.priority)))
    EXECUTE FUNCTION asyncproc_tasks_dispatch_changed();

-- The claim, in the fetch's transaction (see 0006). The task is taken with
-- SKIP LOCKED: a task that another transaction holds (an operator's UPDATE,
-- a psql SELECT ... FOR UPDATE) costs this fetch one consumed job, which the
-- AFTER trigger below defers again a second later, never a wait. A task is
-- claimed only when it is pending, due and has an attempt left; one with no
-- attempt left fails here. The payload travels as JSON text, so that no
-- payload, however deep or large its numbers, can fail the fetch itself: the
-- worker decodes it where a failure fails that task only.
CREATE OR REPLACE FUNCTION asyncproc_claim_on_fetch() RETURNS trigger
    LANGUAGE plpgsql
    SET asyncproc.writer = 'worker'
AS $$
DECLARE
    target tasks%ROWTYPE;
    claimed jsonb;
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
            UPDATE tasks
            SET status = 'running', attempts = attempts + 1, started_at = now(), progress = NULL, progress_message = NULL
            WHERE task_id = target.task_id
            RETURNING * INTO target;
            claimed := to_jsonb(target) - 'payload' || jsonb_build_object('payload_json', target.payload::text);
        END IF;
    END IF;
    NEW.args := NEW.args || jsonb_build_object('claimed', claimed);
    RETURN NEW;
END;
$$;

-- A fetched job that claimed nothing is consumed; if its task is still
-- pending (held by another transaction, or not yet due), a new job is queued
-- for it: at its time, or a second from now when it was only held. The old
-- job already left the queue in this transaction, so this is no duplicate.
CREATE FUNCTION asyncproc_requeue_unclaimed() RETURNS trigger
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

CREATE TRIGGER asyncproc_requeue_unclaimed
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'todo' AND NEW.status = 'doing' AND NEW.task_name = 'asyncproc.run_task'
          AND NEW.args->'claimed' = 'null'::jsonb)
    EXECUTE FUNCTION asyncproc_requeue_unclaimed();

-- The worker's writes. Each is fenced on the attempt it ran: a run that was
-- cancelled, re-queued or superseded records nothing.
CREATE FUNCTION asyncproc_worker_complete(target uuid, attempt integer, outcome jsonb)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks SET status = 'completed', result = outcome, progress = 100
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;

CREATE FUNCTION asyncproc_worker_fail(target uuid, attempt integer, error text)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks SET status = 'failed', error_message = error
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;

CREATE FUNCTION asyncproc_worker_retry(target uuid, attempt integer, error text, delay_seconds double precision)
    RETURNS SETOF tasks
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks
    SET status = 'pending', error_message = error, scheduled_at = now() + make_interval(secs => delay_seconds)
    WHERE task_id = target AND status = 'running' AND attempts = attempt
    RETURNING *
$$;

-- A claim that ran nothing gives its attempt back, and the task waits
-- `delay_seconds`: a run cut short by the worker's own shutdown (the task did
-- not fail, the worker left), or a task this worker cannot run.
CREATE FUNCTION asyncproc_worker_release(target uuid, attempt integer, reason text, delay_seconds double precision DEFAULT 0)
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

CREATE FUNCTION asyncproc_worker_progress(target uuid, attempt integer, percent integer, message text)
    RETURNS void
    LANGUAGE sql
    SET asyncproc.writer = 'worker'
AS $$
    UPDATE tasks SET progress = percent, progress_message = message
    WHERE task_id = target AND status = 'running' AND attempts = attempt
$$;

-- The sweep finds dead jobs through this index, not by reading every job.
CREATE INDEX asyncproc_jobs_dead_idx ON procrastinate_jobs (id)
    WHERE task_name = 'asyncproc.run_task'
      AND (status IN ('failed', 'aborted', 'cancelled') OR (status = 'doing' AND worker_id IS NULL));

-- The sweep: repairs dead jobs and restores the invariant that ties the two
-- tables (every pending task has exactly one queued job carrying its time and
-- priority; every running task has one doing job; nothing else). It takes
-- every lock with SKIP LOCKED, so it never waits and never deadlocks; what it
-- skips, the next sweep sees. Pending tasks are checked oldest first, a
-- window per operation: a task without a job stays pending while the tasks
-- around it drain, so it reaches the head of its window.
CREATE FUNCTION asyncproc_sweep(stalled_seconds double precision, window_size integer DEFAULT 1000)
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
            ), oldest AS (
                SELECT w.task_id
                FROM operations,
                     LATERAL (SELECT t.task_id FROM tasks AS t
                              WHERE t.status = 'pending' AND t.operation = operations.operation
                              ORDER BY t.created_at LIMIT window_size) AS w
                WHERE operations.operation IS NOT NULL
            )
            SELECT tasks.task_id, tasks.priority, tasks.scheduled_at, jobs.id AS job_id
            FROM tasks
            JOIN oldest USING (task_id)
            LEFT JOIN LATERAL (
                SELECT j.id, j.priority, j.scheduled_at FROM procrastinate_jobs AS j
                WHERE j.queueing_lock = tasks.task_id::text AND j.status = 'todo'
                LIMIT 1
            ) AS jobs ON true
            WHERE tasks.status = 'pending'
              AND (jobs.id IS NULL
                   OR jobs.priority <> tasks.priority
                   OR (tasks.scheduled_at > now() AND jobs.scheduled_at IS DISTINCT FROM tasks.scheduled_at)
                   OR (tasks.scheduled_at <= now() AND jobs.scheduled_at > now()))
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

    -- Queued jobs at the head of the queue whose task is not pending, or gone,
    -- looked up by id: a join would walk the whole queue.
    SELECT coalesce(array_agg(head.id), '{}') INTO strays
    FROM (
        SELECT id, args->>'task_id' AS task_id FROM procrastinate_jobs
        WHERE status = 'todo'
        ORDER BY priority DESC, id ASC
        LIMIT window_size
    ) AS head
    LEFT JOIN LATERAL (
        SELECT 1 AS found FROM tasks
        WHERE tasks.task_id = CASE WHEN head.task_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                   THEN head.task_id::uuid END
          AND tasks.status = 'pending'
        LIMIT 1
    ) AS pending ON true
    WHERE pending.found IS NULL;
    WITH stray AS (
        SELECT id FROM procrastinate_jobs
        WHERE id = ANY (strays) AND status = 'todo'
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM procrastinate_jobs AS jobs USING stray WHERE jobs.id = stray.id RETURNING 1
    )
    SELECT count(*) INTO dropped FROM gone;

    RETURN NEXT;
END;
$$;

DROP FUNCTION asyncproc_requeue_stalled(double precision);

-- Access. Functions are executable by PUBLIC unless revoked. The dispatch
-- helpers and the worker's functions are for the triggers and the worker
-- (the owner) only: a role with no rights on `tasks` must not be able to
-- delete a task's job or re-queue a running task through them. Operators
-- get a role of their own.
REVOKE EXECUTE ON FUNCTION
    asyncproc_lock_queued_job(uuid),
    asyncproc_defer_jobs(uuid[], integer[], timestamptz[]),
    asyncproc_delete_queued_job(uuid),
    asyncproc_abort_running_job(uuid),
    asyncproc_redefer_job(uuid, integer, timestamptz),
    asyncproc_sweep(double precision, integer),
    asyncproc_worker_complete(uuid, integer, jsonb),
    asyncproc_worker_fail(uuid, integer, text),
    asyncproc_worker_retry(uuid, integer, text, double precision),
    asyncproc_worker_release(uuid, integer, text, double precision),
    asyncproc_worker_progress(uuid, integer, integer, text),
    asyncproc_operator_change(uuid, text[], text, text),
    asyncproc_retry(uuid),
    asyncproc_retry_failed(interval, text),
    asyncproc_cancel(uuid)
FROM PUBLIC;

-- The enqueueing and dispatch triggers run as the owner, so that a role with
-- rights on `tasks` alone can insert, retry and cancel (trigger functions
-- need no EXECUTE right of the role that fires them).
ALTER FUNCTION asyncproc_tasks_defer_inserted() SECURITY DEFINER SET search_path FROM CURRENT;
ALTER FUNCTION asyncproc_tasks_dispatch_changed() SECURITY DEFINER SET search_path FROM CURRENT;
REVOKE EXECUTE ON FUNCTION asyncproc_tasks_defer_inserted(), asyncproc_tasks_dispatch_changed() FROM PUBLIC;

-- Roles belong to the whole server: another database may have made it
-- already, and a migrating role without CREATEROLE leaves it to an admin
-- (docs: "Operators").
DO $$
BEGIN
    BEGIN
        CREATE ROLE asyncproc_operator NOLOGIN;
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN NULL;
        WHEN insufficient_privilege THEN
            RAISE NOTICE 'role asyncproc_operator not created (no CREATEROLE right): create it, then run the GRANTs of migrations/0007 by hand';
    END;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT, INSERT, UPDATE ON tasks TO asyncproc_operator;
        GRANT EXECUTE ON FUNCTION
            asyncproc_operator_change(uuid, text[], text, text),
            asyncproc_retry(uuid),
            asyncproc_retry_failed(interval, text),
            asyncproc_cancel(uuid)
        TO asyncproc_operator;
        GRANT SELECT ON asyncproc_status_counts, asyncproc_throughput_per_minute, asyncproc_throughput_per_hour,
            asyncproc_latency_last_hour, asyncproc_recent_failures, asyncproc_stuck_tasks, asyncproc_queue
        TO asyncproc_operator;
    END IF;
END;
$$;
