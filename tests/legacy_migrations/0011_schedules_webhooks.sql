-- Schedules (periodic tasks) and completion webhooks. Both are driven by the
-- workers: a scheduler loop enqueues due occurrences, a delivery loop POSTs
-- finished tasks to their callback_url. See docs/limits-schedules-webhooks.md.

-- A schedule enqueues `operation` with `payload` on a cron expression (5
-- fields, UTC) or every `every_seconds` seconds (counted from the epoch, so
-- every worker computes the same occurrences).
CREATE TABLE asyncproc_schedules (
    name          text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    cron          text        CHECK (length(cron) BETWEEN 1 AND 200),
    every_seconds integer     CHECK (every_seconds BETWEEN 1 AND 31622400),
    operation     text        NOT NULL CHECK (operation ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    payload       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    priority      integer     NOT NULL DEFAULT 0,
    max_attempts  integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    enabled       boolean     NOT NULL DEFAULT true,
    -- After downtime: 'skip' runs only an occurrence less than
    -- ASYNCPROC_SCHEDULE_MISFIRE_SECONDS late; 'one' runs the latest missed one, once.
    catch_up      text        NOT NULL DEFAULT 'skip' CHECK (catch_up IN ('skip', 'one')),
    -- Kept by the scheduler; NULL means "compute from now".
    next_run_at   timestamptz,
    last_run_at   timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);

COMMENT ON TABLE asyncproc_schedules IS 'asyncproc periodic tasks: INSERT, UPDATE or DELETE rows to change them';

-- An edited timing starts afresh from now instead of from the old next_run_at.
CREATE FUNCTION asyncproc_schedules_before_update() RETURNS trigger
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

CREATE TRIGGER asyncproc_schedules_before_update
    BEFORE UPDATE ON asyncproc_schedules
    FOR EACH ROW EXECUTE FUNCTION asyncproc_schedules_before_update();

-- One row per enqueued occurrence. The primary key is what makes each
-- occurrence run once across the fleet, whatever the workers' clocks and races.
CREATE TABLE asyncproc_schedule_runs (
    schedule_name text        NOT NULL REFERENCES asyncproc_schedules (name) ON DELETE CASCADE,
    scheduled_for timestamptz NOT NULL,
    task_id       uuid        NOT NULL,
    enqueued_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_name, scheduled_for)
);

-- Completion webhooks. Contract change: tasks.callback_url.
ALTER TABLE tasks ADD COLUMN callback_url text CHECK (callback_url ~ '^https?://' AND length(callback_url) <= 2000);
COMMENT ON COLUMN tasks.callback_url IS 'POSTed the task document when the task reaches a final status';

-- Each key signs its callbacks with a secret of its own. It must be readable
-- to sign with, so unlike the key it is stored as is. 2 x 122 random bits.
ALTER TABLE api_keys ADD COLUMN callback_secret text NOT NULL
    DEFAULT encode(sha256((gen_random_uuid()::text || gen_random_uuid()::text)::bytea), 'hex');

-- The outbox: one delivery per final status of a task with a callback_url,
-- with the task row as it was then. The workers deliver it.
CREATE TABLE asyncproc_callbacks (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         uuid        NOT NULL,
    url             text        NOT NULL,
    task            jsonb       NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);

COMMENT ON TABLE asyncproc_callbacks IS 'asyncproc completion webhooks: one row per delivery, state pending|delivered|failed';
CREATE INDEX asyncproc_callbacks_due_idx ON asyncproc_callbacks (next_attempt_at) WHERE state = 'pending';
CREATE INDEX asyncproc_callbacks_task_id_idx ON asyncproc_callbacks (task_id);

-- Every HTTP attempt of a delivery.
CREATE TABLE asyncproc_callback_attempts (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    callback_id     bigint      NOT NULL REFERENCES asyncproc_callbacks (id) ON DELETE CASCADE,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    response_status integer,
    error           text,
    duration_ms     integer     NOT NULL
);

CREATE INDEX asyncproc_callback_attempts_callback_id_idx ON asyncproc_callback_attempts (callback_id);

-- Whoever finishes the task (the worker, an API cancel, psql), the delivery is
-- queued in the same transaction. The row is kept in the claim's shape
-- (0007), without the payload, which the document does not show. It runs as
-- the owner, so that an operator with rights on `tasks` alone can cancel.
CREATE FUNCTION asyncproc_tasks_queue_callback() RETURNS trigger
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

CREATE TRIGGER tasks_queue_callback
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (NEW.callback_url IS NOT NULL AND OLD.status <> NEW.status
          AND NEW.status IN ('completed', 'failed', 'cancelled'))
    EXECUTE FUNCTION asyncproc_tasks_queue_callback();

