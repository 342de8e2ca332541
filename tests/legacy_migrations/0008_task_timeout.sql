-- A task's own time limit, for an operator's INSERT as for POST /process's
-- timeout_seconds. NULL: the operation's limit, else the worker's default
-- (ASYNCPROC_HANDLER_TIMEOUT_SECONDS). Past it, the worker stops the attempt.

ALTER TABLE tasks
    ADD COLUMN timeout_seconds double precision
        CONSTRAINT tasks_timeout_seconds_check CHECK (timeout_seconds > 0 AND timeout_seconds <= 604800);

COMMENT ON COLUMN tasks.timeout_seconds IS
    'time limit of each attempt, in seconds (at most a week); NULL: the operation''s or the worker''s default';
