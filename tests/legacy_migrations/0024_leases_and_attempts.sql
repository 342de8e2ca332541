-- Leases, fencing and the attempts ledger (docs/reliability.md, "Leases and
-- fencing"). Four changes:
--
--  * Admission never waits on a lock inside a fetch. The claim took the
--    operation's limits row with a waiting FOR UPDATE while the fetch held job
--    and task rows, in no fixed order across the jobs of one fetch: limits on
--    two operations deadlocked the fetches of two workers, and an uncommitted
--    psql edit of one row stalled every fetch behind it until lock_timeout
--    failed the whole fetch. A row that another transaction holds now means
--    "busy": that task is parked for a second, and every other task is claimed.
--  * The attempts ledger: one row per claimed run, written by the statement
--    that moves the task to running (the claim) and closed by the statement
--    that moves it on, so the two can never disagree.
--  * A worker that leaves while a thread handler of its own still runs cannot
--    stop that thread; it marks the thread's job abandoned and exits, and the
--    sweep releases the task (its attempt given back) only once the worker's
--    lease has lapsed, that is once the process is gone.
--  * A priority or time edit that finds the task's queued job held (by a
--    fetch, or a psql session) is remembered and applied by the next sweep,
--    instead of being dropped.

-- Who a worker is, for the ledger: Procrastinate's worker rows hold an id and
-- a heartbeat only. Written by the worker's lease when it registers.
CREATE TABLE asyncproc_worker_hosts (
    worker_id  bigint      PRIMARY KEY REFERENCES procrastinate_workers (id) ON DELETE CASCADE,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE asyncproc_worker_hosts IS 'asyncproc: the host and pid of each live worker (procrastinate_workers.id)';

CREATE TABLE asyncproc_attempts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     uuid        NOT NULL,
    -- The task's attempts counter during this run. A run given back (outcome
    -- interrupted) does not count, so the next run carries the same number.
    attempt     integer     NOT NULL,
    worker_id   bigint,
    host        text,
    pid         integer,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text        NOT NULL DEFAULT 'running'
                CHECK (outcome IN ('running', 'completed', 'failed', 'retried', 'cancelled', 'interrupted', 'lost')),
    error       text
);

COMMENT ON TABLE asyncproc_attempts IS
    'asyncproc attempts ledger: one row per run of a task; outcome running|completed|failed|retried|cancelled|interrupted|lost';
CREATE INDEX asyncproc_attempts_task_idx ON asyncproc_attempts (task_id, id);

CREATE VIEW asyncproc_task_attempts AS
SELECT task_id, attempt, worker_id, host, pid, started_at, finished_at, outcome, error,
       finished_at - started_at AS duration,
       outcome <> 'interrupted' AS counted
FROM asyncproc_attempts;

COMMENT ON VIEW asyncproc_task_attempts IS
    'asyncproc: every run of every task, oldest first by id; counted is false for runs given back at shutdown';

-- A run ends when its task leaves running, whoever moves it: the worker's
-- outcome, a cancel, or the sweep. How it ended follows from the change,
-- except where the writer says (asyncproc.attempt_outcome): 'unstarted' for a
-- fetched job that never started (its row goes: no run happened), 'lost' for
-- the sweep's recovery of a dead worker's task.
CREATE FUNCTION asyncproc_tasks_attempt_ended() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    said text := nullif(current_setting('asyncproc.attempt_outcome', true), '');
BEGIN
    IF said = 'unstarted' THEN
        DELETE FROM asyncproc_attempts WHERE task_id = NEW.task_id AND finished_at IS NULL;
        RETURN NULL;
    END IF;
    UPDATE asyncproc_attempts
    SET finished_at = now(),
        outcome = CASE
            WHEN NEW.attempts < OLD.attempts THEN 'interrupted'
            WHEN said IS NOT NULL THEN said
            WHEN NEW.status = 'pending' THEN 'retried'
            ELSE NEW.status
        END,
        error = CASE WHEN NEW.status = 'completed' THEN NULL ELSE NEW.error_message END
    WHERE task_id = NEW.task_id AND finished_at IS NULL;
    RETURN NULL;
END;
$$;

REVOKE EXECUTE ON FUNCTION asyncproc_tasks_attempt_ended() FROM PUBLIC;

CREATE TRIGGER tasks_attempt_ended
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION asyncproc_tasks_attempt_ended();

