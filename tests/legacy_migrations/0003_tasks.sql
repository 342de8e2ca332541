-- The tasks table: the ledger, the system of record and the queue's public face.
-- Column names and meanings are a public contract (see README, "The tasks table").

CREATE TABLE tasks (
    task_id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    operation       text        NOT NULL DEFAULT 'compute'
                                CHECK (operation ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    payload         jsonb       NOT NULL DEFAULT '{}'
                                CHECK (jsonb_typeof(payload) = 'object'),
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    result          jsonb,
    error_message   text,
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    priority        integer     NOT NULL DEFAULT 0,
    progress        smallint    CHECK (progress BETWEEN 0 AND 100),
    progress_message text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    scheduled_at    timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    request_id      text
);

COMMENT ON TABLE tasks IS 'asyncproc ledger: one row per task; INSERT a row to enqueue it';
COMMENT ON COLUMN tasks.scheduled_at IS 'earliest time the next attempt may start';
COMMENT ON COLUMN tasks.attempts IS 'runs started so far';

CREATE UNIQUE INDEX tasks_idempotency_key_idx ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Serves the queue (status = pending, oldest first), stuck-task checks, and
-- counts by status and operation as an index-only scan.
CREATE INDEX tasks_status_operation_created_at_idx ON tasks (status, operation, created_at);

-- A new row always starts as a fresh pending task, whoever inserts it, so that
-- an operator's INSERT behaves exactly like POST /process.
CREATE FUNCTION asyncproc_tasks_before_insert() RETURNS trigger
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

CREATE TRIGGER tasks_before_insert
    BEFORE INSERT ON tasks
    FOR EACH ROW EXECUTE FUNCTION asyncproc_tasks_before_insert();

-- One dispatch job per new pending task, deferred in the inserting transaction:
-- one commit covers both rows, and a rollback leaves neither.
CREATE FUNCTION asyncproc_tasks_defer_inserted() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM asyncproc_defer_jobs(array_agg(task_id), array_agg(priority), array_agg(scheduled_at))
    FROM inserted
    HAVING count(*) > 0;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_defer_inserted
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_defer_inserted();

-- The status machine. Every writer, the worker and psql alike, goes through it.
-- Claiming a task and recording its outcome are the worker's alone; it
-- connects as application_name 'asyncproc-worker'. Operators retry and cancel.
-- (This is a guard against mistakes, not a security boundary.)
CREATE FUNCTION asyncproc_tasks_before_update() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    by_worker boolean;
    allowed boolean;
BEGIN
    NEW.updated_at := now();
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;

    by_worker := current_setting('application_name') = 'asyncproc-worker';
    allowed := CASE OLD.status
        WHEN 'pending'   THEN NEW.status = 'cancelled' OR (by_worker AND NEW.status = 'running')
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

CREATE TRIGGER tasks_before_update
    BEFORE UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION asyncproc_tasks_before_update();

-- Any move back to pending (a retry, a stalled task, a task cut short at
-- shutdown, an operator's UPDATE) queues a new dispatch job; a cancelled
-- task drops its queued job, or asks its worker to stop.
CREATE FUNCTION asyncproc_tasks_dispatch_changed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = 'pending' THEN
        PERFORM asyncproc_defer_jobs(ARRAY[NEW.task_id], ARRAY[NEW.priority], ARRAY[NEW.scheduled_at]);
    ELSIF OLD.status = 'pending' THEN
        PERFORM asyncproc_delete_queued_job(NEW.task_id);
    ELSE
        PERFORM asyncproc_abort_running_job(NEW.task_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_dispatch_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN ((NEW.status = 'pending' AND OLD.status <> 'pending')
          OR (NEW.status = 'cancelled' AND OLD.status <> 'cancelled'))
    EXECUTE FUNCTION asyncproc_tasks_dispatch_changed();

-- Listeners (GET ?wait, the event stream, cache invalidation in every API
-- process) hear of a task reaching or leaving a final state, and of progress.
-- The claim (pending -> running) is not announced: NOTIFY serialises commits,
-- and the hot path pays for every one.
CREATE FUNCTION asyncproc_tasks_notify_changed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('asyncproc_task_changed', NEW.task_id::text || ' ' || NEW.status);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_notify_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN ((OLD.status <> NEW.status AND (NEW.status IN ('completed', 'failed', 'cancelled')
                                         OR OLD.status IN ('completed', 'failed', 'cancelled')))
          OR (NEW.status = 'running' AND (NEW.progress IS DISTINCT FROM OLD.progress
                                          OR NEW.progress_message IS DISTINCT FROM OLD.progress_message)))
    EXECUTE FUNCTION asyncproc_tasks_notify_changed();
