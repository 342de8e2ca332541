-- The running tasks, found without reading the pending ones. The sweep looks
-- for running tasks that lost their job, and the claim counts an operation's
-- running tasks (0011). Once the planner had statistics of a million pending
-- tasks (after autovacuum's ANALYZE), it read them through
-- tasks_owner_active_idx (pending and running, by owner) to find 20 running
-- ones: 0.6 s per sweep alone, tens of seconds while the workers ran. A partial
-- index over running tasks is as small as the running set, and its predicate
-- matches those statements exactly.
CREATE INDEX tasks_running_idx ON tasks (operation) WHERE status = 'running';