-- Operators (0007) manage schedules and read deliveries with SQL.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON asyncproc_schedules TO asyncproc_operator;
        GRANT SELECT ON asyncproc_schedule_runs, asyncproc_callbacks, asyncproc_callback_attempts TO asyncproc_operator;
    END IF;
END;
$$;

-- Per-operation limits, across the fleet: applied where a worker claims a
-- task (the claim of 0007, redefined here with one check added). A task held
-- back stays pending, says why in tasks.wait_reason, and is parked (its
-- scheduled_at moved on); capacity freeing wakes the next one at once.
CREATE TABLE asyncproc_operation_settings (
    operation       text             PRIMARY KEY CHECK (operation ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    max_running     integer          CHECK (max_running >= 0),
    rate_per_second double precision CHECK (rate_per_second > 0),
    burst           integer          CHECK (burst >= 1),
    paused          boolean          NOT NULL DEFAULT false,
    -- The token bucket of rate_per_second, kept by the claim.
    tokens          double precision,
    tokens_at       timestamptz,
    updated_at      timestamptz      NOT NULL DEFAULT now()
);

COMMENT ON TABLE asyncproc_operation_settings IS 'asyncproc per-operation limits: max_running, rate_per_second/burst, paused';

ALTER TABLE tasks ADD COLUMN wait_reason text;
COMMENT ON COLUMN tasks.wait_reason IS 'why a pending task is held back by its operation''s limits; NULL otherwise';
CREATE INDEX tasks_held_idx ON tasks (operation, priority DESC, created_at) WHERE status = 'pending' AND wait_reason IS NOT NULL;

-- NULL when a task of `op` may start now (and takes a rate token), else why not.
-- The settings row is locked until the claim commits, so claims of one limited
-- operation are serialised and the running count is exact across workers.
CREATE FUNCTION asyncproc_operation_admit(op text) RETURNS text
    LANGUAGE plpgsql
    SET search_path FROM CURRENT
AS $$
DECLARE
    limits asyncproc_operation_settings%ROWTYPE;
    running bigint;
    capacity double precision;
    refilled double precision;
BEGIN
    SELECT * INTO limits FROM asyncproc_operation_settings WHERE operation = op FOR UPDATE;
    IF NOT FOUND THEN
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

-- 0007's claim, with the admission check before the claim.
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

-- A held task is parked: until its next rate token, or, held by pause or
-- max_running, until a wake below (a minute at most, should a wake be missed).
-- Its job was consumed by the fetch, so moving scheduled_at queues the new one
-- (0007's dispatch trigger); this runs before 0007's asyncproc_requeue_unclaimed,
-- which then finds that job queued.
CREATE FUNCTION asyncproc_park_held() RETURNS trigger
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
                                    ELSE interval '1 minute' END
    WHERE task_id = (NEW.args->>'task_id')::uuid AND status = 'pending';
    RETURN NULL;
END;
$$;

CREATE TRIGGER asyncproc_park_held
    AFTER UPDATE OF status ON procrastinate_jobs
    FOR EACH ROW
    WHEN (OLD.status = 'todo' AND NEW.status = 'doing' AND NEW.task_name = 'asyncproc.run_task'
          AND NEW.args->'claimed' = 'null'::jsonb)
    EXECUTE FUNCTION asyncproc_park_held();

-- Wake held tasks of `op` (all of them, or `how_many`): due now, so that their
-- jobs are queued again and the workers are notified.
CREATE FUNCTION asyncproc_wake_held(op text, how_many integer) RETURNS void
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

REVOKE EXECUTE ON FUNCTION asyncproc_operation_admit(text), asyncproc_wake_held(text, integer) FROM PUBLIC;

-- A task of a limited operation that stops running frees a place: the next held task starts.
CREATE FUNCTION asyncproc_tasks_wake_on_free() RETURNS trigger
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

CREATE TRIGGER tasks_wake_on_free
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status <> 'running')
    EXECUTE FUNCTION asyncproc_tasks_wake_on_free();

-- Changed limits (a resume, a higher max_running, a deleted row) apply to the
-- held tasks at once: they are all tried again.
CREATE FUNCTION asyncproc_operation_settings_changed() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM asyncproc_wake_held(CASE WHEN TG_OP = 'DELETE' THEN OLD.operation ELSE NEW.operation END, NULL);
    RETURN NULL;
END;
$$;

CREATE TRIGGER asyncproc_operation_settings_changed
    AFTER INSERT OR UPDATE OF max_running, rate_per_second, burst, paused OR DELETE ON asyncproc_operation_settings
    FOR EACH ROW EXECUTE FUNCTION asyncproc_operation_settings_changed();

REVOKE EXECUTE ON FUNCTION asyncproc_tasks_wake_on_free(), asyncproc_operation_settings_changed() FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON asyncproc_operation_settings TO asyncproc_operator;
    END IF;
END;
$$;
