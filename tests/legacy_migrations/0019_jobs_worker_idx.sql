-- The jobs of one worker, for the foreign key's ON DELETE SET NULL. When a
-- worker leaves (procrastinate_unregister_worker_v1, at every graceful stop)
-- or the sweep prunes a stalled one, PostgreSQL runs
-- `UPDATE procrastinate_jobs SET worker_id = NULL WHERE worker_id = $1`, and
-- Procrastinate's index on worker_id covers doing jobs only: each deletion read
-- the whole table (0.2 s at a million queued jobs, per worker). Only jobs that
-- a worker fetched carry a worker_id, so the index is as small as the jobs in
-- hand, and `worker_id = $1` implies its predicate.
CREATE INDEX asyncproc_jobs_worker_idx ON procrastinate_jobs (worker_id) WHERE worker_id IS NOT NULL;
