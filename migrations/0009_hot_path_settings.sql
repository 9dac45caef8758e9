-- What the claim's hot path needs from the planner, set on the functions themselves: a pooler
-- passes no startup parameter through (PgBouncer refuses `jit` and the rest: "unsupported
-- startup parameter"), a transaction-mode pooler keeps no session SET, and a role default would
-- reach every other use of the role. A function's own SET clause holds on any server session,
-- behind any pooler, for exactly the statements inside it, and costs no round trip.
--
-- Why: the claim compares (txid, id) rows, which the planner estimates from txid alone (a whole
-- COPY shares one txid), so it expects thousands of rows where a batch has 100-1,000: it then
-- JIT-compiles the read's 20 feature casts (~30 ms) or launches parallel workers (~10-30 ms to
-- start), per batch. Neither pays off.
--
-- By name, whatever their arguments: the claim functions are redefined by other migrations (a
-- CREATE OR REPLACE drops the SET clauses; this file runs after them, and
-- tests/integration/test_hot_path_settings.py checks the clauses are there).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
        FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('sp_claim', 'sp_claim_next', 'sp_claim_read', 'sp_take_orphan')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET jit = off SET max_parallel_workers_per_gather = 0',
                       f);
    END LOOP;
END
$$;
