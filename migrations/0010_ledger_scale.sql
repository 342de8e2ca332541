-- The ledger at scale: exact counts without scanning `tasks`, history that
-- outlives pruned rows, and the retention rules the pruner applies.
-- See docs/retention.md.
--
-- Counts and history are kept by triggers on `tasks`, in the writing
-- transaction, so they are exactly as consistent as the rows themselves:
-- whatever a reader's snapshot sees in `tasks`, it sees in the counts.
-- The trigger functions are SECURITY DEFINER, as 0002's are: a role that may
-- write `tasks` needs no rights on these tables.
-- Each database session writes rows of its own (keyed by pg_backend_pid()),
-- so concurrent writers never wait on one hot row; a compaction pass, run by
-- the pruner, folds them into writer 0 now and then.

-- The bounds of the run-time and queue-wait histograms, in seconds: the same
-- as asyncproc.metrics.SECONDS_BUCKETS (a test holds them equal). A histogram
-- is a bigint[] of length 19: element k (1-based) counts values v with
-- bound[k-1] <= v < bound[k], the last one v >= 3600.
CREATE FUNCTION asyncproc_seconds_bounds() RETURNS float8[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT '{0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,120,300,600,1800,3600}'::float8[]
$$;

-- A histogram holding one value (or none, for NULL), times `weight`.
CREATE FUNCTION asyncproc_histogram_of(seconds float8, weight bigint) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN seconds IS NOT NULL THEN
        array_fill(0::bigint, ARRAY[width_bucket(seconds, asyncproc_seconds_bounds())])
        || weight
        || array_fill(0::bigint, ARRAY[18 - width_bucket(seconds, asyncproc_seconds_bounds())])
    END
$$;

-- Element-wise sum of two histograms; NULL stands for an empty one.
CREATE FUNCTION asyncproc_histogram_add(a bigint[], b bigint[]) RETURNS bigint[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN a IS NULL THEN b
        WHEN b IS NULL THEN a
        ELSE ARRAY(SELECT x + y FROM unnest(a, b) WITH ORDINALITY AS u(x, y, k) ORDER BY k)
    END
$$;

CREATE AGGREGATE asyncproc_histogram_sum(bigint[]) (
    SFUNC = asyncproc_histogram_add,
    STYPE = bigint[]
);

-- ---------------------------------------------------------------------------
-- Exact current counts, and monotonic totals for Prometheus counters.

CREATE TABLE asyncproc_counts (
    writer          integer NOT NULL,  -- pg_backend_pid() of the writing session; 0 once compacted
    operation       text    NOT NULL,
    pending         bigint  NOT NULL DEFAULT 0,
    running         bigint  NOT NULL DEFAULT 0,
    completed       bigint  NOT NULL DEFAULT 0,
    failed          bigint  NOT NULL DEFAULT 0,
    cancelled       bigint  NOT NULL DEFAULT 0,
    -- Monotonic: tasks ever inserted, and transitions ever into each final status.
    enqueued_total  bigint  NOT NULL DEFAULT 0,
    completed_total bigint  NOT NULL DEFAULT 0,
    failed_total    bigint  NOT NULL DEFAULT 0,
    cancelled_total bigint  NOT NULL DEFAULT 0,
    -- Of every transition into completed or failed: the last attempt's run
    -- time (started_at to completed_at) and queue wait (scheduled_at to started_at).
    run_histogram   bigint[],
    run_sum         float8  NOT NULL DEFAULT 0,
    wait_histogram  bigint[],
    wait_sum        float8  NOT NULL DEFAULT 0,
    PRIMARY KEY (writer, operation)
);

COMMENT ON TABLE asyncproc_counts IS
    'asyncproc: per-session deltas of task counts; read asyncproc_status_counts or sum by operation';

-- History: one row per (bucket, operation, final status, writer).
CREATE TABLE asyncproc_rollups (
    bucket_start   timestamptz NOT NULL,
    bucket_width   interval    NOT NULL CHECK (bucket_width IN ('1 minute', '1 hour', '1 day')),
    operation      text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('completed', 'failed', 'cancelled')),
    writer         integer     NOT NULL,
    tasks          bigint      NOT NULL,
    run_histogram  bigint[],
    run_sum        float8      NOT NULL DEFAULT 0,
    wait_histogram bigint[],
    wait_sum       float8      NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, operation, status, bucket_width, writer)
);

COMMENT ON TABLE asyncproc_rollups IS
    'asyncproc: finished tasks per time bucket; read the asyncproc_history view';

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

-- Adds deltas to this session's counts row for one operation.
CREATE FUNCTION asyncproc_counts_add(
    op text, d_pending bigint, d_running bigint, d_completed bigint, d_failed bigint, d_cancelled bigint,
    d_enqueued bigint, run_seconds float8, wait_seconds float8
) RETURNS void
    LANGUAGE sql
