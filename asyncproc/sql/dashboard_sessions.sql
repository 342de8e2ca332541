-- Dashboard sessions (migrations/0028_dashboard_sessions.sql, asyncproc/dashboard/access.py).
-- Each statement finds its session by the SHA-256 of the cookie's token.

-- name: dashboard_session_create
INSERT INTO asyncproc_dashboard_sessions (token_hash, key_id)
VALUES (%(token_hash)s, %(key_id)s)

-- name: dashboard_session_get
-- The session's key and role while the session is live and the key is neither
-- revoked nor stripped of its dashboard role: one primary-key lookup each. The
-- session's last activity is written only when it is older than touch_seconds,
-- so that reading pages does not write a row each.
WITH live AS (
    SELECT s.token_hash, s.key_id, s.last_seen_at, k.dashboard_role
    FROM asyncproc_dashboard_sessions AS s
    JOIN api_keys AS k ON k.id = s.key_id
    WHERE s.token_hash = %(token_hash)s
      AND s.last_seen_at > now() - make_interval(secs => %(idle_seconds)s)
      AND s.created_at > now() - make_interval(secs => %(max_seconds)s)
      AND k.revoked_at IS NULL
      AND k.dashboard_role IS NOT NULL
), touched AS (
    UPDATE asyncproc_dashboard_sessions AS s
    SET last_seen_at = now()
    FROM live
    WHERE s.token_hash = live.token_hash
      AND live.last_seen_at < now() - make_interval(secs => %(touch_seconds)s)
)
SELECT key_id, dashboard_role
FROM live

-- name: dashboard_session_delete
DELETE FROM asyncproc_dashboard_sessions
WHERE token_hash = %(token_hash)s

-- name: dashboard_sessions_prune
DELETE FROM asyncproc_dashboard_sessions
WHERE last_seen_at <= now() - make_interval(secs => %(idle_seconds)s)
   OR created_at <= now() - make_interval(secs => %(max_seconds)s)
