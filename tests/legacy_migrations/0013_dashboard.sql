-- The dashboard (asyncproc/dashboard/): who may use it, its session secret,
-- and the indexes its task list pages with.

-- NULL: the key cannot sign in to the dashboard; 'read': it sees everything;
-- 'operate': it may also retry and cancel.
ALTER TABLE api_keys ADD COLUMN dashboard_role text CHECK (dashboard_role IN ('read', 'operate'));
COMMENT ON COLUMN api_keys.dashboard_role IS 'dashboard access: NULL none, read, or operate (retry and cancel)';

-- Signs the dashboard's session cookies. One row shared by every API process
-- on every host, so a session made by one is honoured by all; gen_random_uuid
-- draws from the server's strong random source.
CREATE TABLE asyncproc_dashboard_secret (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    secret  text    NOT NULL
);
INSERT INTO asyncproc_dashboard_secret (secret)
VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));

-- The task list pages newest first by (created_at, task_id), with or without
-- a status filter, so each page reads its 50 rows from an index.
CREATE INDEX tasks_created_at_task_id_idx ON tasks (created_at, task_id);
CREATE INDEX tasks_status_created_at_task_id_idx ON tasks (status, created_at, task_id);

-- The tasks that match the dashboard's filters, newest first; a NULL filter
-- matches everything. The dashboard's list and its bulk actions read this, and
-- so can psql:
--   SELECT asyncproc_cancel(task_id) FROM asyncproc_tasks_matching(status => 'pending', operation => 'sleep');
-- LANGUAGE sql STABLE so that the planner inlines it and a constant NULL
-- filter folds away, leaving a plan that uses the indexes above.
CREATE FUNCTION asyncproc_tasks_matching(
    status text DEFAULT NULL,
    operation text DEFAULT NULL,
    created_from timestamptz DEFAULT NULL,
    created_to timestamptz DEFAULT NULL,
    error_contains text DEFAULT NULL,
    owner_name text DEFAULT NULL
)
    RETURNS SETOF tasks
    LANGUAGE sql STABLE
AS $$
    SELECT t.*
    FROM tasks AS t
    WHERE (asyncproc_tasks_matching.status IS NULL OR t.status = asyncproc_tasks_matching.status)
      AND (asyncproc_tasks_matching.operation IS NULL OR t.operation = asyncproc_tasks_matching.operation)
      AND (created_from IS NULL OR t.created_at >= created_from)
      AND (created_to IS NULL OR t.created_at < created_to)
      AND (error_contains IS NULL OR strpos(lower(t.error_message), lower(error_contains)) > 0)
      AND (owner_name IS NULL OR t.owner IN (SELECT k.id FROM api_keys AS k WHERE k.name = owner_name))
$$;
