-- The status machine of `tasks`. Every writer, the worker and psql alike, goes
-- through it. Claiming a task and recording its outcome are the worker's
-- alone: the functions that do so (30_procrastinate_claim_and_fetch.sql,
-- 31_worker_outcomes.sql) run with the transaction-local setting
-- asyncproc.writer = 'worker' (their SET clause), which the status machine
-- checks. Any connection name works for the worker; a psql session does not
-- get the worker's rights by naming itself after it. Operators retry and
-- cancel. (Anyone may still SET the variable by hand: this is a guard against
-- mistakes, not a security boundary.)

-- A new row always starts as a fresh pending task, whoever inserts it, so that
-- an operator's INSERT behaves exactly like POST /process.
CREATE OR REPLACE FUNCTION asyncproc_tasks_before_insert() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status <> 'pending' THEN
        RAISE EXCEPTION 'a new task must be pending, not %', NEW.status
            USING ERRCODE = 'check_violation';
    END IF;
    NEW.attempts := 0;
    NEW.result := NULL;
    NEW.started_at := NULL;
    NEW.completed_at := NULL;
    NEW.progress := NULL;
    NEW.progress_message := NULL;
    NEW.updated_at := NEW.created_at;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS tasks_before_insert ON tasks;
CREATE TRIGGER tasks_before_insert
    BEFORE INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION asyncproc_tasks_before_insert();

-- The worker's columns are guarded on every update, not only on status changes.
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

DROP TRIGGER IF EXISTS tasks_before_update ON tasks;
CREATE TRIGGER tasks_before_update
    BEFORE UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION asyncproc_tasks_before_update();

-- Listeners (GET ?wait, the event stream, cache invalidation in every API
-- process) hear of a task reaching or leaving a final state, and of progress.
-- The claim (pending -> running) is not announced: NOTIFY serialises commits,
-- and the hot path pays for every one.
-- The announcement carries the new state's version (updated_at in microseconds),
-- so that each API process's cache invalidation refuses an older state put
-- afterwards by a reader that read the row before the change.
CREATE OR REPLACE FUNCTION asyncproc_tasks_notify_changed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('asyncproc_task_changed',
                      NEW.task_id::text || ' ' || NEW.status || ' '
                      || (extract(epoch FROM NEW.updated_at) * 1000000)::bigint::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_notify_changed ON tasks;
CREATE TRIGGER tasks_notify_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN ((OLD.status <> NEW.status AND (NEW.status IN ('completed', 'failed', 'cancelled')
                                         OR OLD.status IN ('completed', 'failed', 'cancelled')))
          OR (NEW.status = 'running' AND (NEW.progress IS DISTINCT FROM OLD.progress
                                          OR NEW.progress_message IS DISTINCT FROM OLD.progress_message)))
    EXECUTE FUNCTION asyncproc_tasks_notify_changed();
