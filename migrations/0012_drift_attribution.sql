-- Drift that says why (src/sensor_predictor/feature_drift.py, docs/drift.md): every drift row
-- says which rule opened it and names the features that moved most.
--
-- Nullable columns only: the old system's consumer and trainer, which insert into drift
-- without naming them, go on working, and their rows read as kind NULL (the cluster rule, the
-- only one it had).
--
--   kind          what opened the excursion: 'cluster' (JS divergence of the cluster shares),
--                 'feature' (a feature's window mean), 'outlier' (readings far from every
--                 centre)
--   top_features  the features with the largest |z| of their window mean against the training
--                 mean, largest first: [{"feature", "effect", "z", "p_value", "window_mean",
--                 "reference_mean"}, ...]; at the opening, then at every peak update
--   outlier_share the share of the window beyond the training 99th percentile distance, at the
--                 opening (NULL: the model carries no distances)
ALTER TABLE drift ADD COLUMN IF NOT EXISTS kind text;
ALTER TABLE drift ADD COLUMN IF NOT EXISTS top_features jsonb;
ALTER TABLE drift ADD COLUMN IF NOT EXISTS outlier_share double precision;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'drift'::regclass AND conname = 'drift_kind_check') THEN
        ALTER TABLE drift ADD CONSTRAINT drift_kind_check
            CHECK (kind IN ('cluster', 'feature', 'outlier'));
    END IF;
END
$$;
