-- The ledger at scale: exact counts without scanning `tasks`, history that
-- outlives pruned rows, and the retention rules the pruner applies.
-- See docs/retention.md.
--
-- Triggers on `tasks` append one small row per change to asyncproc_ledger_events,
-- in the writing transaction: whatever a reader's snapshot sees in `tasks`, it
-- sees in the events. The table has no index and rows are only ever appended,
-- so writers never wait on each other (no hot counter row) and the hot path
-- pays for one heap insert per status change. A compaction pass, run by the
-- workers every few seconds, folds the events into asyncproc_counts (one row
-- per operation) and asyncproc_rollups (the history); readers add the few
-- events not folded yet. An upsert of a per-session counter row was measured
-- first: it added 0.14-0.25 ms to every claim and outcome; the append adds
-- 0.02-0.03 ms of database CPU (docs/retention.md, "Measured").
--
-- The trigger functions are SECURITY DEFINER, as 0002's are: a role that may
-- write `tasks` needs no rights on these tables.

-- The bounds of the run-time and queue-wait histograms, in seconds: the same
-- as asyncproc.metrics.SECONDS_BUCKETS (a test holds them equal). A histogram
-- is a bigint[] of 19 slots: slot k counts values v with bound[k-1] <= v < bound[k],
-- the last one v >= 3600.
CREATE FUNCTION asyncproc_seconds_bounds() RETURNS float8[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT '{0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,120,300,600,1800,3600}'::float8[]
$$;

-- The slot of a value (NULL for NULL).
CREATE FUNCTION asyncproc_histogram_slot(seconds float8) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT width_bucket(seconds, asyncproc_seconds_bounds()) + 1
$$;

-- Slot-wise sum of two histograms; NULL stands for an empty one. Spelled out
-- slot by slot: an unnest subquery made compaction and bulk recounts 5x slower.
CREATE FUNCTION asyncproc_histogram_add(a bigint[], b bigint[]) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE ARRAY[a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5],
                   a[6] + b[6], a[7] + b[7], a[8] + b[8], a[9] + b[9], a[10] + b[10],
                   a[11] + b[11], a[12] + b[12], a[13] + b[13], a[14] + b[14], a[15] + b[15],
                   a[16] + b[16], a[17] + b[17], a[18] + b[18], a[19] + b[19]]
    END
$$;

-- Run time and queue wait of a row's last attempt, for completed and failed rows.
CREATE FUNCTION asyncproc_run_seconds(status text, started_at timestamptz, completed_at timestamptz) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN status IN ('completed', 'failed') AND started_at IS NOT NULL
                THEN GREATEST(EXTRACT(EPOCH FROM completed_at - started_at)::float8, 0) END
$$;

CREATE FUNCTION asyncproc_wait_seconds(status text, scheduled_at timestamptz, started_at timestamptz) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN status IN ('completed', 'failed') AND started_at IS NOT NULL
                THEN GREATEST(EXTRACT(EPOCH FROM started_at - scheduled_at)::float8, 0) END
$$;

-- ---------------------------------------------------------------------------
-- The tables.

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
-- The triggers: one append per change.

-- One event per operation per statement, so a batch of a thousand tasks costs one.
CREATE FUNCTION asyncproc_tasks_log_inserted() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO asyncproc_ledger_events (operation, status_from, status_to, tasks)
    SELECT operation, NULL, 'pending', count(*)
    FROM inserted
    GROUP BY operation;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_log_inserted
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_log_inserted();

