-- The attempts ledger (asyncproc_attempts; docs/reliability.md, "Leases and
-- fencing"): one row per claimed run, opened by the claim
-- (30_procrastinate_claim_and_fetch.sql) in the statement that moves the task
-- to running, and closed here by the statement that moves it on, so the two
-- can never disagree.

-- A run ends when its task leaves running, whoever moves it: the worker's
-- outcome, a cancel, or the sweep. How it ended follows from the change,
-- except where the writer says (asyncproc.attempt_outcome): 'unstarted' for a
-- fetched job that never started (its row goes: no run happened), 'lost' for
-- the sweep's recovery of a dead worker's task.
CREATE OR REPLACE FUNCTION asyncproc_tasks_attempt_ended() RETURNS trigger
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

DROP TRIGGER IF EXISTS tasks_attempt_ended ON tasks;
CREATE TRIGGER tasks_attempt_ended
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION asyncproc_tasks_attempt_ended();

-- Pruned with its task, however the task goes (retention, a DELETE, a TRUNCATE).
-- No foreign key: TRUNCATE tasks, which operators and the bench use, would
-- then need CASCADE.
CREATE OR REPLACE FUNCTION asyncproc_tasks_attempts_deleted() RETURNS trigger
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

DROP TRIGGER IF EXISTS tasks_attempts_deleted ON tasks;
CREATE TRIGGER tasks_attempts_deleted
    AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_attempts_deleted();

DROP TRIGGER IF EXISTS tasks_attempts_truncated ON tasks;
CREATE TRIGGER tasks_attempts_truncated
    AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_attempts_deleted();

CREATE OR REPLACE VIEW asyncproc_task_attempts AS
SELECT task_id, attempt, worker_id, host, pid, started_at, finished_at, outcome, error,
       finished_at - started_at AS duration,
       outcome <> 'interrupted' AS counted
FROM asyncproc_attempts;
COMMENT ON VIEW asyncproc_task_attempts IS
    'asyncproc: every run of every task, oldest first by id; counted is false for runs given back at shutdown';

-- Operators (00_operator_role.sql) read the ledger with SQL.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT ON asyncproc_task_attempts TO asyncproc_operator;
    END IF;
END;
$$;
