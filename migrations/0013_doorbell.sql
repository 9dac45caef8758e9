-- The doorbell (docs/how-it-works.md, "Wake-ups"): a writer notifies only when a worker may be
-- asleep, so that writers keep their group commit.
--
-- Why: PostgreSQL serialises the commits of notifying transactions (PreCommit_Notify takes a
-- database-wide lock and holds it through the commit's WAL flush). With the statement trigger
-- of 0001 every writer transaction notified: 8 single-row writers lost half their throughput.
--
-- How: the lock (class 21329, key 2) is the bell.
-- * A writer's INSERT tries to take it SHARED for its transaction, without waiting. Taken: a
--   worker is awake (or arming, see below) and will look after this transaction commits: no
--   notification. Refused: a worker holds it EXCLUSIVE (it sleeps, armed), or waits for it (a
--   queued exclusive request refuses new shared tries): the trigger notifies, as before.
-- * A worker that finds nothing left asks for the lock EXCLUSIVE at session level, on a
--   session of its own. The grant waits for every writer that took it shared (and so did not
--   notify) to commit or roll back; then the worker makes one more pass, whose snapshot sees
--   all their readings, and sleeps holding the lock. Woken, it releases it (writers stop
--   notifying while it drains) and arms again when it is caught up.
-- * The WHEN clause is evaluated in C: a writer that takes the lock runs no plpgsql at all.
--   The advisory lock functions are executable by PUBLIC (PostgreSQL's default): any writer
--   role works, as before.
-- A worker of an older version never arms: writers do not notify while it is the only one,
-- and it finds new readings at its poll (INFERENCE_INTERVAL_SECONDS) or at another wake-up.
-- The key: 21328 is the claims' class (every int4 key may be some claim's); 21329 key 1 is the
-- cluster alignment lock (cluster_registry.py). Keep in step with doorbell.py (BELL).

DROP TRIGGER IF EXISTS readings_notify ON readings;
CREATE TRIGGER readings_notify AFTER INSERT ON readings
    FOR EACH STATEMENT
    WHEN (NOT pg_try_advisory_xact_lock_shared(21329, 2))
    EXECUTE FUNCTION sp_notify_readings();