-- A renamed operation is logged as a delete and an insert: the task's count
-- moves, it counts as enqueued under its new name, and its history stays put.
CREATE FUNCTION asyncproc_tasks_log_changed() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    final_row tasks;
BEGIN
    IF OLD.operation <> NEW.operation THEN
        INSERT INTO asyncproc_ledger_events (operation, status_from, status_to, tasks)
        VALUES (OLD.operation, OLD.status, NULL, 1), (NEW.operation, NULL, NEW.status, 1);
        RETURN NULL;
    END IF;
    final_row := CASE WHEN NEW.status IN ('completed', 'failed', 'cancelled') THEN NEW
                      WHEN OLD.status IN ('completed', 'failed', 'cancelled') THEN OLD END;
    INSERT INTO asyncproc_ledger_events (operation, status_from, status_to, tasks, finished_at, run_seconds, wait_seconds)
    VALUES (NEW.operation, OLD.status, NEW.status, 1,
            COALESCE(final_row.completed_at, final_row.updated_at),
            asyncproc_run_seconds(final_row.status, final_row.started_at, final_row.completed_at),
            asyncproc_wait_seconds(final_row.status, final_row.scheduled_at, final_row.started_at));
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_log_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (OLD.status <> NEW.status OR OLD.operation <> NEW.operation)
    EXECUTE FUNCTION asyncproc_tasks_log_changed();

-- Deleted rows leave the counts; the history keeps them. That is the point of
-- it: the pruner deletes finished rows and their history stays.
CREATE FUNCTION asyncproc_tasks_log_deleted() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    INSERT INTO asyncproc_ledger_events (operation, status_from, status_to, tasks)
    SELECT operation, status, NULL, count(*)
    FROM deleted
    GROUP BY operation, status;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_log_deleted
    AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_log_deleted();

-- TRUNCATE shows no rows to a trigger: what was logged is folded in, then the
-- current counts go to zero; the totals and the history stay.
CREATE FUNCTION asyncproc_tasks_log_truncated() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM asyncproc_compact();
    UPDATE asyncproc_counts SET pending = 0, running = 0, completed = 0, failed = 0, cancelled = 0;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_log_truncated
    AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_log_truncated();

-- ---------------------------------------------------------------------------
-- What a set of events adds up to. Written once, used both by readers (over
-- the events not folded yet) and by the compaction (over the events it folds).
-- Histograms are built with one filtered sum per slot, and summed slot by
-- slot: plain aggregates, which a bulk recount of millions of rows needs (an
-- aggregate over arrays was 20x slower).

-- Per operation: current counts and monotonic totals. A transition into
-- completed or failed also adds its run time and queue wait to the histograms.
CREATE FUNCTION asyncproc_events_counts(events asyncproc_ledger_events[])
    RETURNS SETOF asyncproc_counts
    LANGUAGE sql STABLE
AS $$
    SELECT operation,
           sum(tasks * ((status_to IS NOT DISTINCT FROM 'pending')::int - (status_from IS NOT DISTINCT FROM 'pending')::int)),
           sum(tasks * ((status_to IS NOT DISTINCT FROM 'running')::int - (status_from IS NOT DISTINCT FROM 'running')::int)),
           sum(tasks * ((status_to IS NOT DISTINCT FROM 'completed')::int - (status_from IS NOT DISTINCT FROM 'completed')::int)),
           sum(tasks * ((status_to IS NOT DISTINCT FROM 'failed')::int - (status_from IS NOT DISTINCT FROM 'failed')::int)),
           sum(tasks * ((status_to IS NOT DISTINCT FROM 'cancelled')::int - (status_from IS NOT DISTINCT FROM 'cancelled')::int)),
           COALESCE(sum(tasks) FILTER (WHERE status_from IS NULL), 0),
           COALESCE(sum(tasks) FILTER (WHERE status_from IS NOT NULL AND status_to = 'completed'), 0),
           COALESCE(sum(tasks) FILTER (WHERE status_from IS NOT NULL AND status_to = 'failed'), 0),
           COALESCE(sum(tasks) FILTER (WHERE status_from IS NOT NULL AND status_to = 'cancelled'), 0),
           CASE WHEN count(*) FILTER (WHERE run_slot IS NOT NULL) > 0 THEN ARRAY[
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 1), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 2), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 3), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 4), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 5), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 6), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 7), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 8), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 9), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 10), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 11), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 12), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 13), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 14), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 15), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 16), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 17), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 18), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 19), 0)]::bigint[] END,
           COALESCE(sum(run_seconds * tasks) FILTER (WHERE run_slot IS NOT NULL), 0),
           CASE WHEN count(*) FILTER (WHERE wait_slot IS NOT NULL) > 0 THEN ARRAY[
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 1), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 2), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 3), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 4), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 5), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 6), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 7), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 8), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 9), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 10), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 11), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 12), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 13), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 14), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 15), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 16), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 17), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 18), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 19), 0)]::bigint[] END,
           COALESCE(sum(wait_seconds * tasks) FILTER (WHERE wait_slot IS NOT NULL), 0)
    FROM (
        SELECT operation, status_from, status_to, tasks, run_seconds, wait_seconds,
               CASE WHEN timed THEN asyncproc_histogram_slot(run_seconds) END AS run_slot,
               CASE WHEN timed THEN asyncproc_histogram_slot(wait_seconds) END AS wait_slot
        FROM unnest(events),
             LATERAL (SELECT status_from IS NOT NULL AND status_to IN ('completed', 'failed')) AS t(timed)
    ) AS e
    GROUP BY operation
