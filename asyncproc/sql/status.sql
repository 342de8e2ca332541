-- `asyncproc status`: the queue and the workers, read once each.

-- name: status_task_counts
SELECT status, sum(tasks)::bigint AS tasks
FROM asyncproc_status_counts
GROUP BY status
ORDER BY status

-- name: status_queue
SELECT pending, ready, oldest_pending_age
FROM asyncproc_queue

-- name: status_workers
SELECT w.id, w.last_heartbeat, now() - w.last_heartbeat AS silent_for,
       count(j.id) FILTER (WHERE j.status = 'doing') AS running
FROM procrastinate_workers AS w
LEFT JOIN procrastinate_jobs AS j ON j.worker_id = w.id
GROUP BY w.id, w.last_heartbeat
ORDER BY w.id
