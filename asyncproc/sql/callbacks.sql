-- Named queries on the completion-webhook outbox (asyncproc_callbacks) and its attempts.

-- name: callback_list_for_task
SELECT c.id, c.url, c.task->>'status' AS task_status, c.state, c.attempts, c.next_attempt_at, c.created_at,
       c.delivered_at, c.last_error,
       COALESCE((SELECT jsonb_agg(jsonb_build_object('attempted_at', a.attempted_at,
                                                     'response_status', a.response_status,
                                                     'error', a.error,
                                                     'duration_ms', a.duration_ms) ORDER BY a.id)
                 FROM asyncproc_callback_attempts a
                 WHERE a.callback_id = c.id), '[]'::jsonb) AS attempt_log
FROM asyncproc_callbacks c
WHERE c.task_id = %(task_id)s
ORDER BY c.id

-- name: callbacks_claim_due
-- Due deliveries, each taken by one worker: attempts counts the one starting,
-- and next_attempt_at becomes a lease, so that a delivery whose worker died
-- is taken again once the lease is over.
UPDATE asyncproc_callbacks AS c
SET attempts = c.attempts + 1, next_attempt_at = now() + make_interval(secs => %(lease_seconds)s)
FROM (SELECT id
      FROM asyncproc_callbacks
      WHERE state = 'pending' AND next_attempt_at <= now()
      ORDER BY next_attempt_at
      LIMIT %(limit)s
      FOR UPDATE SKIP LOCKED) AS due
WHERE c.id = due.id
RETURNING c.id, c.task_id, c.url, c.task, c.attempts, c.created_at,
          (SELECT k.callback_secret FROM api_keys k WHERE k.id = (c.task->>'owner')::bigint) AS key_secret

-- name: callback_record_attempt
-- The attempt and the delivery's new state in one statement.
WITH attempt AS (
    INSERT INTO asyncproc_callback_attempts (callback_id, response_status, error, duration_ms)
    VALUES (%(id)s, %(response_status)s, %(error)s, %(duration_ms)s)
)
UPDATE asyncproc_callbacks
SET state = %(state)s,
    next_attempt_at = CASE WHEN %(state)s = 'pending' THEN now() + make_interval(secs => %(retry_in)s)
                           ELSE next_attempt_at END,
    delivered_at = CASE WHEN %(state)s = 'delivered' THEN now() END,
    last_error = %(error)s
WHERE id = %(id)s