$$;

-- Per minute of finishing, operation and final status: a task reaching a
-- final status counts once; leaving one (an operator's retry) takes it back,
-- so that each task is in the history once, with its latest outcome, exactly
-- as `tasks` would say if no row were ever pruned.
CREATE FUNCTION asyncproc_events_history(events asyncproc_ledger_events[])
    RETURNS SETOF asyncproc_rollups
    LANGUAGE sql STABLE
AS $$
    SELECT bucket_start, interval '1 minute', operation, status, sum(tasks)::bigint,
           CASE WHEN count(*) FILTER (WHERE run_slot IS NOT NULL) > 0 THEN ARRAY[
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 1), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 2), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 3), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 4), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 5), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 6), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 7), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 8), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 9), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 10), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 11), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 12), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 13), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 14), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 15), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 16), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 17), 0), COALESCE(sum(tasks) FILTER (WHERE run_slot = 18), 0),
                 COALESCE(sum(tasks) FILTER (WHERE run_slot = 19), 0)]::bigint[] END,
           COALESCE(sum(run_seconds * tasks), 0),
           CASE WHEN count(*) FILTER (WHERE wait_slot IS NOT NULL) > 0 THEN ARRAY[
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 1), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 2), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 3), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 4), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 5), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 6), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 7), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 8), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 9), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 10), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 11), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 12), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 13), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 14), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 15), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 16), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 17), 0), COALESCE(sum(tasks) FILTER (WHERE wait_slot = 18), 0),
                 COALESCE(sum(tasks) FILTER (WHERE wait_slot = 19), 0)]::bigint[] END,
           COALESCE(sum(wait_seconds * tasks), 0)
    FROM (
        SELECT date_trunc('minute', ev.finished_at, 'UTC') AS bucket_start, ev.operation, s.status,
               ev.tasks * s.sign AS tasks, ev.run_seconds, ev.wait_seconds,
               asyncproc_histogram_slot(ev.run_seconds) AS run_slot,
               asyncproc_histogram_slot(ev.wait_seconds) AS wait_slot
        FROM unnest(events) AS ev,
             LATERAL (VALUES (ev.status_to, 1), (ev.status_from, -1)) AS s(status, sign)
        WHERE ev.status_from IS NOT NULL AND ev.status_to IS NOT NULL
          AND s.status IN ('completed', 'failed', 'cancelled')
    ) AS e
    GROUP BY bucket_start, operation, status
$$;

-- Adds per-operation counts into asyncproc_counts.
CREATE FUNCTION asyncproc_counts_fold(deltas asyncproc_counts[]) RETURNS void
    LANGUAGE sql
