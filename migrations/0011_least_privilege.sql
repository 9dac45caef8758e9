-- Least privilege (issue 21).
--
-- 1. Every function of ours fixes its search_path (CVE-2018-1058): a function that resolves
--    names through the caller's search_path can be made to call an object someone else
--    created in a schema earlier on that path. Functions created by later migrations declare
--    `SET search_path = pg_catalog, public, pg_temp` themselves; this fixes the earlier ones
--    (ours are the sp_* functions of this schema, never an extension's).
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace
           AND p.proname LIKE 'sp\_%'
           AND p.prokind = 'f'
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                              AND d.deptype = 'e')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, public, pg_temp', f);
    END LOOP;
END
$$;

-- 2. The digest of each model's artifacts, recorded when the model is first served (or
--    re-scored with): a later load of the same run and version whose artifacts differ is
--    refused. One row per run and model_version label (the registered version, or run-<id>).
CREATE TABLE IF NOT EXISTS model_artifact_digests (
    mlflow_run_id   text NOT NULL,
    model_version   text NOT NULL,
    digest          text NOT NULL,
    first_served_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mlflow_run_id, model_version)
);
GRANT SELECT, INSERT ON model_artifact_digests TO sensor_predictor_worker;

-- 3. Roles for the two other services of the stack, NOLOGIN like the worker's (grant them to
--    a login role of your own; compose.yaml's postgres init script does): `sensor-predictor
--    train` and `sensor-predictor simulate` get what their queries need and nothing else.
--    Created only if missing, as in 0002 (roles are cluster-wide).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['sensor_predictor_trainer', 'sensor_predictor_simulator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;
                WHEN insufficient_privilege THEN
                    RAISE EXCEPTION 'role % does not exist and % cannot create it', r, current_user
                        USING HINT = format('As a superuser: CREATE ROLE %I NOLOGIN; then run '
                                            '`sensor-predictor migrate` again.', r);
            END;
        END IF;
    END LOOP;
END
$$;

-- The trainer reads the latest readings, activates a model (clusters, under an advisory lock;
-- the old trainer's notice in versions) or marks a candidate (model_candidates).
GRANT SELECT ON readings TO sensor_predictor_trainer;
GRANT SELECT, INSERT, UPDATE ON clusters TO sensor_predictor_trainer;
GRANT INSERT ON versions TO sensor_predictor_trainer;
GRANT INSERT, SELECT (id) ON model_candidates TO sensor_predictor_trainer;
GRANT USAGE ON SEQUENCE clusters_id_seq, versions_id_seq, model_candidates_id_seq
    TO sensor_predictor_trainer;
-- The simulator registers machines, opens and closes failure episodes and writes readings.
GRANT SELECT, INSERT, UPDATE ON machines, failures TO sensor_predictor_simulator;
GRANT INSERT ON readings TO sensor_predictor_simulator;
GRANT USAGE ON SEQUENCE machines_id_seq, failures_id_seq, readings_id_seq
    TO sensor_predictor_simulator;
