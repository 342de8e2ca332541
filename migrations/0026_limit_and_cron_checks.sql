-- Limits and cron expressions the database can hold, whoever writes them
-- (docs/limits-schedules-webhooks.md). Through SQL, a rate of 1e-300 or 1e308
-- made the claim overflow, failing every fetch that met a task of its
-- operation; NaN and Infinity meant "no limit"; a six-field cron fired every
-- second.

-- Why a limits row is refused, or NULL when it is sound. The one place the
-- bounds are written: the CHECK below, the claim (asyncproc_operation_admit,
-- which holds back the tasks of a row that predates the CHECK) and
-- `asyncproc limits set` all ask it. NaN is greater than every number in
-- PostgreSQL, so BETWEEN refuses it, as it refuses both infinities.
CREATE FUNCTION asyncproc_operation_limits_problem(max_running double precision,
                                                   rate_per_second double precision,
                                                   burst double precision) RETURNS text
    LANGUAGE sql
    IMMUTABLE
    PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN NOT max_running BETWEEN 0 AND 1000000 THEN 'max_running must be from 0 to 1000000'
        WHEN NOT rate_per_second BETWEEN 0.001 AND 1000000 THEN 'rate_per_second must be from 0.001 to 1000000'
        WHEN NOT burst BETWEEN 1 AND 1000000 THEN 'burst must be from 1 to 1000000'
    END
$$;

ALTER TABLE asyncproc_operation_settings
    DROP CONSTRAINT asyncproc_operation_settings_max_running_check,
    DROP CONSTRAINT asyncproc_operation_settings_rate_per_second_check,
    DROP CONSTRAINT asyncproc_operation_settings_burst_check,
    ADD CONSTRAINT asyncproc_operation_settings_limits
        CHECK (asyncproc_operation_limits_problem(max_running, rate_per_second, burst) IS NULL) NOT VALID;

-- Five fields (minute, hour, day of month, month, day of week) or an alias:
-- the scheduler's cron library reads a sixth field as seconds. Whether the
-- fields themselves make sense is the scheduler's to say (last_error).
ALTER TABLE asyncproc_schedules
    ADD CONSTRAINT asyncproc_schedules_cron_five_fields
        CHECK (cron ~ '^\s*\S+(\s+\S+){4}\s*$' OR cron ~* '^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$') NOT VALID;

-- A migration never fails on rows written before: a check that an existing
-- row breaks stays NOT VALID (new writes are checked all the same), the claim
-- holds back that operation and the scheduler reports that schedule, until an
-- operator fixes the row and validates the check (the docs say how).
DO $$
DECLARE
    checks CONSTANT text[][] := ARRAY[['asyncproc_operation_settings', 'asyncproc_operation_settings_limits'],
                                      ['asyncproc_schedules', 'asyncproc_schedules_cron_five_fields']];
BEGIN
    FOR i IN 1..array_length(checks, 1) LOOP
        BEGIN
            EXECUTE format('ALTER TABLE %I VALIDATE CONSTRAINT %I', checks[i][1], checks[i][2]);
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING 'rows of % break its new check %; it stays NOT VALID until they are fixed (docs/limits-schedules-webhooks.md)',
                checks[i][1], checks[i][2];
        END;
    END LOOP;
END;
$$;
