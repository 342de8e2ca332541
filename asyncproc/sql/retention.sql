-- Named queries of the pruner and `asyncproc prune` (migrations/current/51_retention.sql
-- holds the functions; docs/retention.md explains them).

-- name: retention_prune
-- One bounded batch in one short transaction; NULL when another session prunes.
SELECT asyncproc_prune(%(keep_completed)s::interval, %(keep_failed)s::interval, %(keep_cancelled)s::interval,
                       %(batch_size)s) AS pruned

-- name: retention_due
SELECT operation, status, keep, due
FROM asyncproc_prune_due(%(keep_completed)s::interval, %(keep_failed)s::interval, %(keep_cancelled)s::interval)

-- name: retention_compact
-- Folds the logged changes into the counts and the history, and old minutes
-- into hours and days. No row when another session is compacting right now:
-- its pass covers the same rows.
SELECT asyncproc_compact() AS compacted
FROM (SELECT pg_try_advisory_xact_lock(hashtext('asyncproc_compact')) AS mine) AS lock
WHERE lock.mine
