-- Named queries: each starts with a "-- name: <name>" line. Loaded by db.py.

-- name: claim_range
-- The next range of readings to score (see sp_claim_range in migrations/0001_initial.sql).
SELECT claim_id, from_txid, from_id, to_txid, to_id FROM sp_claim_range($1, $2);

-- name: find_orphan_claim
-- A range handed out more than $1 seconds ago and not yet scored: its worker died or stalls.
SELECT id AS claim_id, from_txid, from_id, to_txid, to_id
  FROM scoring_claims
 WHERE claimed_at < clock_timestamp() - make_interval(secs => $1)
 ORDER BY id
 LIMIT 1;

-- name: take_claim
-- Run in the transaction that writes the range's results: whoever deletes the claim scored it.
DELETE FROM scoring_claims WHERE id = $1 RETURNING id;

-- name: waiting_behind_horizon
-- Committed readings beyond the cursor that could not be handed out yet, because a transaction
-- that started before them is still running.
-- One probe of readings_txid_id_idx from the cursor (LATERAL, ORDER BY the index, LIMIT 1).
-- Without the ORDER BY the planner seq-scans readings hoping to meet a row early; when nothing
-- is waiting (the end of every pass) that reads the whole table.
SELECT EXISTS (
    SELECT 1 FROM scoring_cursor c,
           LATERAL (SELECT 1 FROM readings r
                     WHERE (r.txid, r.id) > (c.txid, c.reading_id)
                     ORDER BY r.txid, r.id
                     LIMIT 1) waiting
);

-- name: read_range
-- {features} is filled with one feature_expression per model feature, in the model's order.
-- age_seconds is measured with the database's clock, so client clock skew cannot bend latency.
SELECT r.id,
       ARRAY[{features}]::float8[] AS features,
       extract(epoch FROM clock_timestamp() - r.inserted_at)::float8 AS age_seconds
  FROM readings r
 WHERE (r.txid, r.id) > ($1, $2) AND (r.txid, r.id) <= ($3, $4)
 ORDER BY r.txid, r.id;

-- name: feature_expression
(r."values" ->> {key})::float8

-- name: read_range_raw
-- The slow path, for a range whose features PostgreSQL could not cast (a non-numeric string,
-- a number beyond float8): every reading's JSON, parsed and checked in Python.
SELECT r.id,
       r."values"::text AS raw,
       extract(epoch FROM clock_timestamp() - r.inserted_at)::float8 AS age_seconds
  FROM readings r
 WHERE (r.txid, r.id) > ($1, $2) AND (r.txid, r.id) <= ($3, $4)
 ORDER BY r.txid, r.id;

-- name: read_raw_values
SELECT id, "values"::text AS raw FROM readings WHERE id = ANY($1::bigint[]);

-- name: active_model
SELECT id, mlflow_run_id, mlflow_model_version, n_clusters
  FROM clusters
 WHERE is_active
 ORDER BY created_at DESC, id DESC
 LIMIT 1;

-- name: mark_versions_processed
-- Every notice up to and including the served run's: older ones must not trigger reloads later.
UPDATE versions SET is_processed = true
 WHERE NOT is_processed
   AND id <= COALESCE((SELECT max(id) FROM versions WHERE run_id = $1), 0);

-- name: backlog
-- Readings not scored yet: beyond the cursor, or inside a range handed out but not written.
SELECT (SELECT count(*) FROM readings r, scoring_cursor c
         WHERE (r.txid, r.id) > (c.txid, c.reading_id))
     + (SELECT COALESCE(sum(n), 0) FROM scoring_claims s,
               LATERAL (SELECT count(*) AS n FROM readings r
                         WHERE (r.txid, r.id) > (s.from_txid, s.from_id)
                           AND (r.txid, r.id) <= (s.to_txid, s.to_id)) c)::bigint AS backlog;

-- name: open_drift_excursion
SELECT id FROM drift WHERE model_version = $1 AND ended_at IS NULL;

-- name: open_drift_row
-- One open row per model version (a partial unique index): a second replica, or a restarted
-- worker, crossing the threshold in the same excursion joins the existing row.
INSERT INTO drift (drift_score, peak_score, reference_distribution, current_distribution,
                   model_version)
VALUES ($1, $1, $2::jsonb, $3::jsonb, $4)
ON CONFLICT (model_version) WHERE ended_at IS NULL DO NOTHING
RETURNING id;

-- name: update_drift_peak
UPDATE drift
   SET peak_score = GREATEST(peak_score, $2),
       current_distribution = CASE WHEN $2 >= COALESCE(peak_score, 0) THEN $3::jsonb
                                   ELSE current_distribution END
 WHERE model_version = $1 AND ended_at IS NULL;

-- name: close_drift_row
UPDATE drift SET ended_at = now(), peak_score = GREATEST(peak_score, $2)
 WHERE model_version = $1 AND ended_at IS NULL;

-- name: close_other_drift_rows
-- A swap ends the previous model's open excursion: its clusters are not ours to judge.
UPDATE drift SET ended_at = now() WHERE ended_at IS NULL AND model_version <> $1;

-- name: rescore_read
-- History for an explicit re-scoring job, by id; the live worker's cursor is not involved.
SELECT id, "values"::text AS raw
  FROM readings
 WHERE id > $1 AND ($2::bigint IS NULL OR id <= $2)
 ORDER BY id
 LIMIT $3;

-- name: rescore_insert_predictions
-- Idempotent: a reading already scored by this model version keeps its prediction.
WITH inserted AS (
    INSERT INTO predictions (reading_id, cluster_id, confidence_score, model_version,
                             mlflow_run_id, model_name)
    SELECT u.reading_id, u.cluster_id, u.confidence, $4, $5, $6
      FROM unnest($1::bigint[], $2::integer[], $3::float8[]) AS u(reading_id, cluster_id, confidence)
    ON CONFLICT (reading_id, model_version) DO NOTHING
    RETURNING 1)
SELECT count(*) FROM inserted;

-- name: rescore_insert_errors
WITH inserted AS (
    INSERT INTO reading_errors (reading_id, reason, detail, model_version)
    SELECT u.reading_id, u.reason, u.detail, $4
      FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(reading_id, reason, detail)
    ON CONFLICT (reading_id, model_version) DO NOTHING
    RETURNING 1)
SELECT count(*) FROM inserted;
