-- The baseline: every table, index, constraint and seed row of asyncproc, as
-- the 23 migrations 0002-0024 had left them, written once in their current
-- form. Functions, triggers, views and the operator's grants are not here:
-- they are the current-state files of migrations/current/, applied after the
-- versioned migrations whenever they change (asyncproc/migrate.py).
--
-- A database migrated by 0002-0024 is not migrated by this file: the runner
-- finds that history recorded, records this file as applied and goes on with
-- the current-state files. Those 23 files are kept, as history, in
-- tests/legacy_migrations/, where the schema parity test builds a database
-- with them and upgrades it.
--
-- Procrastinate's own tables come before this file (0001); our indexes on
-- them are the last section.

-- ---------------------------------------------------------------------------
-- Task ids.

-- Task ids are UUIDv7 (RFC 9562): the Unix time in milliseconds, then 74 random
-- bits. With gen_random_uuid()'s random ids every new task, its job's
-- queueing lock and each of its status changes landed on a random page of
-- indexes that grow with the table: with a million tasks queued, the worker
-- wrote 13.9 kB of WAL per task (whole pages, first touched since the last
-- checkpoint) where it wrote 5.6 kB on an empty table. Time-ordered ids
-- keep that work on the few pages at the right edge of each index: 5.5 kB per
-- task at a million queued. 74 random bits keep an id
-- as hard to guess as a session token. The API makes its ids the same way
-- (asyncproc/ledger.py: new_task_id); this default serves psql and the
-- single-task insert.
-- It is here rather than in migrations/current/ because tasks.task_id's
-- default depends on it: like a column type, it is created once, and a change
-- to it is a versioned migration.
CREATE FUNCTION asyncproc_new_task_id()
    RETURNS uuid
    LANGUAGE sql
    VOLATILE
    PARALLEL SAFE