AS $$
    INSERT INTO asyncproc_counts AS c
    SELECT * FROM unnest(deltas)
    ON CONFLICT (operation) DO UPDATE SET
        pending = c.pending + EXCLUDED.pending,
        running = c.running + EXCLUDED.running,
        completed = c.completed + EXCLUDED.completed,
        failed = c.failed + EXCLUDED.failed,
        cancelled = c.cancelled + EXCLUDED.cancelled,
        enqueued_total = c.enqueued_total + EXCLUDED.enqueued_total,
        completed_total = c.completed_total + EXCLUDED.completed_total,
        failed_total = c.failed_total + EXCLUDED.failed_total,
        cancelled_total = c.cancelled_total + EXCLUDED.cancelled_total,
        run_histogram = asyncproc_histogram_add(c.run_histogram, EXCLUDED.run_histogram),
        run_sum = c.run_sum + EXCLUDED.run_sum,
        wait_histogram = asyncproc_histogram_add(c.wait_histogram, EXCLUDED.wait_histogram),
        wait_sum = c.wait_sum + EXCLUDED.wait_sum
$$;

-- The width a history bucket starting at `bucket_start` should have now:
-- minutes for `minutes_for`, then hours for `hours_for`, then days. A bucket
-- is folded only once its whole hour (day) is past the limit, so that no hour
-- is ever part minutes and part an hour.
CREATE FUNCTION asyncproc_rollup_width(bucket_start timestamptz, minutes_for interval, hours_for interval)
    RETURNS interval
    LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN date_trunc('day', bucket_start, 'UTC') + interval '1 day' <= now() - hours_for THEN interval '1 day'
        WHEN date_trunc('hour', bucket_start, 'UTC') + interval '1 hour' <= now() - minutes_for THEN interval '1 hour'
        ELSE interval '1 minute'
    END
$$;

-- Adds history rows into asyncproc_rollups, each bucket regrouped to `width`
-- ('minute', 'hour' or 'day') where that is wider than its own.
CREATE FUNCTION asyncproc_rollups_fold(deltas asyncproc_rollups[], minutes_for interval, hours_for interval)
    RETURNS void
    LANGUAGE sql
AS $$
    INSERT INTO asyncproc_rollups AS r
    SELECT date_trunc(CASE w.width WHEN interval '1 day' THEN 'day' WHEN interval '1 hour' THEN 'hour' ELSE 'minute' END,
                      d.bucket_start, 'UTC'),
           w.width, d.operation, d.status, sum(d.tasks),
           CASE WHEN count(d.run_histogram) > 0 THEN ARRAY[
                 COALESCE(sum(d.run_histogram[1]), 0), COALESCE(sum(d.run_histogram[2]), 0), COALESCE(sum(d.run_histogram[3]), 0), COALESCE(sum(d.run_histogram[4]), 0),
                 COALESCE(sum(d.run_histogram[5]), 0), COALESCE(sum(d.run_histogram[6]), 0), COALESCE(sum(d.run_histogram[7]), 0), COALESCE(sum(d.run_histogram[8]), 0),
                 COALESCE(sum(d.run_histogram[9]), 0), COALESCE(sum(d.run_histogram[10]), 0), COALESCE(sum(d.run_histogram[11]), 0), COALESCE(sum(d.run_histogram[12]), 0),
                 COALESCE(sum(d.run_histogram[13]), 0), COALESCE(sum(d.run_histogram[14]), 0), COALESCE(sum(d.run_histogram[15]), 0), COALESCE(sum(d.run_histogram[16]), 0),
                 COALESCE(sum(d.run_histogram[17]), 0), COALESCE(sum(d.run_histogram[18]), 0), COALESCE(sum(d.run_histogram[19]), 0)]::bigint[] END, sum(d.run_sum),
           CASE WHEN count(d.wait_histogram) > 0 THEN ARRAY[
                 COALESCE(sum(d.wait_histogram[1]), 0), COALESCE(sum(d.wait_histogram[2]), 0), COALESCE(sum(d.wait_histogram[3]), 0), COALESCE(sum(d.wait_histogram[4]), 0),
                 COALESCE(sum(d.wait_histogram[5]), 0), COALESCE(sum(d.wait_histogram[6]), 0), COALESCE(sum(d.wait_histogram[7]), 0), COALESCE(sum(d.wait_histogram[8]), 0),
                 COALESCE(sum(d.wait_histogram[9]), 0), COALESCE(sum(d.wait_histogram[10]), 0), COALESCE(sum(d.wait_histogram[11]), 0), COALESCE(sum(d.wait_histogram[12]), 0),
                 COALESCE(sum(d.wait_histogram[13]), 0), COALESCE(sum(d.wait_histogram[14]), 0), COALESCE(sum(d.wait_histogram[15]), 0), COALESCE(sum(d.wait_histogram[16]), 0),
                 COALESCE(sum(d.wait_histogram[17]), 0), COALESCE(sum(d.wait_histogram[18]), 0), COALESCE(sum(d.wait_histogram[19]), 0)]::bigint[] END, sum(d.wait_sum)
    FROM unnest(deltas) AS d,
         LATERAL (SELECT GREATEST(d.bucket_width, asyncproc_rollup_width(d.bucket_start, minutes_for, hours_for))) AS w(width)
    GROUP BY 1, 2, 3, 4
    ON CONFLICT (bucket_start, operation, status, bucket_width) DO UPDATE SET
        tasks = r.tasks + EXCLUDED.tasks,
        run_histogram = asyncproc_histogram_add(r.run_histogram, EXCLUDED.run_histogram),
        run_sum = r.run_sum + EXCLUDED.run_sum,
        wait_histogram = asyncproc_histogram_add(r.wait_histogram, EXCLUDED.wait_histogram),
        wait_sum = r.wait_sum + EXCLUDED.wait_sum
