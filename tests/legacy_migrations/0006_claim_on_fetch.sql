-- A task is claimed (pending -> running, attempts + 1) in the same transaction
-- in which a worker fetches its dispatch job, and the claimed row travels to
-- the worker inside the fetched job's args, under "claimed" (null when the task
-- was no longer pending). This saves the worker one round trip and one commit
-- per task, and a worker can no longer die between fetching a job and claiming
-- its task. Like 0002, this touches Procrastinate's table, not its code.

CREATE FUNCTION asyncproc_claim_on_fetch() RETURNS trigger
    LANGUAGE plpgsql
AS $$
DECLARE
    claimed jsonb;
BEGIN
    UPDATE tasks
    SET status = 'running', attempts = attempts + 1, started_at = now(), progress = NULL, progress_message = NULL
    WHERE task_id = (NEW.args->>'task_id')::uuid AND status = 'pending'
    RETURNING to_jsonb(tasks.*) INTO claimed;
    NEW.args := NEW.args || jsonb_build_object('claimed', claimed);
    RETURN NEW;
END;
$$;

CREATE TRIGGER asyncproc_claim_on_fetch
    BEFORE UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'todo' AND NEW.status = 'doing' AND NEW.task_name = 'asyncproc.run_task')
    EXECUTE FUNCTION asyncproc_claim_on_fetch();
