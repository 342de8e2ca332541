-- Dashboard sessions held on the server (asyncproc/dashboard/access.py), so
-- that signing out ends a session for every copy of its cookie, and a session
-- ends after an idle time and an absolute time (ASYNCPROC_DASHBOARD_IDLE_SECONDS,
-- ASYNCPROC_DASHBOARD_SESSION_MAX_SECONDS). The cookie carries a random token;
-- the table holds only its SHA-256, so that a read of the table signs no one in.
-- Every page looks its session up by the primary key; signing in deletes the
-- sessions that have expired, so the table holds only those that may still live.
CREATE TABLE asyncproc_dashboard_sessions (
    token_hash   bytea       PRIMARY KEY CHECK (length(token_hash) = 32),
    key_id       bigint      NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- Moved forward at most once per tenth of the idle time, not on every page.
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE asyncproc_dashboard_sessions IS 'signed-in dashboard sessions; a deleted row is a signed-out session';