$$;

-- Folds the logged events into the counts and the history, and minute buckets
-- older than `minutes_for` into hours, hours older than `hours_for` into days.
-- One transaction, so readers see the same sums before and after; it touches
-- only the small tables, and writers of `tasks` never wait for it.
CREATE FUNCTION asyncproc_compact(minutes_for interval DEFAULT '2 days', hours_for interval DEFAULT '90 days')
    RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    moved asyncproc_ledger_events[];
    regrouped asyncproc_rollups[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('asyncproc_compact'));
    WITH taken AS (DELETE FROM asyncproc_ledger_events RETURNING *)
    SELECT array_agg(taken) INTO moved FROM taken;
    IF moved IS NOT NULL THEN
        PERFORM asyncproc_counts_fold(ARRAY(SELECT c FROM asyncproc_events_counts(moved) AS c));
        PERFORM asyncproc_rollups_fold(ARRAY(SELECT h FROM asyncproc_events_history(moved) AS h), minutes_for, hours_for);
    END IF;
    WITH taken AS (
        DELETE FROM asyncproc_rollups
        WHERE bucket_width < interval '1 day' AND bucket_start < now() - minutes_for
          AND asyncproc_rollup_width(bucket_start, minutes_for, hours_for) > bucket_width
        RETURNING *
    )
    SELECT array_agg(taken) INTO regrouped FROM taken;
    IF regrouped IS NOT NULL THEN
        PERFORM asyncproc_rollups_fold(regrouped, minutes_for, hours_for);
    END IF;
    DELETE FROM asyncproc_rollups WHERE tasks = 0 AND bucket_start < now() - minutes_for;
END;
$$;

