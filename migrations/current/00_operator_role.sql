-- Access. Functions are executable by PUBLIC unless revoked. The dispatch
-- helpers and the worker's functions are for the triggers and the worker
-- (the owner) only: a role with no rights on `tasks` must not be able to
-- delete a task's job or re-queue a running task through them. So each file
-- of this directory revokes EXECUTE from PUBLIC on the functions it defines,
-- except those meant for everyone. Operators get a role of their own.
--
-- The operator role: what an operator's psql session may do (docs/operating-with-sql.md,
-- "Who may do this"). It may read and change tasks, limits, retention and
-- schedules, and read the ledger and the deliveries; the functions and views
-- it may use are granted in the files that define them, so that a view or a
-- function made anew is granted anew.
--
-- Roles belong to the whole server: another database may have made it
-- already, and a migrating role without CREATEROLE leaves it to an admin
-- (docs: "Operators"). Once the role exists, the GRANTs of this directory's
-- files can be run by hand, or the files re-applied by deleting their rows
-- from asyncproc_current_state and running `asyncproc migrate`.
DO $$
BEGIN
    BEGIN
        CREATE ROLE asyncproc_operator NOLOGIN;
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN NULL;
        WHEN insufficient_privilege THEN
            RAISE NOTICE 'role asyncproc_operator not created (no CREATEROLE right): create it, then run the GRANTs of migrations/current/ by hand';
    END;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT, INSERT, UPDATE ON tasks TO asyncproc_operator;
        GRANT SELECT, INSERT, UPDATE, DELETE ON asyncproc_retention, asyncproc_operation_settings,
            asyncproc_schedules TO asyncproc_operator;
        GRANT SELECT ON asyncproc_schedule_runs, asyncproc_callbacks, asyncproc_callback_attempts,
            asyncproc_attempts, asyncproc_worker_hosts TO asyncproc_operator;
    END IF;
END;
$$;
