-- The worker's lease (worker/lease.py): its row in procrastinate_workers,
-- whose heartbeat the sweep reads (asyncproc_sweep prunes a worker silent for
-- ASYNCPROC_STALLED_SECONDS and re-queues its tasks).

-- name: lease_register
WITH registered AS (SELECT worker_id FROM procrastinate_register_worker_v1())
INSERT INTO asyncproc_worker_hosts (worker_id, host, pid)
SELECT worker_id, %(host)s, %(pid)s FROM registered
RETURNING worker_id

-- name: lease_renew
-- No row: the sweep has pruned this worker, and its tasks may run elsewhere.
UPDATE procrastinate_workers SET last_heartbeat = now()
WHERE id = %(worker_id)s
RETURNING id

-- name: lease_shorten
-- The lease lapses in %(seconds)s, for a worker that exits now.
UPDATE procrastinate_workers
SET last_heartbeat = least(last_heartbeat, now() - make_interval(secs => %(stalled_seconds)s - %(seconds)s))
WHERE id = %(worker_id)s
RETURNING id

-- name: lease_release
SELECT procrastinate_unregister_worker_v1(%(worker_id)s)