-- Recomputes the current counts from `tasks`, for rows written with triggers
-- off (session_replication_role = replica, as bulk loads do). It reads every
-- row and blocks writers to `tasks` meanwhile: a repair, not a routine.
-- With `with_history`, every finished row in `tasks` is also added to the
-- history, which is right only for rows that were loaded with triggers off.
CREATE FUNCTION asyncproc_recount(with_history boolean DEFAULT false) RETURNS void
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    LOCK TABLE tasks IN SHARE MODE;
    PERFORM asyncproc_compact();
    UPDATE asyncproc_counts SET pending = 0, running = 0, completed = 0, failed = 0, cancelled = 0;
    INSERT INTO asyncproc_counts AS c (operation, pending, running, completed, failed, cancelled)
    SELECT operation,
           count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM tasks
    GROUP BY operation
    ON CONFLICT (operation) DO UPDATE SET
        pending = EXCLUDED.pending, running = EXCLUDED.running, completed = EXCLUDED.completed,
        failed = EXCLUDED.failed, cancelled = EXCLUDED.cancelled;
    IF with_history THEN
        -- As events, one per minute, operation, status and histogram slots: the
        -- mean of values within one slot stays in that slot, and keeps the sum.
        PERFORM asyncproc_rollups_fold(ARRAY(SELECT h FROM asyncproc_events_history(ARRAY(
            SELECT ROW(operation, 'running', status, count(*), minute, avg(run_seconds), avg(wait_seconds))::asyncproc_ledger_events
            FROM (SELECT operation, status, date_trunc('minute', COALESCE(completed_at, updated_at), 'UTC') AS minute,
                         asyncproc_run_seconds(status, started_at, completed_at) AS run_seconds,
                         asyncproc_wait_seconds(status, scheduled_at, started_at) AS wait_seconds
                  FROM tasks
                  WHERE status IN ('completed', 'failed', 'cancelled')) AS finished
            GROUP BY operation, status, minute, asyncproc_histogram_slot(run_seconds), asyncproc_histogram_slot(wait_seconds)
        )) AS h), '2 days', '90 days');
    END IF;
END;
$$;

-- "What failed in the last 24 hours?" (asyncproc_recent_failures) read every
-- task finished in the window through tasks_completed_at_idx: 60 ms at 10M
-- rows. Only failed rows enter this one, so it costs the hot path nothing else.
CREATE INDEX tasks_failed_completed_at_idx ON tasks (completed_at) WHERE status = 'failed';

-- ---------------------------------------------------------------------------
-- Reading: the folded rows plus the events not folded yet, in one snapshot.

-- Exact counts and totals per operation, now.
CREATE VIEW asyncproc_operation_counts AS
SELECT operation,
       sum(pending)::bigint AS pending, sum(running)::bigint AS running, sum(completed)::bigint AS completed,
       sum(failed)::bigint AS failed, sum(cancelled)::bigint AS cancelled,
       sum(enqueued_total)::bigint AS enqueued_total, sum(completed_total)::bigint AS completed_total,
       sum(failed_total)::bigint AS failed_total, sum(cancelled_total)::bigint AS cancelled_total,
       CASE WHEN count(run_histogram) > 0 THEN ARRAY[
             COALESCE(sum(run_histogram[1]), 0), COALESCE(sum(run_histogram[2]), 0), COALESCE(sum(run_histogram[3]), 0), COALESCE(sum(run_histogram[4]), 0),
             COALESCE(sum(run_histogram[5]), 0), COALESCE(sum(run_histogram[6]), 0), COALESCE(sum(run_histogram[7]), 0), COALESCE(sum(run_histogram[8]), 0),
             COALESCE(sum(run_histogram[9]), 0), COALESCE(sum(run_histogram[10]), 0), COALESCE(sum(run_histogram[11]), 0), COALESCE(sum(run_histogram[12]), 0),
             COALESCE(sum(run_histogram[13]), 0), COALESCE(sum(run_histogram[14]), 0), COALESCE(sum(run_histogram[15]), 0), COALESCE(sum(run_histogram[16]), 0),
             COALESCE(sum(run_histogram[17]), 0), COALESCE(sum(run_histogram[18]), 0), COALESCE(sum(run_histogram[19]), 0)]::bigint[] END AS run_histogram,
       sum(run_sum)::float8 AS run_sum,
       CASE WHEN count(wait_histogram) > 0 THEN ARRAY[
             COALESCE(sum(wait_histogram[1]), 0), COALESCE(sum(wait_histogram[2]), 0), COALESCE(sum(wait_histogram[3]), 0), COALESCE(sum(wait_histogram[4]), 0),
             COALESCE(sum(wait_histogram[5]), 0), COALESCE(sum(wait_histogram[6]), 0), COALESCE(sum(wait_histogram[7]), 0), COALESCE(sum(wait_histogram[8]), 0),
             COALESCE(sum(wait_histogram[9]), 0), COALESCE(sum(wait_histogram[10]), 0), COALESCE(sum(wait_histogram[11]), 0), COALESCE(sum(wait_histogram[12]), 0),
             COALESCE(sum(wait_histogram[13]), 0), COALESCE(sum(wait_histogram[14]), 0), COALESCE(sum(wait_histogram[15]), 0), COALESCE(sum(wait_histogram[16]), 0),
             COALESCE(sum(wait_histogram[17]), 0), COALESCE(sum(wait_histogram[18]), 0), COALESCE(sum(wait_histogram[19]), 0)]::bigint[] END AS wait_histogram,
       sum(wait_sum)::float8 AS wait_sum
