-- The dispatch of `tasks` rows to Procrastinate jobs, through the wrappers of
-- 20_procrastinate_bridge.sql. The lock order these follow is explained there.
--
-- The enqueueing and dispatch triggers run as the owner, so that a role with
-- rights on `tasks` alone can insert, retry and cancel (trigger functions
-- need no EXECUTE right of the role that fires them).

-- One dispatch job per new pending task, deferred in the inserting transaction:
-- one commit covers both rows, and a rollback leaves neither.
CREATE OR REPLACE FUNCTION asyncproc_tasks_defer_inserted() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM asyncproc_defer_jobs(array_agg(task_id), array_agg(priority), array_agg(scheduled_at))
    FROM inserted
    HAVING count(*) > 0;
    RETURN NULL;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_tasks_defer_inserted() FROM PUBLIC;

DROP TRIGGER IF EXISTS tasks_defer_inserted ON tasks;
CREATE TRIGGER tasks_defer_inserted
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_defer_inserted();

-- Any move back to pending queues a new dispatch job; a cancelled task drops
-- its queued job or asks its worker to stop; a pending task moved in time or
-- priority gets a job that says so.
CREATE OR REPLACE FUNCTION asyncproc_tasks_dispatch_changed() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
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
REVOKE EXECUTE ON FUNCTION asyncproc_tasks_dispatch_changed() FROM PUBLIC;

DROP TRIGGER IF EXISTS tasks_dispatch_changed ON tasks;
CREATE TRIGGER tasks_dispatch_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN ((NEW.status = 'pending' AND OLD.status <> 'pending')
          OR (NEW.status = 'cancelled' AND OLD.status <> 'cancelled')
          OR (NEW.status = 'pending' AND OLD.status = 'pending'
              AND (NEW.scheduled_at IS DISTINCT FROM OLD.scheduled_at
                   OR NEW.priority IS DISTINCT FROM OLD.priority)))
    EXECUTE FUNCTION asyncproc_tasks_dispatch_changed();
