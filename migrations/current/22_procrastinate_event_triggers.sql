-- Procrastinate's event log (procrastinate_events) and its periodic-defer
-- link, kept for every job except asyncproc's dispatch jobs.
--
-- Procrastinate writes a procrastinate_events row for each job's deferral,
-- scheduling and status change, and its jobs' deletion deletes them again. For
-- a dispatch job that is three rows written and removed per task, a third of
-- the database's CPU in a drain of no-op tasks (docs/performance.md,
-- "Where a task's time goes"), to record what the attempts ledger
-- (asyncproc_attempts, 60_attempts.sql) and the tasks row already hold for
-- longer. Nothing of asyncproc or Procrastinate's worker reads those events.
-- Our dispatch jobs are never periodic defers either (asyncproc's schedules
-- are its own, 70_schedules_webhooks.sql), so their deletion need not look
-- for one; were one ever linked, the foreign key would refuse the deletion,
-- never lose the link.
--
-- The triggers keep Procrastinate's names and functions and only gain a
-- condition on the job's task name. A Procrastinate migration that
-- re-creates one of them brings its events back for our jobs too: slower,
-- never wrong. Jobs of any other Procrastinate task in the same database
-- keep their events.

DROP TRIGGER IF EXISTS procrastinate_trigger_status_events_update_v1 ON procrastinate_jobs;
CREATE TRIGGER procrastinate_trigger_status_events_update_v1
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (NEW.task_name <> 'asyncproc.run_task')
    EXECUTE PROCEDURE procrastinate_trigger_function_status_events_update_v1();

DROP TRIGGER IF EXISTS procrastinate_trigger_status_events_insert_v1 ON procrastinate_jobs;
CREATE TRIGGER procrastinate_trigger_status_events_insert_v1
    AFTER INSERT ON procrastinate_jobs
    FOR EACH ROW
    WHEN (NEW.status = 'todo'::procrastinate_job_status AND NEW.task_name <> 'asyncproc.run_task')
    EXECUTE PROCEDURE procrastinate_trigger_function_status_events_insert_v1();

DROP TRIGGER IF EXISTS procrastinate_trigger_scheduled_events_v1 ON procrastinate_jobs;
CREATE TRIGGER procrastinate_trigger_scheduled_events_v1
    AFTER UPDATE OR INSERT ON procrastinate_jobs
    FOR EACH ROW
    WHEN (NEW.scheduled_at IS NOT NULL AND NEW.status = 'todo'::procrastinate_job_status
          AND NEW.task_name <> 'asyncproc.run_task')
    EXECUTE PROCEDURE procrastinate_trigger_function_scheduled_events_v1();

DROP TRIGGER IF EXISTS procrastinate_trigger_delete_jobs_v1 ON procrastinate_jobs;
CREATE TRIGGER procrastinate_trigger_delete_jobs_v1
    BEFORE DELETE ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.task_name <> 'asyncproc.run_task')
    EXECUTE PROCEDURE procrastinate_unlink_periodic_defers_v1();
