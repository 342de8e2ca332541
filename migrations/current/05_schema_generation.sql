-- Which generations of the code this schema serves: every `asyncproc api` and
-- `asyncproc worker` reads it at start-up and refuses to run against a schema
-- that does not serve it (asyncproc/migrate.py, CODE_GENERATION). A release
-- whose code needs a schema change raises `generation` to its own
-- CODE_GENERATION. It leaves `oldest_code` where it was when the previous
-- release's code still works on the new schema (only additions: a new table,
-- a nullable column, a new function); a change that breaks that code (a
-- dropped or renamed column, a function's new signature) raises `oldest_code`
-- too, and that release cannot be deployed rolling (docs/production.md, "Upgrading").
-- Everyone may read it: it says nothing about the data.
CREATE OR REPLACE FUNCTION asyncproc_schema_generation(OUT generation integer, OUT oldest_code integer)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 1, 1 $$;
