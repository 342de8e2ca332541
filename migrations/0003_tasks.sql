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
CREATE INDEX tasks_status_created_at_idx ON tasks (status, created_at);

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
CREATE FUNCTION asyncproc_tasks_before_update() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    allowed boolean;
BEGIN
    NEW.updated_at := now();
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;

    allowed := CASE OLD.status
        WHEN 'pending'   THEN NEW.status IN ('running', 'cancelled')
        WHEN 'running'   THEN NEW.status IN ('completed', 'failed', 'pending', 'cancelled')
        WHEN 'failed'    THEN NEW.status = 'pending'
        WHEN 'cancelled' THEN NEW.status = 'pending'
        ELSE false
    END;
    IF NOT allowed THEN
        RAISE EXCEPTION 'invalid task status transition: % -> % (task %)', OLD.status, NEW.status, OLD.task_id
            USING ERRCODE = 'check_violation',
                  HINT = 'pending -> running|cancelled; running -> completed|failed|pending|cancelled; failed|cancelled -> pending';
    END IF;

    IF NEW.status IN ('completed', 'failed', 'cancelled') THEN
        NEW.completed_at := now();
    END IF;

    IF OLD.status IN ('failed', 'cancelled') THEN
        -- A retry: the task runs again from scratch, with at least one more attempt.
        NEW.result := NULL;
        NEW.completed_at := NULL;
        NEW.progress := NULL;
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
-- pending task drops its queued one.
CREATE FUNCTION asyncproc_tasks_dispatch_changed() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.status = 'pending' THEN
        PERFORM asyncproc_defer_jobs(ARRAY[NEW.task_id], ARRAY[NEW.priority], ARRAY[NEW.scheduled_at]);
    ELSE
        PERFORM asyncproc_delete_queued_job(NEW.task_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_dispatch_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN ((NEW.status = 'pending' AND OLD.status <> 'pending')
          OR (NEW.status = 'cancelled' AND OLD.status = 'pending'))
    EXECUTE FUNCTION asyncproc_tasks_dispatch_changed();