AS $$
    INSERT INTO asyncproc_counts AS c (writer, operation, pending, running, completed, failed, cancelled,
                                       enqueued_total, completed_total, failed_total, cancelled_total,
                                       run_histogram, run_sum, wait_histogram, wait_sum)
    VALUES (pg_backend_pid(), op, d_pending, d_running, d_completed, d_failed, d_cancelled,
            d_enqueued, GREATEST(d_completed, 0), GREATEST(d_failed, 0), GREATEST(d_cancelled, 0),
            asyncproc_histogram_of(run_seconds, 1), COALESCE(run_seconds, 0),
            asyncproc_histogram_of(wait_seconds, 1), COALESCE(wait_seconds, 0))
    ON CONFLICT (writer, operation) DO UPDATE SET
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

-- Adds `weight` finished tasks (1, or -1 to take one back) to the minute of `finished_at`.
CREATE FUNCTION asyncproc_rollups_add(
    finished_at timestamptz, op text, final_status text, weight bigint, run_seconds float8, wait_seconds float8
) RETURNS void
    LANGUAGE sql
AS $$
    INSERT INTO asyncproc_rollups AS r (bucket_start, bucket_width, operation, status, writer, tasks,
                                        run_histogram, run_sum, wait_histogram, wait_sum)
    VALUES (date_trunc('minute', finished_at, 'UTC'), '1 minute', op, final_status, pg_backend_pid(), weight,
            asyncproc_histogram_of(run_seconds, weight), COALESCE(run_seconds, 0) * weight,
            asyncproc_histogram_of(wait_seconds, weight), COALESCE(wait_seconds, 0) * weight)
    ON CONFLICT (bucket_start, operation, status, bucket_width, writer) DO UPDATE SET
        tasks = r.tasks + EXCLUDED.tasks,
        run_histogram = asyncproc_histogram_add(r.run_histogram, EXCLUDED.run_histogram),
        run_sum = r.run_sum + EXCLUDED.run_sum,
        wait_histogram = asyncproc_histogram_add(r.wait_histogram, EXCLUDED.wait_histogram),
        wait_sum = r.wait_sum + EXCLUDED.wait_sum
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

-- Inserted rows: one counts write per operation per statement, so a batch of
-- a thousand tasks costs one.
CREATE FUNCTION asyncproc_tasks_count_inserted() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM asyncproc_counts_add(operation, count(*), 0, 0, 0, 0, count(*), NULL, NULL)
    FROM inserted
    GROUP BY operation;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_count_inserted
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_count_inserted();

-- A status change moves one task between counts. Reaching a final status adds
-- it to the history; leaving one (an operator's retry) takes it back out, so
-- that each task is in the history once, with its latest outcome, exactly as
-- `tasks` would say if no row were ever pruned.
CREATE FUNCTION asyncproc_tasks_count_changed() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
DECLARE
    run_seconds float8;
    wait_seconds float8;
BEGIN
    IF OLD.status <> NEW.status THEN
        run_seconds := asyncproc_run_seconds(NEW.status, NEW.started_at, NEW.completed_at);
        wait_seconds := asyncproc_wait_seconds(NEW.status, NEW.scheduled_at, NEW.started_at);
    END IF;
    IF OLD.operation = NEW.operation THEN
        PERFORM asyncproc_counts_add(
            NEW.operation,
            (NEW.status = 'pending')::int - (OLD.status = 'pending')::int,
            (NEW.status = 'running')::int - (OLD.status = 'running')::int,
            (NEW.status = 'completed')::int - (OLD.status = 'completed')::int,
            (NEW.status = 'failed')::int - (OLD.status = 'failed')::int,
            (NEW.status = 'cancelled')::int - (OLD.status = 'cancelled')::int,
            0, run_seconds, wait_seconds);
    ELSE
        PERFORM asyncproc_counts_add(
            OLD.operation,
            -(OLD.status = 'pending')::int, -(OLD.status = 'running')::int, -(OLD.status = 'completed')::int,
            -(OLD.status = 'failed')::int, -(OLD.status = 'cancelled')::int, 0, NULL, NULL);
        PERFORM asyncproc_counts_add(
            NEW.operation,
            (NEW.status = 'pending')::int, (NEW.status = 'running')::int, (NEW.status = 'completed')::int,
            (NEW.status = 'failed')::int, (NEW.status = 'cancelled')::int, 0, run_seconds, wait_seconds);
    END IF;
    IF OLD.status IN ('completed', 'failed', 'cancelled') THEN
        PERFORM asyncproc_rollups_add(COALESCE(OLD.completed_at, OLD.updated_at), OLD.operation, OLD.status, -1,
                                      asyncproc_run_seconds(OLD.status, OLD.started_at, OLD.completed_at),
                                      asyncproc_wait_seconds(OLD.status, OLD.scheduled_at, OLD.started_at));
    END IF;
    IF NEW.status IN ('completed', 'failed', 'cancelled') THEN
        PERFORM asyncproc_rollups_add(NEW.completed_at, NEW.operation, NEW.status, 1,
                                      asyncproc_run_seconds(NEW.status, NEW.started_at, NEW.completed_at),
                                      asyncproc_wait_seconds(NEW.status, NEW.scheduled_at, NEW.started_at));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_count_changed
    AFTER UPDATE ON tasks
    FOR EACH ROW
    WHEN (OLD.status <> NEW.status OR OLD.operation <> NEW.operation)
    EXECUTE FUNCTION asyncproc_tasks_count_changed();

-- Deleted rows leave the counts; the history keeps them. That is the point of
-- it: the pruner deletes finished rows and their history stays.
CREATE FUNCTION asyncproc_tasks_count_deleted() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM asyncproc_counts_add(operation,
                                 -count(*) FILTER (WHERE status = 'pending'),
                                 -count(*) FILTER (WHERE status = 'running'),
                                 -count(*) FILTER (WHERE status = 'completed'),
                                 -count(*) FILTER (WHERE status = 'failed'),
                                 -count(*) FILTER (WHERE status = 'cancelled'),
                                 0, NULL, NULL)
    FROM deleted
    GROUP BY operation;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_count_deleted
    AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_count_deleted();

-- TRUNCATE shows no rows to a trigger: the current counts go to zero; the
-- totals and the history stay.
CREATE FUNCTION asyncproc_tasks_count_truncated() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('asyncproc_compact'));
    UPDATE asyncproc_counts SET pending = 0, running = 0, completed = 0, failed = 0, cancelled = 0;
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_count_truncated
    AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION asyncproc_tasks_count_truncated();

