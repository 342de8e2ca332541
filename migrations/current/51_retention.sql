-- Pruning finished tasks past their retention (asyncproc_retention, the
-- pruner's defaults; docs/retention.md). The counts and the history
-- (50_ledger_counts.sql) outlive the pruned rows.

-- How long finished tasks of each (operation, status) stay, for the operations
-- the counts know of: an override from asyncproc_retention, else the default
-- given for the status. NULL means forever.
CREATE OR REPLACE FUNCTION asyncproc_retention_rules(keep_completed interval, keep_failed interval, keep_cancelled interval)
    RETURNS TABLE (operation text, status text, keep interval, finished bigint)
    LANGUAGE sql STABLE
AS $$
    SELECT counted.operation, counted.status,
           CASE WHEN rule.operation IS NOT NULL THEN rule.keep
                WHEN counted.status = 'completed' THEN keep_completed
                WHEN counted.status = 'failed' THEN keep_failed
                ELSE keep_cancelled END,
           counted.finished
    FROM (
        SELECT c.operation, s.status, s.finished
        FROM asyncproc_operation_counts AS c,
             LATERAL (VALUES ('completed', c.completed), ('failed', c.failed), ('cancelled', c.cancelled))
                 AS s(status, finished)
        WHERE s.finished > 0
    ) AS counted
    LEFT JOIN asyncproc_retention AS rule
        ON rule.operation = counted.operation AND rule.status = counted.status
$$;

-- What asyncproc_prune would delete now, per (operation, status): for
-- `asyncproc prune --dry-run`. It counts rows, so it takes time on a big backlog.
CREATE OR REPLACE FUNCTION asyncproc_prune_due(keep_completed interval, keep_failed interval, keep_cancelled interval)
    RETURNS TABLE (operation text, status text, keep interval, due bigint)
    LANGUAGE sql STABLE
AS $$
    SELECT rule.operation, rule.status, rule.keep,
           (SELECT count(*) FROM tasks
            WHERE tasks.status = rule.status AND tasks.operation = rule.operation
              AND tasks.created_at < now() - rule.keep AND tasks.completed_at < now() - rule.keep)
    FROM asyncproc_retention_rules(keep_completed, keep_failed, keep_cancelled) AS rule
    ORDER BY rule.operation, rule.status
$$;

-- Deletes at most `batch_size` finished tasks past their retention, in one
-- short transaction; returns how many, or NULL when another session is
-- pruning (one pruner at a time across the fleet). Rows are locked with SKIP
-- LOCKED and their status checked under the lock, so a task is never deleted
-- while it is not final, nor waited for while someone else holds it.
-- Each (operation, status) is found through tasks_status_operation_created_at_idx:
-- a task finished before the cutoff was created before it.
CREATE OR REPLACE FUNCTION asyncproc_prune(keep_completed interval, keep_failed interval, keep_cancelled interval,
                                batch_size integer DEFAULT 1000)
    RETURNS integer
    LANGUAGE plpgsql
AS $$
DECLARE
    rule record;
    removed integer;
    total integer := 0;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('asyncproc_prune')) THEN
        RETURN NULL;
    END IF;
    FOR rule IN SELECT * FROM asyncproc_retention_rules(keep_completed, keep_failed, keep_cancelled)
                WHERE keep IS NOT NULL ORDER BY operation, status LOOP
        EXIT WHEN total >= batch_size;
        WITH doomed AS (
            SELECT task_id
            FROM tasks
            WHERE status = rule.status AND operation = rule.operation
              AND created_at < now() - rule.keep
              AND completed_at < now() - rule.keep
            LIMIT batch_size - total
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM tasks
        USING doomed
        WHERE tasks.task_id = doomed.task_id AND tasks.status IN ('completed', 'failed', 'cancelled');
        GET DIAGNOSTICS removed = ROW_COUNT;
        total := total + removed;
    END LOOP;
    RETURN total;
END;
$$;