AS $$
    -- A random v4 id with its first 48 bits replaced by the time, and its
    -- version nibble 0100 made 0111 (bits 52 and 53 of set_bit's numbering).
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- ---------------------------------------------------------------------------
-- api_keys: API keys for ASYNCPROC_AUTH=required, and the owner of each task.
-- Keys are stored only as SHA-256 hashes of their secret part; the key itself
-- is shown once, by `asyncproc keys create NAME`.

CREATE TABLE api_keys (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL CHECK (name ~ '^[A-Za-z0-9_.@-]{1,100}$'),
    key_hash    bytea       NOT NULL CHECK (length(key_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    -- Quotas per key, set with `asyncproc keys limit`; NULL: no limit.
    max_active_tasks    integer CHECK (max_active_tasks >= 0),
    max_priority        integer,
    max_batch_tasks     integer CHECK (max_batch_tasks >= 1),
    max_timeout_seconds double precision CHECK (max_timeout_seconds > 0),
    -- Each key signs its callbacks with a secret of its own. It must be readable
    -- to sign with, so unlike the key it is stored as is. 2 x 122 random bits.
    callback_secret text NOT NULL
        DEFAULT encode(sha256((gen_random_uuid()::text || gen_random_uuid()::text)::bytea), 'hex'),
    -- NULL: the key cannot sign in to the dashboard; 'read': it sees everything;
    -- 'operate': it may also retry and cancel.
    dashboard_role text CHECK (dashboard_role IN ('read', 'operate'))
);

COMMENT ON TABLE api_keys IS 'asyncproc API keys; key_hash is sha256 of the secret, the key is never stored';
COMMENT ON COLUMN api_keys.dashboard_role IS 'dashboard access: NULL none, read, or operate (retry and cancel)';

-- A name identifies one live key; a revoked name may be issued again.
CREATE UNIQUE INDEX api_keys_live_name_idx ON api_keys (name) WHERE revoked_at IS NULL;

-- Token buckets for ASYNCPROC_RATE_LIMIT_*, shared by every API process.
-- UNLOGGED: losing them in a crash only refills every bucket.
CREATE UNLOGGED TABLE api_rate_buckets (
    bucket      text             PRIMARY KEY,
    tokens      double precision NOT NULL,
    granted     boolean          NOT NULL,
    updated_at  timestamptz      NOT NULL
);

-- Rate-limit buckets untouched this long are full again, so they can go.
CREATE INDEX api_rate_buckets_updated_at_idx ON api_rate_buckets (updated_at);

-- ---------------------------------------------------------------------------
-- tasks: the ledger, the system of record and the queue's public face.
-- Column names and meanings are a public contract (see README, "The tasks table").

CREATE TABLE tasks (
    task_id         uuid        PRIMARY KEY DEFAULT asyncproc_new_task_id(),
    operation       text        NOT NULL DEFAULT 'compute'
                                CHECK (operation ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    payload         jsonb       NOT NULL DEFAULT '{}'
                                CHECK (jsonb_typeof(payload) = 'object'),
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    result          jsonb,
    error_message   text,
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    priority        integer     NOT NULL DEFAULT 0,
    progress        smallint    CHECK (progress BETWEEN 0 AND 100),
    progress_message text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    scheduled_at    timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    request_id      text,
    -- The key that created a task. NULL when access control was off, or for
    -- rows inserted with psql; such tasks are readable by no key.
    owner           bigint      REFERENCES api_keys (id),
    -- A task's own time limit, for an operator's INSERT as for POST /process's
    -- timeout_seconds. NULL: the operation's limit, else the worker's default
    -- (ASYNCPROC_HANDLER_TIMEOUT_SECONDS). Past it, the worker stops the attempt.
    timeout_seconds double precision
                                CHECK (timeout_seconds > 0 AND timeout_seconds <= 604800),
    -- What a replay is compared with: a hash of the request that used the key.
    -- NULL for rows inserted without the API: a replay then compares the stored fields.
    idempotency_fingerprint text,
    callback_url    text        CHECK (callback_url ~ '^https?://' AND length(callback_url) <= 2000),
    wait_reason     text
);

COMMENT ON TABLE tasks IS 'asyncproc ledger: one row per task; INSERT a row to enqueue it';
COMMENT ON COLUMN tasks.attempts IS 'runs started so far';
COMMENT ON COLUMN tasks.scheduled_at IS 'earliest time the next attempt may start';
COMMENT ON COLUMN tasks.owner IS 'api_keys.id of the key that created the task; NULL without access control';
COMMENT ON COLUMN tasks.timeout_seconds IS
    'time limit of each attempt, in seconds (at most a week); NULL: the operation''s or the worker''s default';
COMMENT ON COLUMN tasks.idempotency_fingerprint IS
    'sha256 of the canonical request that used idempotency_key; a replay with another request is a 409';
COMMENT ON COLUMN tasks.callback_url IS 'POSTed the task document when the task reaches a final status';
COMMENT ON COLUMN tasks.wait_reason IS 'why a pending task is held back by its operation''s limits; NULL otherwise';

-- Serves the queue (status = pending, oldest first), stuck-task checks, and
-- counts by status and operation as an index-only scan.
CREATE INDEX tasks_status_operation_created_at_idx ON tasks (status, operation, created_at);

-- Reporting by finish time.
CREATE INDEX tasks_completed_at_idx ON tasks (completed_at) WHERE completed_at IS NOT NULL;

-- An Idempotency-Key is unique per owner (api_keys.id, or none without access
-- control), not across every client.
CREATE UNIQUE INDEX tasks_owner_idempotency_key_idx ON tasks ((COALESCE(owner, 0)), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The quota check counts one owner's pending and running tasks.
CREATE INDEX tasks_owner_active_idx ON tasks (owner) WHERE status IN ('pending', 'running');

-- "What failed in the last 24 hours?" (asyncproc_recent_failures) read every
-- task finished in the window through tasks_completed_at_idx: 60 ms at 10M
-- rows. Only failed rows enter this one, so it costs the hot path nothing else.
CREATE INDEX tasks_failed_completed_at_idx ON tasks (completed_at) WHERE status = 'failed';

-- The tasks an operation's limits hold back, woken in priority order.
CREATE INDEX tasks_held_idx ON tasks (operation, priority DESC, created_at) WHERE status = 'pending' AND wait_reason IS NOT NULL;

-- The dashboard's task list pages newest first by (created_at, task_id), with
-- or without a status filter, so each page reads its 50 rows from an index.
CREATE INDEX tasks_created_at_task_id_idx ON tasks (created_at, task_id);
CREATE INDEX tasks_status_created_at_task_id_idx ON tasks (status, created_at, task_id);

-- The running tasks, found without reading the pending ones. The sweep looks
-- for running tasks that lost their job, and the claim counts an operation's
-- running tasks. Once the planner had statistics of a million pending
-- tasks (after autovacuum's ANALYZE), it read them through
-- tasks_owner_active_idx (pending and running, by owner) to find 20 running
-- ones: 0.6 s per sweep alone, tens of seconds while the workers ran. A partial
-- index over running tasks is as small as the running set, and its predicate
-- matches those statements exactly.
CREATE INDEX tasks_running_idx ON tasks (operation) WHERE status = 'running';

-- ---------------------------------------------------------------------------
-- The attempts ledger (docs/reliability.md, "Leases and fencing"): one row
-- per claimed run, written by the statement that moves the task to running
-- (the claim) and closed by the statement that moves it on, so the two can
-- never disagree.

CREATE TABLE asyncproc_attempts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     uuid        NOT NULL,
    -- The task's attempts counter during this run. A run given back (outcome
    -- interrupted) does not count, so the next run carries the same number.
    attempt     integer     NOT NULL,
    worker_id   bigint,
    host        text,
    pid         integer,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text        NOT NULL DEFAULT 'running'
                CHECK (outcome IN ('running', 'completed', 'failed', 'retried', 'cancelled', 'interrupted', 'lost')),
    error       text
);

COMMENT ON TABLE asyncproc_attempts IS
    'asyncproc attempts ledger: one row per run of a task; outcome running|completed|failed|retried|cancelled|interrupted|lost';

CREATE INDEX asyncproc_attempts_task_idx ON asyncproc_attempts (task_id, id);

-- Who a worker is, for the ledger: Procrastinate's worker rows hold an id and
-- a heartbeat only. Written by the worker's lease when it registers.
CREATE TABLE asyncproc_worker_hosts (
    worker_id  bigint      PRIMARY KEY REFERENCES procrastinate_workers (id) ON DELETE CASCADE,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE asyncproc_worker_hosts IS 'asyncproc: the host and pid of each live worker (procrastinate_workers.id)';

-- Pending tasks whose edited time or priority could not reach their queued
-- job, because another transaction held it. The sweep applies them.
CREATE TABLE asyncproc_redefer_wanted (
    task_id uuid PRIMARY KEY
);

-- ---------------------------------------------------------------------------
-- The ledger at scale: exact counts without scanning `tasks`, history that
-- outlives pruned rows, and the retention rules the pruner applies
-- (docs/retention.md; the triggers and functions are migrations/current/50_ledger_counts.sql).

-- One row per change of `tasks`: `tasks` rows of `operation` moved from
-- status_from (NULL: inserted) to status_to (NULL: deleted). finished_at,
-- run_seconds and wait_seconds describe the final row involved, if any: the
-- new one when a task finishes, the old one when a finished task is retried.
CREATE TABLE asyncproc_ledger_events (
    operation    text   NOT NULL,
    status_from  text,
    status_to    text,
    tasks        bigint NOT NULL,
    finished_at  timestamptz,
    run_seconds  float8,
    wait_seconds float8
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000);

COMMENT ON TABLE asyncproc_ledger_events IS
    'asyncproc: changes of tasks not yet folded into asyncproc_counts and asyncproc_rollups';

-- Current counts and monotonic totals per operation, as of the last compaction.
CREATE TABLE asyncproc_counts (
    operation       text   PRIMARY KEY,
    pending         bigint NOT NULL DEFAULT 0,
    running         bigint NOT NULL DEFAULT 0,
    completed       bigint NOT NULL DEFAULT 0,
    failed          bigint NOT NULL DEFAULT 0,
    cancelled       bigint NOT NULL DEFAULT 0,
    -- Monotonic: tasks ever inserted, and transitions ever into each final status.
    enqueued_total  bigint NOT NULL DEFAULT 0,
    completed_total bigint NOT NULL DEFAULT 0,
    failed_total    bigint NOT NULL DEFAULT 0,
    cancelled_total bigint NOT NULL DEFAULT 0,
    -- Of every transition into completed or failed: the last attempt's run
    -- time (started_at to completed_at) and queue wait (scheduled_at to started_at).
    run_histogram   bigint[],
    run_sum         float8 NOT NULL DEFAULT 0,
    wait_histogram  bigint[],
    wait_sum        float8 NOT NULL DEFAULT 0
);

COMMENT ON TABLE asyncproc_counts IS
    'asyncproc: task counts as of the last compaction; read asyncproc_operation_counts or asyncproc_status_counts';

-- The history: finished tasks per time bucket, operation and final status.
CREATE TABLE asyncproc_rollups (
    bucket_start   timestamptz NOT NULL,
    bucket_width   interval    NOT NULL CHECK (bucket_width IN ('1 minute', '1 hour', '1 day')),
    operation      text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    tasks          bigint      NOT NULL,
    run_histogram  bigint[],
    run_sum        float8      NOT NULL DEFAULT 0,
    wait_histogram bigint[],
    wait_sum       float8      NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, operation, status, bucket_width)
);

COMMENT ON TABLE asyncproc_rollups IS
    'asyncproc: finished tasks per time bucket as of the last compaction; read the asyncproc_history view';

-- Per-operation retention overrides. `keep` NULL means forever. Without a row
-- for an (operation, status), the pruner uses ASYNCPROC_RETAIN_<STATUS>.
CREATE TABLE asyncproc_retention (
    operation text     NOT NULL,
    status    text     NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    keep      interval CHECK (keep >= interval '0'),
    PRIMARY KEY (operation, status)
);

COMMENT ON TABLE asyncproc_retention IS
    'asyncproc: how long finished tasks of one operation stay in tasks; keep NULL = forever';

-- ---------------------------------------------------------------------------
-- Per-operation limits, across the fleet: applied where a worker claims a
-- task. A task held back stays pending, says why in tasks.wait_reason, and is
-- parked (its scheduled_at moved on); capacity freeing wakes the next one at once.

CREATE TABLE asyncproc_operation_settings (
    operation       text             PRIMARY KEY CHECK (operation ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    max_running     integer          CHECK (max_running >= 0),
    rate_per_second double precision CHECK (rate_per_second > 0),
    burst           integer          CHECK (burst >= 1),
    paused          boolean          NOT NULL DEFAULT false,
    -- The token bucket of rate_per_second, kept by the claim.
    tokens          double precision,
    tokens_at       timestamptz,
    updated_at      timestamptz      NOT NULL DEFAULT now()
);

COMMENT ON TABLE asyncproc_operation_settings IS 'asyncproc per-operation limits: max_running, rate_per_second/burst, paused';

-- ---------------------------------------------------------------------------
-- Schedules (periodic tasks). A scheduler loop of the workers enqueues due
-- occurrences. See docs/limits-schedules-webhooks.md.

-- A schedule enqueues `operation` with `payload` on a cron expression (5
-- fields, UTC) or every `every_seconds` seconds (counted from the epoch, so
-- every worker computes the same occurrences).
CREATE TABLE asyncproc_schedules (
    name          text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    cron          text        CHECK (length(cron) BETWEEN 1 AND 200),
    every_seconds integer     CHECK (every_seconds BETWEEN 1 AND 31622400),
    operation     text        NOT NULL CHECK (operation ~ '^[A-Za-z0-9_.:-]{1,100}$'),
    payload       jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    priority      integer     NOT NULL DEFAULT 0,
    max_attempts  integer     NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    enabled       boolean     NOT NULL DEFAULT true,
    -- After downtime: 'skip' runs only an occurrence less than
    -- ASYNCPROC_SCHEDULE_MISFIRE_SECONDS late; 'one' runs the latest missed one, once.
    catch_up      text        NOT NULL DEFAULT 'skip' CHECK (catch_up IN ('skip', 'one')),
    -- Kept by the scheduler; NULL means "compute from now".
    next_run_at   timestamptz,
    last_run_at   timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);

COMMENT ON TABLE asyncproc_schedules IS 'asyncproc periodic tasks: INSERT, UPDATE or DELETE rows to change them';

-- One row per enqueued occurrence. The primary key is what makes each
-- occurrence run once across the fleet, whatever the workers' clocks and races.
CREATE TABLE asyncproc_schedule_runs (
    schedule_name text        NOT NULL REFERENCES asyncproc_schedules (name) ON DELETE CASCADE,
    scheduled_for timestamptz NOT NULL,
    task_id       uuid        NOT NULL,
    enqueued_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_name, scheduled_for)
);

-- ---------------------------------------------------------------------------
-- Completion webhooks: a delivery loop of the workers POSTs finished tasks to
-- their callback_url.

-- The outbox: one delivery per final status of a task with a callback_url,
-- with the task row as it was then. The workers deliver it.
CREATE TABLE asyncproc_callbacks (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         uuid        NOT NULL,
    url             text        NOT NULL,
    task            jsonb       NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);

COMMENT ON TABLE asyncproc_callbacks IS 'asyncproc completion webhooks: one row per delivery, state pending|delivered|failed';

CREATE INDEX asyncproc_callbacks_due_idx ON asyncproc_callbacks (next_attempt_at) WHERE state = 'pending';
CREATE INDEX asyncproc_callbacks_task_id_idx ON asyncproc_callbacks (task_id);

-- Every HTTP attempt of a delivery.
CREATE TABLE asyncproc_callback_attempts (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    callback_id     bigint      NOT NULL REFERENCES asyncproc_callbacks (id) ON DELETE CASCADE,
    attempted_at    timestamptz NOT NULL DEFAULT now(),
    response_status integer,
    error           text,
    duration_ms     integer     NOT NULL
);

CREATE INDEX asyncproc_callback_attempts_callback_id_idx ON asyncproc_callback_attempts (callback_id);

-- ---------------------------------------------------------------------------
-- The dashboard (asyncproc/dashboard/).

-- Signs the dashboard's session cookies. One row shared by every API process
-- on every host, so a session made by one is honoured by all; gen_random_uuid
-- draws from the server's strong random source.
CREATE TABLE asyncproc_dashboard_secret (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    secret  text    NOT NULL
);

INSERT INTO asyncproc_dashboard_secret (secret)
VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));

-- ---------------------------------------------------------------------------
-- Procrastinate's procrastinate_jobs: our indexes on a table that is not ours.
-- Procrastinate's own indexes serve its own functions; these serve ours
-- (migrations/current/20_procrastinate_bridge.sql, 30_procrastinate_claim_and_fetch.sql,
-- 41_sweep.sql). A Procrastinate upgrade that changes the table must keep them valid.

-- Jobs are only ever looked up by task id while 'doing', and there are few.
CREATE INDEX asyncproc_jobs_doing_task_id_idx
    ON procrastinate_jobs ((args->>'task_id'))
    WHERE status = 'doing';

-- The sweep finds dead jobs through this index, not by reading every job.
CREATE INDEX asyncproc_jobs_dead_idx ON procrastinate_jobs (id)
    WHERE task_name = 'asyncproc.run_task'
      AND (status IN ('failed', 'aborted', 'cancelled') OR (status = 'doing' AND worker_id IS NULL));

-- The fetch reads due jobs only. A job is due when its scheduled_at is NULL:
-- the defer leaves it NULL for "now", and the fetch clears it once it falls
-- due. Procrastinate's fetch walks every queued job in priority order and
-- filters on scheduled_at, so with a million tasks scheduled for tomorrow a
-- fetch that found nothing due read a million index entries (about a second).
CREATE INDEX asyncproc_jobs_scheduled_idx ON procrastinate_jobs (scheduled_at)
    WHERE status = 'todo' AND scheduled_at IS NOT NULL;
CREATE INDEX asyncproc_jobs_due_idx ON procrastinate_jobs (priority DESC, id)
    WHERE status = 'todo' AND scheduled_at IS NULL;

-- Fairness between API keys: the owners that have due jobs at a priority,
-- walked one owner at a time (a skip scan), with each owner's oldest due job
-- at that priority.
CREATE INDEX asyncproc_jobs_owner_due_idx ON procrastinate_jobs (priority, ((args->>'owner')::bigint), id)
    WHERE status = 'todo' AND scheduled_at IS NULL AND args ? 'owner';

-- How many jobs an owner has running.
CREATE INDEX asyncproc_jobs_owner_doing_idx ON procrastinate_jobs (((args->>'owner')::bigint))
    WHERE status = 'doing' AND args ? 'owner';

-- The jobs of one worker, for the foreign key's ON DELETE SET NULL. When a
-- worker leaves (procrastinate_unregister_worker_v1, at every graceful stop)
-- or the sweep prunes a stalled one, PostgreSQL runs
-- `UPDATE procrastinate_jobs SET worker_id = NULL WHERE worker_id = $1`, and
-- Procrastinate's index on worker_id covers doing jobs only: each deletion read
-- the whole table (0.2 s at a million queued jobs, per worker). Only jobs that
-- a worker fetched carry a worker_id, so the index is as small as the jobs in
-- hand, and `worker_id = $1` implies its predicate.
CREATE INDEX asyncproc_jobs_worker_idx ON procrastinate_jobs (worker_id) WHERE worker_id IS NOT NULL;