-- Recomputes the current counts from `tasks`, for rows written with triggers
-- off (session_replication_role = replica, as bulk loads do). It reads every
-- row and blocks writers to `tasks` meanwhile: a repair, not a routine.
-- With `with_history`, every finished row in `tasks` is also added to the
-- history, which is right only for rows that were loaded with triggers off.
CREATE FUNCTION asyncproc_recount(with_history boolean DEFAULT false) RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    LOCK TABLE tasks IN SHARE MODE;
    PERFORM pg_advisory_xact_lock(hashtext('asyncproc_compact'));
    UPDATE asyncproc_counts SET pending = 0, running = 0, completed = 0, failed = 0, cancelled = 0;
    INSERT INTO asyncproc_counts AS c (writer, operation, pending, running, completed, failed, cancelled)
    SELECT 0, operation,
           count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'running'),
           count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'cancelled')
    FROM tasks
    GROUP BY operation
    ON CONFLICT (writer, operation) DO UPDATE SET
        pending = EXCLUDED.pending, running = EXCLUDED.running, completed = EXCLUDED.completed,
        failed = EXCLUDED.failed, cancelled = EXCLUDED.cancelled;
    IF with_history THEN
        INSERT INTO asyncproc_rollups AS r (bucket_start, bucket_width, operation, status, writer, tasks,
                                            run_histogram, run_sum, wait_histogram, wait_sum)
        SELECT date_trunc('minute', finished_at, 'UTC'), '1 minute', operation, status, 0, count(*),
               asyncproc_histogram_sum(asyncproc_histogram_of(run_seconds, 1)), COALESCE(sum(run_seconds), 0),
               asyncproc_histogram_sum(asyncproc_histogram_of(wait_seconds, 1)), COALESCE(sum(wait_seconds), 0)
        FROM (SELECT operation, status, COALESCE(completed_at, updated_at) AS finished_at,
                     asyncproc_run_seconds(status, started_at, completed_at) AS run_seconds,
                     asyncproc_wait_seconds(status, scheduled_at, started_at) AS wait_seconds
              FROM tasks
              WHERE status IN ('completed', 'failed', 'cancelled')) AS finished
        GROUP BY 1, 3, 4
        ON CONFLICT (bucket_start, operation, status, bucket_width, writer) DO UPDATE SET
            tasks = r.tasks + EXCLUDED.tasks,
            run_histogram = asyncproc_histogram_add(r.run_histogram, EXCLUDED.run_histogram),
            run_sum = r.run_sum + EXCLUDED.run_sum,
            wait_histogram = asyncproc_histogram_add(r.wait_histogram, EXCLUDED.wait_histogram),
            wait_sum = r.wait_sum + EXCLUDED.wait_sum;
    END IF;
