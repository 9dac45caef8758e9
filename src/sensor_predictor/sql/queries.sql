-- Named queries: each starts with a "-- name: <name>" line. Loaded by db.py.

-- name: claim
-- The next readings to score (sp_claim in migrations/0008_claim_leases.sql): $3 the lease in
-- seconds (NULL: owned by this session's advisory lock), $4 the claim whose lock this session
-- has finished with (released there; NULL: none).
SELECT claim_id, reading_ids, "full", reanchored FROM sp_claim($1, $2, $3, $4);

-- name: claim_read
-- claim and the read of its features in one round trip; $3 is the model's read_range query,
-- $4 its feature names (a parameter: never part of SQL text).
SELECT claim_id, "full", id, features, age_seconds, reanchored
  FROM sp_claim_read($1, $2, $3, $4::text[], $5, $6);

-- name: take_orphan
-- A claim whose owner is gone (its session lock free, its lease expired), taken over, among
-- the candidates $5 the orphan timer found (sp_take_orphan).
SELECT claim_id, reading_ids, previous_worker, age_seconds, token, locked
  FROM sp_take_orphan($1, $2, $3, $4, $5::bigint[]);

-- name: find_orphans
-- The orphan timer's look (sp_orphans): claims above $1 and those in $2, and whether each may
-- be taken over now; the row with id NULL carries the next look's $1 (mark).
SELECT id, orphan, mark FROM sp_orphans($1, $2::bigint[], $3);

-- name: renew_leases
-- The owner's lease renewal, by claim id (index probes), only while it still owns them.
UPDATE scoring_claims SET lease_until = clock_timestamp() + make_interval(secs => $2)
 WHERE id = ANY($3::bigint[]) AND worker = $1 AND lease_until IS NOT NULL;

-- name: claim_unlock
-- A finished claim's session lock, when no next claim on this session released it.
SELECT pg_advisory_unlock(21328, sp_claim_lock_key($1));

-- name: reset_cursor
-- `sensor-predictor reset-cursor`: re-anchor now (sp_reanchor); the readings up to the id
-- returned are swept.
SELECT sp_reanchor('reset-cursor');

-- name: write_claim
-- The claim and its results in one statement (autocommit, so one transaction and one round
-- trip): whoever deletes the claim row scored it; a worker that finds it gone, or taken over
-- since it was handed out ($12, the claim's takeovers then), writes nothing.
-- cluster_id ($3) is the stable id (cluster_registry.py), model_label ($11) the model's own.
WITH taken AS (DELETE FROM scoring_claims WHERE id = $1 AND takeovers = $12 RETURNING id),
     written AS (
         INSERT INTO predictions (reading_id, cluster_id, confidence_score, model_version,
                                  mlflow_run_id, model_name, model_label)
         SELECT u.reading_id, u.cluster_id, u.confidence, $5, $6, $7, u.label
           FROM unnest($2::bigint[], $3::integer[], $4::float8[], $11::integer[])
                AS u(reading_id, cluster_id, confidence, label)
          WHERE EXISTS (SELECT 1 FROM taken)
         RETURNING 1),
     failed AS (
         INSERT INTO reading_errors (reading_id, reason, detail, model_version)
         SELECT e.reading_id, e.reason, e.detail, $5
           FROM unnest($8::bigint[], $9::text[], $10::text[]) AS e(reading_id, reason, detail)
          WHERE EXISTS (SELECT 1 FROM taken)
         RETURNING 1)
SELECT count(*) FROM taken;  -- a data-modifying WITH runs to completion, referenced or not

-- name: write_claim_tolerant
-- write_claim for a batch that met a result already there (someone else wrote predictions for
-- these readings with this model version): those are kept, the rest is written.
WITH taken AS (DELETE FROM scoring_claims WHERE id = $1 AND takeovers = $12 RETURNING id),
     written AS (
         INSERT INTO predictions (reading_id, cluster_id, confidence_score, model_version,
                                  mlflow_run_id, model_name, model_label)
         SELECT u.reading_id, u.cluster_id, u.confidence, $5, $6, $7, u.label
           FROM unnest($2::bigint[], $3::integer[], $4::float8[], $11::integer[])
                AS u(reading_id, cluster_id, confidence, label)
          WHERE EXISTS (SELECT 1 FROM taken)
         ON CONFLICT (reading_id, model_version) DO NOTHING
         RETURNING 1),
     failed AS (
         INSERT INTO reading_errors (reading_id, reason, detail, model_version)
         SELECT e.reading_id, e.reason, e.detail, $5
           FROM unnest($8::bigint[], $9::text[], $10::text[]) AS e(reading_id, reason, detail)
          WHERE EXISTS (SELECT 1 FROM taken)
         ON CONFLICT (reading_id, model_version) DO NOTHING
         RETURNING 1)
SELECT (SELECT count(*) FROM taken) AS taken,
       (SELECT count(*) FROM written) + (SELECT count(*) FROM failed) AS written;

-- name: open_reading_transactions
-- Transactions still open that have written to readings: their readings are scored as soon as
-- they commit (nobody can see or count the rows of a transaction before it commits). The age
-- is NULL where pg_stat_activity hides xact_start (another role's session).
SELECT l.virtualtransaction AS vxid,
       extract(epoch FROM clock_timestamp() - COALESCE(a.xact_start, p.prepared))::float8
           AS age_seconds
  FROM pg_locks l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
  LEFT JOIN pg_prepared_xacts p
         ON l.pid IS NULL AND l.virtualtransaction = '-1/' || p.transaction::text
 WHERE l.locktype = 'relation' AND l.relation = 'readings'::regclass
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.mode = 'RowExclusiveLock' AND l.granted;

-- name: read_range
-- {features} is filled with one feature_expression per model feature, in the model's order,
-- {keys} with one feature_key per feature (up to 1,600; a row has at most 1,664 columns):
-- $2 is the feature names (text[]), picked out of the array once per statement, not per row.
-- No name is ever part of the SQL text.
-- age_seconds is measured with the database's clock, so client clock skew cannot bend latency.
SELECT r.id,
       ARRAY[{features}]::float8[] AS features,
       extract(epoch FROM clock_timestamp() - r.inserted_at)::float8 AS age_seconds
  FROM (SELECT {keys} OFFSET 0) k, readings r
 WHERE r.id = ANY($1::bigint[])
 ORDER BY r.id;

-- name: feature_expression
-- {key}: k.k<i> (a feature_key), or ($2::text[])[<i>] beyond 1,600 features.
(r."values" ->> {key})::float8

-- name: feature_key
($2::text[])[{i}] AS k{i}

-- name: read_range_raw
-- The slow path, for a range whose features PostgreSQL could not cast (a non-numeric string,
-- a number beyond float8): every reading's JSON, parsed and checked in Python; a value larger
-- than $2 bytes, or nested deeper than 64 levels, comes back flagged instead (too_large,
-- unparseable), never as text.
SELECT r.id,
       CASE WHEN f.flag IS NULL THEN r."values"::text END AS raw, f.flag,
       extract(epoch FROM clock_timestamp() - r.inserted_at)::float8 AS age_seconds
  FROM readings r,
       LATERAL (SELECT CASE WHEN pg_column_size(r."values") > $2
                              OR octet_length(r."values"::text) > $2 THEN 'too_large'
                            WHEN jsonb_path_exists(r."values", 'strict $.**{65}')
                            THEN 'unparseable' END AS flag) f
 WHERE r.id = ANY($1::bigint[])
 ORDER BY r.id;

-- name: read_raw_values
-- read_range_raw's JSON for some readings, with the same flags.
SELECT r.id, CASE WHEN f.flag IS NULL THEN r."values"::text END AS raw, f.flag
  FROM readings r,
       LATERAL (SELECT CASE WHEN pg_column_size(r."values") > $2
                              OR octet_length(r."values"::text) > $2 THEN 'too_large'
                            WHEN jsonb_path_exists(r."values", 'strict $.**{65}')
                            THEN 'unparseable' END AS flag) f
 WHERE r.id = ANY($1::bigint[]);

-- name: active_model
SELECT id, mlflow_run_id, mlflow_model_version, n_clusters
  FROM clusters
 WHERE is_active
 ORDER BY created_at DESC, id DESC
 LIMIT 1;

-- name: model_bookkeeping
-- The clusters row's description of its model: compared with the model, never a gate.
SELECT silhouette_score, cluster_profiles FROM clusters WHERE id = $1;

-- name: recent_readings_have_features
-- Do the latest readings carry every feature a model needs? (One index walk from the end.)
SELECT "values" ?& $1::text[] AS has_all FROM readings
 WHERE jsonb_typeof("values") = 'object'
 ORDER BY id DESC
 LIMIT $2;

-- name: mark_versions_processed
-- Every notice up to and including the served run's: older ones must not trigger reloads later.
UPDATE versions SET is_processed = true
 WHERE NOT is_processed
   AND id <= COALESCE((SELECT max(id) FROM versions WHERE run_id = $1), 0);

-- name: adopt_pending
-- Whether migration 0014's one-time pass has work left (false without 0014: a custom folder).
SELECT to_regprocedure('sp_adopt_step(integer)') IS NOT NULL
       AND (SELECT a.upto < a.top FROM scoring_adoption a);

-- name: adopt_step
-- One step of 0014's pass: the next $1 ids' adopted rows still waiting are listed; true when the
-- list is complete (migrations/0014_adopted_backlog.sql).
SELECT sp_adopt_step($1);

-- name: backlog
-- Readings not scored yet (sp_backlog in migrations/0003_snapshot_claims.sql).
SELECT sp_backlog() AS backlog;

-- name: open_drift_excursion
SELECT id FROM drift WHERE model_version = $1 AND ended_at IS NULL;

-- name: open_drift_row
-- One open row per model version (a partial unique index): a second replica, or a restarted
-- worker, crossing the threshold in the same excursion joins the existing row.
-- kind, top_features, outlier_share: migrations/0012.
INSERT INTO drift (drift_score, peak_score, reference_distribution, current_distribution,
                   model_version, kind, top_features, outlier_share)
VALUES ($1, $1, $2::jsonb, $3::jsonb, $4, $5, $6::jsonb, $7)
ON CONFLICT (model_version) WHERE ended_at IS NULL DO NOTHING
RETURNING id;

-- name: update_drift_peak
-- The top features are those of the latest update: what moves now ($4 NULL: left as is).
UPDATE drift
   SET peak_score = GREATEST(peak_score, $2),
       current_distribution = CASE WHEN $2 >= COALESCE(peak_score, 0) THEN $3::jsonb
                                   ELSE current_distribution END,
       top_features = COALESCE($4::jsonb, top_features)
 WHERE model_version = $1 AND ended_at IS NULL;

-- name: close_drift_row
UPDATE drift SET ended_at = now(), peak_score = GREATEST(peak_score, $2)
 WHERE model_version = $1 AND ended_at IS NULL;

-- name: close_other_drift_rows
-- A swap ends the previous model's open excursion: its clusters are not ours to judge.
UPDATE drift SET ended_at = now() WHERE ended_at IS NULL AND model_version <> $1;

-- name: shadow_candidate
-- The model to score in the shadow (migrations/0006): the newest candidate neither withdrawn
-- nor promoted, unless it is the active model. NULL n_clusters: a candidate has no clusters row.
SELECT c.id, c.mlflow_run_id, c.mlflow_model_version, NULL::integer AS n_clusters
  FROM model_candidates c
 WHERE c.withdrawn_at IS NULL AND c.promoted_at IS NULL
   AND c.mlflow_run_id IS DISTINCT FROM (SELECT mlflow_run_id FROM clusters WHERE is_active
                                          ORDER BY created_at DESC, id DESC LIMIT 1)
 ORDER BY c.created_at DESC, c.id DESC
 LIMIT 1;

-- name: mark_candidate_promoted
-- The active model was a candidate: its shadow scoring ends here (its rows stay), and a later
-- rollback to another model does not shadow it again.
UPDATE model_candidates SET promoted_at = now()
 WHERE mlflow_run_id = $1 AND promoted_at IS NULL AND withdrawn_at IS NULL;

-- name: mark_candidate
-- `sensor-predictor train --candidate`: what an operator's plain INSERT does.
INSERT INTO model_candidates (mlflow_run_id, mlflow_model_version) VALUES ($1, $2) RETURNING id;

-- name: write_shadow_predictions
-- One batch's candidate labels beside the active model's; a batch written twice (a claim taken
-- over after a crash) keeps its first rows.
INSERT INTO shadow_predictions (reading_id, model_version, cluster_id, model_label,
                                active_model_version, active_cluster_id)
SELECT u.reading_id, $2, u.cluster_id, u.model_label, $5, u.active_cluster_id
  FROM unnest($1::bigint[], $3::integer[], $4::integer[], $6::integer[])
       AS u(reading_id, cluster_id, model_label, active_cluster_id)
ON CONFLICT (reading_id, model_version) DO NOTHING;

-- name: write_shadow_evaluation
INSERT INTO shadow_evaluations (candidate_version, active_model_version, readings,
                                adjusted_rand_index, same_id_share, candidate_drift_score,
                                candidate_p_value, first_reading_id, last_reading_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9);

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
                             mlflow_run_id, model_name, model_label)
    SELECT u.reading_id, u.cluster_id, u.confidence, $4, $5, $6, u.label
      FROM unnest($1::bigint[], $2::integer[], $3::float8[], $7::integer[])
           AS u(reading_id, cluster_id, confidence, label)
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

-- ---------------------------------------------------------------------------------------
-- Development tooling (sensor_predictor.devtools) and the demo: never on the worker's path.

-- name: exactly_once_tally
-- The invariant every scenario ends on, over the readings with id > $1: each has exactly one
-- result, a prediction or a recorded error. Aggregated joins, not a probe per reading: the
-- bench tallies 1.5M readings with it.
WITH p AS (SELECT reading_id, count(*) AS n FROM predictions WHERE reading_id > $1
            GROUP BY reading_id),
     e AS (SELECT reading_id, count(*) AS n FROM reading_errors WHERE reading_id > $1
            GROUP BY reading_id),
     per_reading AS (
        SELECT coalesce(p.n, 0) AS n_pred, coalesce(e.n, 0) AS n_err
          FROM readings r
          LEFT JOIN p ON p.reading_id = r.id
          LEFT JOIN e ON e.reading_id = r.id
         WHERE r.id > $1)
SELECT count(*) AS readings,
       count(*) FILTER (WHERE n_pred = 1 AND n_err = 0) AS predicted,
       count(*) FILTER (WHERE n_err = 1 AND n_pred = 0) AS errors,
       count(*) FILTER (WHERE n_pred + n_err = 0) AS missing,
       count(*) FILTER (WHERE n_pred + n_err > 1) AS duplicated,
       coalesce(sum(n_pred), 0)::bigint AS prediction_rows,
       coalesce(sum(n_err), 0)::bigint AS error_rows
  FROM per_reading;

-- name: last_reading_id
SELECT coalesce(max(id), 0) FROM readings;

-- name: last_drift_id
SELECT coalesce(max(id), 0) FROM drift;

-- name: readings_after
SELECT count(*) FROM readings WHERE id > $1;

-- name: predictions_by_version
-- The demo's summary: predictions of the readings with id > $1, per model, first served first.
SELECT model_version, count(*) AS n FROM predictions WHERE reading_id > $1
 GROUP BY model_version ORDER BY min(id);

-- name: cluster_ids_by_version
-- The demo's summary: predictions of the readings with id > $1 by model and stable cluster id.
SELECT model_version, cluster_id, count(*) AS n FROM predictions WHERE reading_id > $1
 GROUP BY model_version, cluster_id ORDER BY model_version, cluster_id;

-- name: shadow_by_candidate
-- The demo's summary: each candidate's shadow scoring of the readings with id > $1, and the
-- mean of its agreement windows.
WITH s AS (SELECT model_version, count(*) AS readings, min(scored_at) AS first
             FROM shadow_predictions WHERE reading_id > $1 GROUP BY model_version),
     e AS (SELECT candidate_version, count(*) AS windows, avg(adjusted_rand_index) AS ari,
                  avg(same_id_share) AS same_id, avg(candidate_drift_score) AS drift
             FROM shadow_evaluations WHERE first_reading_id > $1 GROUP BY candidate_version)
SELECT s.model_version, s.readings, COALESCE(e.windows, 0) AS windows, e.ari, e.same_id,
       e.drift
  FROM s LEFT JOIN e ON e.candidate_version = s.model_version
 ORDER BY s.first;

-- name: errors_by_reason
SELECT reason, count(*) AS n FROM reading_errors WHERE reading_id > $1
 GROUP BY reason ORDER BY reason;

-- name: drift_rows_after
SELECT model_version, drift_score, peak_score, detection_time, ended_at
  FROM drift WHERE id > $1 ORDER BY id;

-- ---------------------------------------------------------------------------------------
-- The listener (listener.py) and the migration runner (migrate.py).

-- name: heartbeat
-- The listen connection's keep-alive, and its proof that it listens: a half-open connection
-- never answers; a session that lost its LISTEN (a transaction pooler handing each statement to
-- another server session, a server restarted behind a pooler) shows no channels, or another pid.
SELECT pg_backend_pid() AS pid, ARRAY(SELECT pg_listening_channels()) AS channels;

-- name: listen_probe_notify
-- A notification to the worker's own probe channel: the listen connection must hear it.
SELECT pg_notify($1, $2);

-- name: migration_lock_try
-- A session lock: two replicas starting together apply each file once.
SELECT pg_try_advisory_lock($1);

-- name: migration_unlock
SELECT pg_advisory_unlock($1);

-- name: migration_ledger_create
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT version FROM schema_migrations;

-- name: readings_table_exists
-- Tables without a ledger: the old system's database, adopted as it is.
SELECT to_regclass('readings') IS NOT NULL;

-- name: readings_estimate
SELECT reltuples::bigint FROM pg_class WHERE oid = 'readings'::regclass;

-- name: migration_lock_timeout
-- How long a migration's statement may wait for a table lock (this transaction only).
SELECT set_config('lock_timeout', $1, true);

-- name: index_is_invalid
-- An index left invalid by an interrupted CREATE INDEX CONCURRENTLY.
SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
 WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace;

-- name: drop_index_concurrently
-- {index}: a quoted identifier (no parameter can name an index).
DROP INDEX CONCURRENTLY IF EXISTS {index};

-- name: migration_record
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);

-- ---------------------------------------------------------------------------------------
-- Statements of cluster_registry, the simulator's writer and training

-- name: cluster_reference_named
-- The alignment reference asked for by name (the model served at this moment).
SELECT model_version, feature_names, spread FROM cluster_models WHERE model_version = $1;

-- name: cluster_reference_last_served
-- Else the reference is the model served last (never served: aligned last), other than $1.
SELECT model_version, feature_names, spread FROM cluster_models
 WHERE model_version <> $1
 ORDER BY served_at DESC NULLS LAST, aligned_at DESC
 LIMIT 1;

-- name: cluster_reference_centroids
SELECT label, stable_id, centroid FROM cluster_ids WHERE model_version = $1 ORDER BY label;

-- name: cluster_align_lock
-- Serialises alignments (transaction-level, key ALIGN_LOCK): two replicas aligning at once
-- agree on one mapping and never give a fresh stable id twice.
SELECT pg_advisory_xact_lock($1, $2);

-- name: cluster_next_stable_id
-- The first stable id never given (0 on an empty table).
SELECT COALESCE(max(stable_id) + 1, 0) FROM cluster_ids;

-- name: cluster_model_insert
INSERT INTO cluster_models (model_version, mlflow_run_id, feature_names, spread, aligned_against)
VALUES ($1, $2, $3, $4, $5);

-- name: cluster_id_insert
-- One row per model label (executemany): its stable id, centroid and distance to the match.
INSERT INTO cluster_ids (model_version, label, stable_id, centroid, distance)
VALUES ($1, $2, $3, $4, $5);

-- name: cluster_stored_mapping
-- A model version's label -> stable id mapping, if it has been aligned.
SELECT label, stable_id FROM cluster_ids WHERE model_version = $1 ORDER BY label;

-- name: cluster_mark_served
-- The model is now the one served: the reference for the next model to be aligned.
UPDATE cluster_models SET served_at = now() WHERE model_version = $1;

-- name: cluster_models_all
SELECT * FROM cluster_models ORDER BY aligned_at, model_version;

-- name: cluster_ids_all
SELECT model_version, label, stable_id, distance FROM cluster_ids ORDER BY model_version, label;

-- name: sim_register_machines
-- The simulated machines, created or (already there) touched; their ids by machine_id.
INSERT INTO machines (machine_id) SELECT unnest($1::text[])
    ON CONFLICT (machine_id) DO UPDATE SET last_seen = now()
RETURNING id, machine_id;

-- name: sim_touch_machines
UPDATE machines SET last_seen = now() WHERE id = ANY($1::bigint[]);

-- name: sim_open_failure
-- A failure episode's row, opened when its first reading is written.
INSERT INTO failures (start_time, is_active, machine_id) VALUES ($1, true, $2) RETURNING id;

-- name: sim_insert_readings
-- A plain multi-row INSERT, as the old system's writers send: {rows} is filled with one
-- literal ("timestamp", "values", machine_id, failure_id) tuple per reading, comma-separated.
INSERT INTO readings ("timestamp", "values", machine_id, failure_id) VALUES {rows};

-- name: sim_close_failures
-- Failure episodes closed: $1 their ids, $2 the end time of each.
UPDATE failures AS f SET end_time = c.end_time, is_active = false
  FROM unnest($1::bigint[], $2::timestamptz[]) AS c(id, end_time)
 WHERE f.id = c.id;

-- name: training_readings
-- The latest $1 readings' JSON text, newest first (parsed and checked in Python).
SELECT id, "values"::text AS raw FROM readings ORDER BY id DESC LIMIT $1;

-- name: activation_lock
-- Serialises activations (transaction-level, key ACTIVATION_LOCK_KEY): two trainers
-- activating at once still leave one active row.
SELECT pg_advisory_xact_lock($1);

-- name: deactivate_models
UPDATE clusters SET is_active = false WHERE is_active;

-- name: activate_clusters_row
-- The run's clusters row made active, with its bookkeeping; a run that already has a row (a
-- rollback) gets that row back, updated. $5 is the cluster profiles' JSON text.
INSERT INTO clusters (mlflow_run_id, mlflow_model_version, is_active, n_clusters,
                      silhouette_score, cluster_profiles)