FROM (
    SELECT * FROM asyncproc_counts
    UNION ALL
    SELECT * FROM asyncproc_events_counts(ARRAY(SELECT e FROM asyncproc_ledger_events AS e))
) AS parts
GROUP BY operation;

COMMENT ON VIEW asyncproc_operation_counts IS
    'asyncproc: exact task counts by operation and status, and monotonic totals, without scanning tasks';

-- ---------------------------------------------------------------------------
-- Pruning.

-- How long finished tasks of each (operation, status) stay, for the operations
-- the counts know of: an override from asyncproc_retention, else the default
-- given for the status. NULL means forever.
CREATE FUNCTION asyncproc_retention_rules(keep_completed interval, keep_failed interval, keep_cancelled interval)
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

-- Deletes at most `batch_size` finished tasks past their retention, in one
-- short transaction; returns how many, or NULL when another session is
-- pruning (one pruner at a time across the fleet). Rows are locked with SKIP
-- LOCKED and their status checked under the lock, so a task is never deleted
-- while it is not final, nor waited for while someone else holds it.
-- Each (operation, status) is found through tasks_status_operation_created_at_idx:
-- a task finished before the cutoff was created before it.
CREATE FUNCTION asyncproc_prune(keep_completed interval, keep_failed interval, keep_cancelled interval,
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

-- What asyncproc_prune would delete now, per (operation, status): for
-- `asyncproc prune --dry-run`. It counts rows, so it takes time on a big backlog.
CREATE FUNCTION asyncproc_prune_due(keep_completed interval, keep_failed interval, keep_cancelled interval)
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

-- ---------------------------------------------------------------------------
-- Reporting, from the counts and the history instead of scans of `tasks`.

-- The stable view for SQL reporting on finished tasks, including pruned ones.
-- One row per bucket, operation and final status. Buckets are a minute wide
-- for the last two days, an hour wide up to 90 days, a day wide beyond; they
-- are aligned in UTC, so a sum over any range of whole UTC days is exact.
CREATE VIEW asyncproc_history AS
SELECT bucket_start,
       bucket_start + bucket_width AS bucket_end,
       bucket_width,
       operation,
       status,
       sum(tasks)::bigint AS count,
       CASE WHEN count(run_histogram) > 0 THEN ARRAY[
             COALESCE(sum(run_histogram[1]), 0), COALESCE(sum(run_histogram[2]), 0), COALESCE(sum(run_histogram[3]), 0), COALESCE(sum(run_histogram[4]), 0),
             COALESCE(sum(run_histogram[5]), 0), COALESCE(sum(run_histogram[6]), 0), COALESCE(sum(run_histogram[7]), 0), COALESCE(sum(run_histogram[8]), 0),
             COALESCE(sum(run_histogram[9]), 0), COALESCE(sum(run_histogram[10]), 0), COALESCE(sum(run_histogram[11]), 0), COALESCE(sum(run_histogram[12]), 0),
             COALESCE(sum(run_histogram[13]), 0), COALESCE(sum(run_histogram[14]), 0), COALESCE(sum(run_histogram[15]), 0), COALESCE(sum(run_histogram[16]), 0),
             COALESCE(sum(run_histogram[17]), 0), COALESCE(sum(run_histogram[18]), 0), COALESCE(sum(run_histogram[19]), 0)]::bigint[] END AS run_seconds_histogram,
       sum(run_sum) AS run_seconds_sum,
       CASE WHEN count(wait_histogram) > 0 THEN ARRAY[
             COALESCE(sum(wait_histogram[1]), 0), COALESCE(sum(wait_histogram[2]), 0), COALESCE(sum(wait_histogram[3]), 0), COALESCE(sum(wait_histogram[4]), 0),
             COALESCE(sum(wait_histogram[5]), 0), COALESCE(sum(wait_histogram[6]), 0), COALESCE(sum(wait_histogram[7]), 0), COALESCE(sum(wait_histogram[8]), 0),
             COALESCE(sum(wait_histogram[9]), 0), COALESCE(sum(wait_histogram[10]), 0), COALESCE(sum(wait_histogram[11]), 0), COALESCE(sum(wait_histogram[12]), 0),
             COALESCE(sum(wait_histogram[13]), 0), COALESCE(sum(wait_histogram[14]), 0), COALESCE(sum(wait_histogram[15]), 0), COALESCE(sum(wait_histogram[16]), 0),
             COALESCE(sum(wait_histogram[17]), 0), COALESCE(sum(wait_histogram[18]), 0), COALESCE(sum(wait_histogram[19]), 0)]::bigint[] END AS wait_seconds_histogram,
       sum(wait_sum) AS wait_seconds_sum
FROM (
    SELECT * FROM asyncproc_rollups
    UNION ALL
    SELECT * FROM asyncproc_events_history(ARRAY(SELECT e FROM asyncproc_ledger_events AS e))
) AS parts
GROUP BY bucket_start, bucket_width, operation, status
HAVING sum(tasks) <> 0;

COMMENT ON VIEW asyncproc_history IS
    'asyncproc: finished tasks per time bucket, operation and status; outlives pruned rows';

CREATE OR REPLACE VIEW asyncproc_status_counts AS
SELECT s.status, c.operation, s.tasks
FROM asyncproc_operation_counts AS c,
     LATERAL (VALUES ('pending', c.pending), ('running', c.running), ('completed', c.completed),
                     ('failed', c.failed), ('cancelled', c.cancelled)) AS s(status, tasks)
WHERE s.tasks <> 0;

CREATE OR REPLACE FUNCTION asyncproc_throughput(bucket text DEFAULT 'minute', since interval DEFAULT '1 hour')
    RETURNS TABLE (bucket_start timestamptz, operation text, completed bigint, failed bigint)
    LANGUAGE sql STABLE
AS $$
    SELECT date_trunc(bucket, h.bucket_start, 'UTC'), h.operation,
           COALESCE(sum(h.count) FILTER (WHERE h.status = 'completed'), 0)::bigint,
           COALESCE(sum(h.count) FILTER (WHERE h.status = 'failed'), 0)::bigint
    FROM asyncproc_history AS h
    WHERE h.bucket_start >= date_trunc('minute', now() - since, 'UTC')
      AND h.status IN ('completed', 'failed')
    GROUP BY 1, 2
    ORDER BY 1, 2
$$;

-- Access, as in 0007: operators read the counts and the history (the
-- throughput views read the history with the caller's rights) and set
-- retention overrides. A recount blocks every writer of `tasks` while it
-- runs, and a compaction locks out the pruner's: the owner's (the worker's) alone.
REVOKE EXECUTE ON FUNCTION asyncproc_recount(boolean), asyncproc_compact(interval, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION asyncproc_tasks_log_inserted(), asyncproc_tasks_log_changed(),
    asyncproc_tasks_log_deleted(), asyncproc_tasks_log_truncated() FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'asyncproc_operator') THEN
        GRANT SELECT ON asyncproc_history, asyncproc_operation_counts TO asyncproc_operator;
        GRANT SELECT, INSERT, UPDATE, DELETE ON asyncproc_retention TO asyncproc_operator;
    END IF;
END;
$$;
