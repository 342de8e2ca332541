-- Named queries on asyncproc_schedules and asyncproc_schedule_runs.

-- name: schedule_insert
INSERT INTO asyncproc_schedules (name, cron, every_seconds, operation, payload, priority, max_attempts, catch_up)
VALUES (%(name)s, %(cron)s, %(every_seconds)s, %(operation)s, %(payload)s, %(priority)s, %(max_attempts)s, %(catch_up)s)

-- name: schedule_delete
DELETE FROM asyncproc_schedules
WHERE name = %(name)s
RETURNING name

-- name: schedule_list
SELECT name, cron, every_seconds, operation, payload, priority, max_attempts, enabled, catch_up,
       next_run_at, last_run_at, last_error
FROM asyncproc_schedules
ORDER BY name

-- name: schedules_lock_due
-- The due schedules, each locked by one worker at a time; the others skip it.
SELECT name, cron, every_seconds, operation, payload, priority, max_attempts, enabled, catch_up,
       next_run_at, last_run_at, last_error, now() AS now
FROM asyncproc_schedules
WHERE enabled AND (next_run_at IS NULL OR next_run_at <= now())
ORDER BY name
FOR UPDATE SKIP LOCKED

-- name: schedule_run_enqueue
-- The occurrence's row and its task in one statement: a second enqueue of the
-- same occurrence, from any worker, finds the row and inserts no task.
WITH run AS (
    INSERT INTO asyncproc_schedule_runs (schedule_name, scheduled_for, task_id)
    VALUES (%(name)s, %(scheduled_for)s, asyncproc_new_task_id())
    ON CONFLICT (schedule_name, scheduled_for) DO NOTHING
    RETURNING task_id
)
INSERT INTO tasks (task_id, operation, payload, priority, max_attempts, request_id)
SELECT run.task_id, %(operation)s, %(payload)s, %(priority)s, %(max_attempts)s, %(request_id)s
FROM run
RETURNING task_id

-- name: schedule_advance
UPDATE asyncproc_schedules
SET next_run_at = %(next_run_at)s,
    last_run_at = COALESCE(%(last_run_at)s, last_run_at),
    last_error = %(last_error)s
WHERE name = %(name)s