VALUES ($1, $2, true, $3, $4, $5::jsonb)
ON CONFLICT (mlflow_run_id) DO UPDATE SET is_active = true,
    mlflow_model_version = EXCLUDED.mlflow_model_version,
    n_clusters = EXCLUDED.n_clusters, silhouette_score = EXCLUDED.silhouette_score,
    cluster_profiles = EXCLUDED.cluster_profiles
RETURNING id;

-- name: add_version_notice
-- The new-model notice the old trainer wrote (kept for the old system's tools).
INSERT INTO versions (version, run_id) VALUES ($1, $2);

-- name: record_model_digest
-- The digest of a model's artifacts, recorded the first time it is served; the digest on
-- record comes back either way ($1 run id, $2 model_version label, $3 digest). NULL only when
-- a concurrent first record is not visible yet (the caller asks again).
WITH recorded AS (
    INSERT INTO model_artifact_digests (mlflow_run_id, model_version, digest)
    VALUES ($1, $2, $3)
    ON CONFLICT (mlflow_run_id, model_version) DO NOTHING
    RETURNING digest
)
SELECT digest FROM recorded
UNION ALL
SELECT digest FROM model_artifact_digests WHERE mlflow_run_id = $1 AND model_version = $2
LIMIT 1;

-- name: widen_targets
-- `widen-ids` (widen_ids.py, helpers in sql/widen_ids.sql): the integer columns still to widen.
SELECT tbl, col, wide, wide_exists FROM sp_widen_targets()

-- name: widen_prepare
SELECT sp_widen_prepare($1)

-- name: widen_bounds
SELECT lo, hi FROM sp_widen_bounds($1)

-- name: widen_backfill
SELECT upto, copied FROM sp_widen_backfill($1, $2, $3)

-- name: widen_online_steps
-- The CHECKs to validate and the index copies to build CONCURRENTLY, in order.
SELECT step FROM sp_widen_online_steps() step

-- name: widen_swap
SELECT sp_widen_swap()

-- name: widen_fk_steps
SELECT step FROM sp_widen_fk_steps() step

-- name: widen_lock_timeout
-- The swap's and the prepare's bound on waiting for a lock (writers queue behind the waiter).
SELECT set_config('lock_timeout', $1, true)

-- name: widen_analyze
ANALYZE readings, predictions

-- name: widen_drop_helpers
DROP FUNCTION IF EXISTS sp_widen_targets(), sp_widen_prepare(text), sp_widen_bounds(text),
     sp_widen_backfill(text, bigint, integer), sp_widen_online_steps(), sp_widen_swap(),
     sp_widen_fk_steps()

-- name: id_headroom
-- sensor_id_headroom_ratio: per table, the id type's maximum (the column's type, or the
-- sequence's maximum when lower) and the highest id used: the sequence's last value (the worker
-- role has USAGE on predictions_id_seq), and for readings max(id) too (one index probe; the
-- worker may read readings but not their sequence).
SELECT t.tbl,
       least(CASE a.atttypid WHEN 'integer'::regtype THEN 2147483647
                             WHEN 'smallint'::regtype THEN 32767
                             ELSE 9223372036854775807 END,
             coalesce(s.max_value, 9223372036854775807))::float8 AS id_max,
       greatest(coalesce(s.last_value, 0), coalesce(t.top, 0), 0)::float8 AS id_used
  FROM (SELECT 'readings' AS tbl, (SELECT max(id) FROM readings)::bigint AS top
        UNION ALL
        SELECT 'predictions', NULL) t
  JOIN pg_attribute a ON a.attrelid = to_regclass(t.tbl) AND a.attname = 'id'
                     AND NOT a.attisdropped
  LEFT JOIN pg_sequences s
         ON (s.schemaname || '.' || s.sequencename)::regclass
            = pg_get_serial_sequence(t.tbl, 'id')::regclass
-- name: read_range_guarded
-- A claim scored in isolation (a claim that failed, or was taken over too often, see
-- docs/faults.md): each reading's JSON text, NULL when it is longer than $2 characters (never
-- sent to the worker), with its length.
SELECT r.id,
       CASE WHEN length(r."values"::text) <= $2 THEN r."values"::text END AS raw,
       r."values" IS NULL AS missing,
       length(r."values"::text) AS chars,
       extract(epoch FROM clock_timestamp() - r.inserted_at)::float8 AS age_seconds
  FROM readings r
 WHERE r.id = ANY($1::bigint[])
 ORDER BY r.id;

