-- The least-privileged role for `sensor-predictor run --no-migrate`: exactly what the worker's
-- queries need, nothing else. NOLOGIN: grant it to a login role of your own, e.g.
--   CREATE ROLE sensor_worker LOGIN PASSWORD '...' IN ROLE sensor_predictor_worker;
-- Migrations keep running as the tables' owner (`sensor-predictor migrate`).
--
-- Roles are cluster-wide: several databases of one cluster (or two replicas migrating at once)
-- may get here, so the role is created only if it is missing, and a concurrent creation is not
-- an error. Creating it needs CREATEROLE; an owner without it fails here with a hint, and a
-- superuser can create the role by hand and re-run the migration.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'sensor_predictor_worker') THEN
        BEGIN
            CREATE ROLE sensor_predictor_worker NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created by a concurrent migration of another database
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'role sensor_predictor_worker does not exist and % cannot create it',
                                current_user
                    USING HINT = 'As a superuser: CREATE ROLE sensor_predictor_worker NOLOGIN;'
                                 ' then run `sensor-predictor migrate` again.';
        END;
    END IF;
END
$$;

-- Reads: new readings and their features, the active model.
GRANT SELECT ON readings, clusters TO sensor_predictor_worker;
-- The old trainer's notices: marked processed once their model is served.
GRANT SELECT, UPDATE (is_processed) ON versions TO sensor_predictor_worker;
-- Claims: the claim function moves the cursor (SELECT ... FOR UPDATE needs UPDATE) and inserts
-- a claim; a batch deletes its claim (DELETE ... RETURNING needs SELECT); orphans are looked up.
GRANT SELECT, UPDATE ON scoring_cursor TO sensor_predictor_worker;
GRANT SELECT, INSERT, DELETE ON scoring_claims TO sensor_predictor_worker;
-- Results, written with COPY (INSERT privilege). `sensor-predictor rescore` inserts with
-- ON CONFLICT (reading_id, model_version) DO NOTHING, which must read those two columns.
GRANT INSERT, SELECT (reading_id, model_version) ON predictions, reading_errors
    TO sensor_predictor_worker;
-- Drift excursions: looked up, opened (INSERT ... ON CONFLICT DO NOTHING RETURNING id), updated.
GRANT SELECT, INSERT, UPDATE ON drift TO sensor_predictor_worker;
-- The serial columns of the rows it inserts.
GRANT USAGE ON SEQUENCE scoring_claims_id_seq, predictions_id_seq, reading_errors_id_seq,
                        drift_id_seq TO sensor_predictor_worker;
-- Functions are executable by PUBLIC by default; the claim functions are the worker's alone
-- (granted where they are created, in 0003).
-- Foreign keys (predictions/reading_errors -> readings) are checked with the privileges of the
-- referenced table's owner: no grant on machines or failures is needed, and none is given.
