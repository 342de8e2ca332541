-- Named queries about the schema itself.

-- name: schema_generation
-- Which generations of the code the migrated schema serves (migrations/current/05_schema_generation.sql).
SELECT generation, oldest_code FROM asyncproc_schema_generation()
