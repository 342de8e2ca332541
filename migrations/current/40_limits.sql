-- Per-operation limits, across the fleet (asyncproc_operation_settings):
-- applied where a worker claims a task (30_procrastinate_claim_and_fetch.sql).
-- A task held back stays pending, says why in tasks.wait_reason, and is
-- parked (its scheduled_at moved on); capacity freeing wakes the next one at once.

-- NULL when a task of `op` may start now (and takes a rate token), else why
-- not. The limits row stays locked until the claim commits, so claims of one
-- limited operation are serialised and the running count is exact across
-- workers; a row that another transaction holds is skipped, never waited for.
-- No stored value can make it raise, which would fail the whole fetch and so
-- hold back every operation: a row that breaks the limits' CHECK (written
-- before it, 0026) holds back its own operation, and the bucket's arithmetic
-- is clamped, whatever tokens and tokens_at hold.
CREATE OR REPLACE FUNCTION asyncproc_operation_admit(op text) RETURNS text
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    limits asyncproc_operation_settings%ROWTYPE;
    running bigint;
    capacity double precision;
    refilled double precision;
    problem text;
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
    problem := asyncproc_operation_limits_problem(limits.max_running, limits.rate_per_second, limits.burst);
    IF problem IS NOT NULL THEN
        RETURN 'invalid limits: ' || problem;
    END IF;
    IF limits.max_running IS NOT NULL THEN
        SELECT count(*) INTO running FROM tasks WHERE status = 'running' AND operation = op;
        IF running >= limits.max_running THEN
            RETURN format('max_running: %s of %s running', running, limits.max_running);
        END IF;
    END IF;
    IF limits.rate_per_second IS NOT NULL THEN
        capacity := coalesce(limits.burst, ceil(limits.rate_per_second));
        -- NaN is greater than every number, so least() turns NaN tokens into
        -- a full bucket; epochs, unlike timestamps, subtract when infinite.
        refilled := least(capacity, greatest(0, coalesce(limits.tokens, capacity))
                          + limits.rate_per_second
                            * greatest(0, least(capacity / limits.rate_per_second,
                                                extract(epoch FROM clock_timestamp())
                                                - extract(epoch FROM coalesce(limits.tokens_at, clock_timestamp())))));
        IF refilled < 1 THEN
            UPDATE asyncproc_operation_settings SET tokens = refilled, tokens_at = clock_timestamp() WHERE operation = op;
            RETURN format('rate: %s per second', limits.rate_per_second);
        END IF;
        UPDATE asyncproc_operation_settings SET tokens = refilled - 1, tokens_at = clock_timestamp() WHERE operation = op;
    END IF;
    RETURN NULL;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_operation_admit(text) FROM PUBLIC;

-- Wake held tasks of `op` (all of them, or `how_many`): due now, so that their
-- jobs are queued again and the workers are notified.
CREATE OR REPLACE FUNCTION asyncproc_wake_held(op text, how_many integer) RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
    UPDATE tasks SET scheduled_at = now(), wait_reason = NULL
    WHERE task_id IN (
        SELECT task_id FROM tasks
        WHERE status = 'pending' AND operation = op AND wait_reason IS NOT NULL
        ORDER BY priority DESC, created_at
        LIMIT how_many
        FOR UPDATE SKIP LOCKED
    )
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_wake_held(text,integer) FROM PUBLIC;

-- Changed limits (a resume, a higher max_running, a deleted row) apply to the
-- held tasks at once: they are all tried again.
CREATE OR REPLACE FUNCTION asyncproc_operation_settings_changed() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM asyncproc_wake_held(CASE WHEN TG_OP = 'DELETE' THEN OLD.operation ELSE NEW.operation END, NULL);
    RETURN NULL;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_operation_settings_changed() FROM PUBLIC;

DROP TRIGGER IF EXISTS asyncproc_operation_settings_changed ON asyncproc_operation_settings;
CREATE TRIGGER asyncproc_operation_settings_changed
    AFTER INSERT OR UPDATE OF max_running, rate_per_second, burst, paused OR DELETE ON asyncproc_operation_settings
    FOR EACH ROW EXECUTE FUNCTION asyncproc_operation_settings_changed();

-- A task of a limited operation that stops running frees a place: the next held task starts.
CREATE OR REPLACE FUNCTION asyncproc_tasks_wake_on_free() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM asyncproc_operation_settings WHERE operation = NEW.operation AND NOT paused) THEN
        PERFORM asyncproc_wake_held(NEW.operation, 1);
    END IF;
    RETURN NULL;
END;
$$;
REVOKE EXECUTE ON FUNCTION asyncproc_tasks_wake_on_free() FROM PUBLIC;

DROP TRIGGER IF EXISTS tasks_wake_on_free ON tasks;
CREATE TRIGGER tasks_wake_on_free
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION asyncproc_tasks_wake_on_free();
