-- The fetch's statements are planned once per session. PL/pgSQL plans a
-- statement afresh for its first five calls and then keeps a generic plan
-- only if its estimated cost is no higher than the fresh plans': with a
-- million jobs queued for later it never was, so every fetch planned its
-- statements again, 0.25 ms of an empty fetch's 0.5 ms, twice per dispatch
-- (the job, then the look that finds no more). Every statement in it is
-- written to walk an index whatever the parameters (0015), so the generic
-- plan is the same walk; tests/integration/test_plans.py checks both.
ALTER FUNCTION asyncproc_fetch_job(character varying[], bigint) SET plan_cache_mode = force_generic_plan;
