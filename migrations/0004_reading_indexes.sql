-- migrate: no-transaction
-- Indexes over readings, which may hold months of the old system's rows when we adopt its
-- database: built CONCURRENTLY, so its consumer keeps writing meanwhile. A build that failed
-- half-way leaves an invalid index; the runner drops it before building it again.
-- Each statement runs on its own (CONCURRENTLY cannot run inside a transaction block).

-- The claim's index: readings in (txid, id) order, and one transaction's readings by txid.
CREATE INDEX CONCURRENTLY IF NOT EXISTS readings_txid_id_idx ON readings (txid, id);

CREATE INDEX CONCURRENTLY IF NOT EXISTS readings_machine_id_idx ON readings (machine_id);

CREATE INDEX CONCURRENTLY IF NOT EXISTS predictions_prediction_time_idx
    ON predictions (prediction_time);
