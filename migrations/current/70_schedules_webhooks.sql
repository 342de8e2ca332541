-- Schedules and completion webhooks, both driven by the workers: a scheduler
-- loop enqueues due occurrences, a delivery loop POSTs finished tasks to their
-- callback_url. See docs/limits-schedules-webhooks.md.

-- An edited timing starts afresh from now instead of from the old next_run_at.
CREATE OR REPLACE FUNCTION asyncproc_schedules_before_update() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    IF (NEW.cron, NEW.every_seconds, NEW.enabled) IS DISTINCT FROM (OLD.cron, OLD.every_seconds, OLD.enabled) THEN
        NEW.next_run_at := NULL;
        NEW.last_error := NULL;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS asyncproc_schedules_before_update ON asyncproc_schedules;
CREATE TRIGGER asyncproc_schedules_before_update
    BEFORE UPDATE ON asyncproc_schedules
    FOR EACH ROW EXECUTE FUNCTION asyncproc_schedules_before_update();

-- Whoever finishes the task (the worker, an API cancel, psql), the delivery is
-- queued in the same transaction. The row is kept in the claim's shape
-- (30_procrastinate_claim_and_fetch.sql), without the payload, which the
-- document does not show. It runs as the owner, so that an operator with rights on `tasks` alone can cancel.
CREATE OR REPLACE FUNCTION asyncproc_tasks_queue_callback() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO asyncproc_callbacks (task_id, url, task)
    VALUES (NEW.task_id, NEW.callback_url, to_jsonb(NEW) - 'payload' || jsonb_build_object('payload_json', '{}'));
    RETURN NULL;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_tasks_queue_callback() FROM PUBLIC;

DROP TRIGGER IF EXISTS tasks_queue_callback ON tasks;
CREATE TRIGGER tasks_queue_callback
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND OLD.status <> NEW.status
          AND NEW.status IN ('completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION asyncproc_tasks_queue_callback();
