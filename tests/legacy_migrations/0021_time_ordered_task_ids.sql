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

ALTER TABLE tasks ALTER COLUMN task_id SET DEFAULT asyncproc_new_task_id();
