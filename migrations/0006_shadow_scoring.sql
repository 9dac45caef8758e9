-- Shadow scoring: a candidate model scores the live stream beside the active one, before a
-- promotion (see src/sensor_predictor/shadow.py and shadow_scorer.py).
--
-- New tables only: nothing the old system reads or writes changes.

-- An operator marks a trained model as the candidate with a plain insert:
--   INSERT INTO model_candidates (mlflow_run_id, mlflow_model_version) VALUES ('<run>', 7);
-- The newest row neither withdrawn nor promoted is shadowed, unless it is the active model.
-- Withdrawn (stop shadowing without a promotion):
--   UPDATE model_candidates SET withdrawn_at = now() WHERE withdrawn_at IS NULL;
-- Promoted: an ordinary activation (a clusters row with is_active). The worker then sets
-- promoted_at, so that a later rollback to another model does not shadow it again.
CREATE TABLE IF NOT EXISTS model_candidates (
    id                    bigserial PRIMARY KEY,
    mlflow_run_id         varchar(50) NOT NULL,
    mlflow_model_version  integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    withdrawn_at          timestamptz,
    promoted_at           timestamptz
);

-- The candidate's labels beside the active model's, one row per reading and candidate.
-- cluster_id: the candidate's stable id (aligned against the active model when it was first
-- loaded); model_label: its own label; active_*: what the active model wrote in predictions.
-- No foreign key to readings: a shadow row costs the stream as little as possible.
CREATE TABLE IF NOT EXISTS shadow_predictions (
    reading_id             bigint NOT NULL,
    model_version          varchar(50) NOT NULL,
    cluster_id             integer NOT NULL,
    model_label            integer NOT NULL,
    active_model_version   varchar(50) NOT NULL,
    active_cluster_id      integer NOT NULL,
    scored_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (reading_id, model_version)
);

-- One row per evaluation window (DRIFT_DETECTION_WINDOW readings scored by both models):
-- the agreement between them, and the candidate's drift against its own training
-- proportions. What the dashboard's agreement panel reads over time.
CREATE TABLE IF NOT EXISTS shadow_evaluations (
    id                     bigserial PRIMARY KEY,
    candidate_version      varchar(50) NOT NULL,
    active_model_version   varchar(50) NOT NULL,
    readings               integer NOT NULL,
    adjusted_rand_index    double precision NOT NULL,
    same_id_share          double precision NOT NULL,
    candidate_drift_score  double precision,  -- NULL: the candidate has no training proportions
    candidate_p_value      double precision,
    first_reading_id       bigint NOT NULL,
    last_reading_id        bigint NOT NULL,
    evaluated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS shadow_evaluations_candidate
    ON shadow_evaluations (candidate_version, evaluated_at);

-- A change of candidate wakes the workers like a change of the active model.
DROP TRIGGER IF EXISTS model_candidates_notify ON model_candidates;
CREATE TRIGGER model_candidates_notify AFTER INSERT OR UPDATE OR DELETE ON model_candidates
    FOR EACH STATEMENT EXECUTE FUNCTION sp_notify_model();

GRANT SELECT, UPDATE (promoted_at) ON model_candidates TO sensor_predictor_worker;
GRANT INSERT, SELECT (reading_id, model_version) ON shadow_predictions TO sensor_predictor_worker;
GRANT INSERT ON shadow_evaluations TO sensor_predictor_worker;
GRANT USAGE ON SEQUENCE shadow_evaluations_id_seq TO sensor_predictor_worker;
