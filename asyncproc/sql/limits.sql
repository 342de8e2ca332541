-- Named queries on asyncproc_operation_settings.

-- name: operation_limits_problem
-- Why these limits would be refused, or NULL: the bounds of the CHECK (migrations/0026_limit_and_cron_checks.sql).
SELECT asyncproc_operation_limits_problem(%(max_running)s, %(rate_per_second)s, %(burst)s) AS problem

-- name: operation_limits_set
-- Only the limits given change; a NULL parameter keeps the current value.
INSERT INTO asyncproc_operation_settings (operation, max_running, rate_per_second, burst)
VALUES (%(operation)s, %(max_running)s, %(rate_per_second)s, %(burst)s)
ON CONFLICT (operation) DO UPDATE
SET max_running = CASE WHEN %(set_max_running)s THEN EXCLUDED.max_running ELSE asyncproc_operation_settings.max_running END,
    rate_per_second = CASE WHEN %(set_rate)s THEN EXCLUDED.rate_per_second ELSE asyncproc_operation_settings.rate_per_second END,
    burst = CASE WHEN %(set_burst)s THEN EXCLUDED.burst ELSE asyncproc_operation_settings.burst END,
    updated_at = now()

-- name: operation_limits_pause
INSERT INTO asyncproc_operation_settings (operation, paused)
VALUES (%(operation)s, %(paused)s)
ON CONFLICT (operation) DO UPDATE
SET paused = EXCLUDED.paused, updated_at = now()

-- name: operation_limits_list
SELECT s.operation, s.max_running, s.rate_per_second, s.burst, s.paused,
       (SELECT count(*) FROM tasks t WHERE t.status = 'running' AND t.operation = s.operation) AS running,
       (SELECT count(*) FROM tasks t WHERE t.status = 'pending' AND t.operation = s.operation
                                       AND t.wait_reason IS NOT NULL) AS held
FROM asyncproc_operation_settings s
ORDER BY s.operation