-- name: migration_lock_holder
-- Who holds the migration lock (a bigint advisory key: classid its high 32 bits, objid its low).
SELECT a.pid, a.application_name, a.state, a.xact_start, a.backend_start
  FROM pg_locks l
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND ((l.classid::bigint << 32) | l.objid::bigint) = $1
 LIMIT 1;

-- name: index_build_blockers
-- The sessions a CREATE INDEX CONCURRENTLY (backend $1) waits for.
SELECT a.pid, a.usename, a.application_name, a.state, a.xact_start,
       extract(epoch FROM now() - a.xact_start)::float8 AS xact_age_s,
       left(a.query, 200) AS query
  FROM unnest(pg_blocking_pids($1)) AS b(pid)
  JOIN pg_stat_activity a ON a.pid = b.pid
 ORDER BY a.xact_start;

-- name: index_build_phase
SELECT phase FROM pg_stat_progress_create_index WHERE pid = $1;

-- name: cluster_model_run
-- The run whose stable-id mapping is stored under a version label (NULL: none yet).
SELECT mlflow_run_id FROM cluster_models WHERE model_version = $1;

-- name: doorbell_lock
-- The doorbell's session locks (src/sensor_predictor/doorbell.py, migrations/0013_doorbell.sql):
-- $1 = 21329, $2 = 2 (the bell) or 3 (the standby lock); waits until granted.
SELECT pg_advisory_lock($1, $2);

-- name: doorbell_unlock
-- The bell given up at the start of a pass (writers stop notifying while the worker drains).
SELECT pg_advisory_unlock($1, $2);

-- name: doorbell_help
-- A pass that lasts wakes the other workers (the writers do not notify while it drains).
SELECT pg_notify('sensor_readings', '');