-- Pruned with its task, however the task goes (retention, a DELETE, a TRUNCATE).
-- No foreign key: TRUNCATE tasks, which operators and the bench use, would
-- then need CASCADE.
CREATE FUNCTION asyncproc_tasks_attempts_deleted() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
    -- One probe of the ledger's index per deleted task (a prune batch is a
    -- thousand), never a pass over the whole ledger, whatever the statistics.
    SET enable_seqscan = off
    SET enable_bitmapscan = off
    SET enable_hashjoin = off
    SET enable_mergejoin = off
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        TRUNCATE asyncproc_attempts;
    ELSE
        DELETE FROM asyncproc_attempts WHERE task_id IN (SELECT task_id FROM deleted);
    END IF;
    RETURN NULL;
END;
$$;

REVOKE EXECUTE ON FUNCTION asyncproc_tasks_attempts_deleted() FROM PUBLIC;

CREATE TRIGGER tasks_attempts_deleted
    AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_attempts_deleted();

CREATE TRIGGER tasks_attempts_truncated
    AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_attempts_deleted();

-- Fetched jobs returned unstarted leave no run behind.
ALTER FUNCTION asyncproc_worker_return_jobs(bigint[]) SET asyncproc.attempt_outcome = 'unstarted';

-- NULL when a task of `op` may start now (and takes a rate token), else why
-- not. The limits row stays locked until the claim commits, so claims of one
-- limited operation are serialised and the running count is exact across
-- workers; a row that another transaction holds is skipped, never waited for.
CREATE OR REPLACE FUNCTION asyncproc_operation_admit(op text) RETURNS text
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    limits asyncproc_operation_settings%ROWTYPE;
    running bigint;
    capacity double precision;
    refilled double precision;
BEGIN
    SELECT * INTO limits FROM asyncproc_operation_settings WHERE operation = op FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM asyncproc_operation_settings WHERE operation = op) THEN
            RETURN 'busy: another transaction holds the limits of ' || op;
        END IF;
        RETURN NULL;
    END IF;
    IF limits.paused THEN
        RETURN 'paused: asyncproc limits resume ' || op;
    END IF;
    IF limits.max_running IS NOT NULL THEN
        SELECT count(*) INTO running FROM tasks WHERE status = 'running' AND operation = op;
        IF running >= limits.max_running THEN
            RETURN format('max_running: %s of %s running', running, limits.max_running);
        END IF;
    END IF;
    IF limits.rate_per_second IS NOT NULL THEN
        capacity := coalesce(limits.burst, ceil(limits.rate_per_second));
        refilled := least(capacity, coalesce(limits.tokens, capacity)
                          + limits.rate_per_second * extract(epoch FROM clock_timestamp() - coalesce(limits.tokens_at, clock_timestamp())));
        IF refilled < 1 THEN
            UPDATE asyncproc_operation_settings SET tokens = refilled, tokens_at = clock_timestamp() WHERE operation = op;
            RETURN format('rate: %s per second', limits.rate_per_second);
        END IF;
        UPDATE asyncproc_operation_settings SET tokens = refilled - 1, tokens_at = clock_timestamp() WHERE operation = op;
    END IF;
    RETURN NULL;
END;
$$;

-- 0011's claim, which now opens the run's row in the attempts ledger.
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

-- 0011's park: a task held back only because another transaction had its
-- operation's limits row waits a second (or until a task of its operation
-- frees a place, which wakes it), not the minute of a pause.
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

-- Pending tasks whose edited time or priority could not reach their queued
-- job, because another transaction held it. The sweep applies them.
CREATE TABLE asyncproc_redefer_wanted (
    task_id uuid PRIMARY KEY
);

-- 0007's redefer, which remembers an edit it cannot apply now.
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

-- A worker about to exit with thread handlers it cannot stop marks their jobs;
-- the sweep gives their attempts back once the worker's lease has lapsed.
CREATE FUNCTION asyncproc_worker_abandon_jobs(job_ids bigint[])
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

-- The sweep of 0023, with the abandoned jobs released, the remembered edits
-- applied, and the runs it recovers recorded as lost.
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

-- Operators read the ledger with SQL.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT ON asyncproc_attempts, asyncproc_task_attempts, asyncproc_worker_hosts TO asyncproc_operator;
    END IF;
END;
$$;