END;
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

-- Folds every session's rows into writer 0, and minute buckets older than
-- `minutes_for` into hours, hours older than `hours_for` into days. One
-- transaction, so readers see the same sums before and after. Writers whose
-- rows it moves wait for it for a moment (it touches only small tables).
CREATE FUNCTION asyncproc_compact(minutes_for interval DEFAULT '2 days', hours_for interval DEFAULT '90 days')
    RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('asyncproc_compact'));

    WITH moved AS (
        DELETE FROM asyncproc_counts WHERE writer <> 0 RETURNING *
    )
    INSERT INTO asyncproc_counts AS c (writer, operation, pending, running, completed, failed, cancelled,
                                       enqueued_total, completed_total, failed_total, cancelled_total,
                                       run_histogram, run_sum, wait_histogram, wait_sum)
    SELECT 0, operation, sum(pending), sum(running), sum(completed), sum(failed), sum(cancelled),
           sum(enqueued_total), sum(completed_total), sum(failed_total), sum(cancelled_total),
           asyncproc_histogram_sum(run_histogram), sum(run_sum), asyncproc_histogram_sum(wait_histogram), sum(wait_sum)
    FROM moved
    GROUP BY operation
    ON CONFLICT (writer, operation) DO UPDATE SET
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
        wait_sum = c.wait_sum + EXCLUDED.wait_sum;

    WITH moved AS (
        DELETE FROM asyncproc_rollups
        WHERE writer <> 0
           OR (bucket_width < interval '1 day' AND bucket_start < now() - minutes_for
               AND asyncproc_rollup_width(bucket_start, minutes_for, hours_for) > bucket_width)
        RETURNING *
    ), regrouped AS (
        SELECT date_trunc(CASE width WHEN interval '1 day' THEN 'day' WHEN interval '1 hour' THEN 'hour' ELSE 'minute' END,
                          bucket_start, 'UTC') AS bucket_start,
               width AS bucket_width,
               operation, status, tasks, run_histogram, run_sum, wait_histogram, wait_sum
        FROM moved,
             LATERAL (SELECT GREATEST(bucket_width, asyncproc_rollup_width(bucket_start, minutes_for, hours_for))) AS w(width)
    )
    INSERT INTO asyncproc_rollups AS r (bucket_start, bucket_width, operation, status, writer, tasks,
                                        run_histogram, run_sum, wait_histogram, wait_sum)
    SELECT bucket_start, bucket_width, operation, status, 0, sum(tasks),
           asyncproc_histogram_sum(run_histogram), sum(run_sum), asyncproc_histogram_sum(wait_histogram), sum(wait_sum)
    FROM regrouped
    GROUP BY bucket_start, bucket_width, operation, status
    ON CONFLICT (bucket_start, operation, status, bucket_width, writer) DO UPDATE SET
        tasks = r.tasks + EXCLUDED.tasks,
        run_histogram = asyncproc_histogram_add(r.run_histogram, EXCLUDED.run_histogram),
        run_sum = r.run_sum + EXCLUDED.run_sum,
        wait_histogram = asyncproc_histogram_add(r.wait_histogram, EXCLUDED.wait_histogram),
        wait_sum = r.wait_sum + EXCLUDED.wait_sum;

    DELETE FROM asyncproc_rollups WHERE writer = 0 AND tasks = 0;
END;
$$;

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
        SELECT c.operation, s.status, sum(s.finished)::bigint AS finished
        FROM asyncproc_counts AS c,
             LATERAL (VALUES ('completed', c.completed), ('failed', c.failed), ('cancelled', c.cancelled))
                 AS s(status, finished)
        GROUP BY c.operation, s.status
        HAVING sum(s.finished) > 0
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
       asyncproc_histogram_sum(run_histogram) AS run_seconds_histogram,
       sum(run_sum) AS run_seconds_sum,
       asyncproc_histogram_sum(wait_histogram) AS wait_seconds_histogram,
       sum(wait_sum) AS wait_seconds_sum
FROM asyncproc_rollups
GROUP BY bucket_start, bucket_width, operation, status
HAVING sum(tasks) <> 0;

COMMENT ON VIEW asyncproc_history IS
    'asyncproc: finished tasks per time bucket, operation and status; outlives pruned rows';

CREATE OR REPLACE VIEW asyncproc_status_counts AS
SELECT s.status, c.operation, sum(s.tasks)::bigint AS tasks
FROM asyncproc_counts AS c,
     LATERAL (VALUES ('pending', c.pending), ('running', c.running), ('completed', c.completed),
                     ('failed', c.failed), ('cancelled', c.cancelled)) AS s(status, tasks)
GROUP BY s.status, c.operation
HAVING sum(s.tasks) <> 0;

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
