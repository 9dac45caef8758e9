-- Stable cluster ids across retrains (see src/sensor_predictor/cluster_ids.py).
--
-- Fresh and adopted (old-system) databases alike: on existing tables only catalog changes (a
-- nullable column, a column with a constant default: no rewrite, no scan, see 0001); the rest
-- is new tables.

-- The model's own label, beside predictions.cluster_id which now carries the stable id. NULL
-- for rows written before this column (the old predictor's, ours before stable ids: there the
-- two were the same number).
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS model_label integer;

-- One row per model version, written the first time the model is used (activation or
-- rescore), aligned against the model active then: its centroids in reading units live in
-- cluster_ids, so a later model can be aligned without loading this one.
CREATE TABLE IF NOT EXISTS cluster_models (
    model_version    varchar(50) PRIMARY KEY,
    mlflow_run_id    varchar(50) NOT NULL,
    feature_names    text[] NOT NULL,
    -- The norm of the scaler's scale_ (reading units): the yardstick with a single cluster.
    spread           double precision NOT NULL DEFAULT 0,
    aligned_against  varchar(50),  -- the reference's model_version; NULL for the first model
    aligned_at       timestamptz NOT NULL DEFAULT now(),
    -- When a worker last swapped it in as the active model: the reference for the next one.
    served_at        timestamptz
);

-- The mapping: a model's label -> stable id, with the label's centroid in reading units (in
-- cluster_models.feature_names order) and its distance to the reference centroid it matched
-- (NULL: a fresh id). An id that no later model carries is retired: never given again, since
-- fresh ids start above max(stable_id).
CREATE TABLE IF NOT EXISTS cluster_ids (
    model_version  varchar(50) NOT NULL REFERENCES cluster_models (model_version),
    label          integer NOT NULL,
    stable_id      integer NOT NULL,
    centroid       double precision[] NOT NULL,
    distance       double precision,
    PRIMARY KEY (model_version, label),
    CONSTRAINT cluster_ids_one_label_per_id UNIQUE (model_version, stable_id)
);

GRANT SELECT, INSERT, UPDATE (served_at) ON cluster_models TO sensor_predictor_worker;
GRANT SELECT, INSERT ON cluster_ids TO sensor_predictor_worker;
