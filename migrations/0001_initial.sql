-- The tables of the system we replace (same names and columns, so its writers, trainer and
-- dashboards keep working), with the columns the worker needs.
--
-- Two starting points, one result:
-- * a fresh database: every table is created here, with bigint ids;
-- * a database the old system made (its consumer's ORM creates the tables at every start, often
--   before we run): its tables, integer ids and constraint names are kept, and only what we need
--   is added. Nothing here rewrites a table or scans one: a column added with a constant (or
--   stable) default is a catalog change, and SET DEFAULT only affects rows inserted later.
--   The indexes that must be built over existing rows come in 0004, built CONCURRENTLY.
-- The runner applies this file in one transaction with a short lock_timeout, retried: writers
-- stall for at most that long, never behind a migration that waits for someone else's lock.

-- Take every lock at once, in the order the old consumer takes them (machines, failures,
-- readings), so that its transactions and this one cannot deadlock.
DO $$
BEGIN
    IF to_regclass('readings') IS NOT NULL THEN
        LOCK TABLE machines, failures, readings, predictions IN ACCESS EXCLUSIVE MODE;
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS machines (
    id          bigserial PRIMARY KEY,
    machine_id  varchar(36) NOT NULL UNIQUE,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE machines ALTER COLUMN first_seen SET DEFAULT now(),
                     ALTER COLUMN last_seen SET DEFAULT now();

CREATE TABLE IF NOT EXISTS failures (
    id          bigserial PRIMARY KEY,
    start_time  timestamptz NOT NULL DEFAULT now(),
    end_time    timestamptz,
    is_active   boolean NOT NULL DEFAULT true,
    machine_id  bigint NOT NULL REFERENCES machines (id)
);
ALTER TABLE failures ALTER COLUMN start_time SET DEFAULT now(),
                     ALTER COLUMN is_active SET DEFAULT true;

CREATE TABLE IF NOT EXISTS readings (
    id           bigserial PRIMARY KEY,
    "timestamp"  timestamptz NOT NULL DEFAULT now(),
    "values"     jsonb,
    machine_id   bigint NOT NULL REFERENCES machines (id),
    failure_id   bigint REFERENCES failures (id)
);
ALTER TABLE readings ALTER COLUMN "timestamp" SET DEFAULT now();
-- When the row was written; the latency histogram measures from here to the commit of the
-- prediction. Writers never set it. (statement_timestamp() is stable, not volatile: rows that
-- existed before the column get the migration's time, and the table is not rewritten.)
ALTER TABLE readings ADD COLUMN IF NOT EXISTS
    inserted_at timestamptz NOT NULL DEFAULT statement_timestamp();
-- The writing transaction: the worker hands out readings by transaction snapshots (see 0003).
-- Writers never set it. Rows older than the column read as '0', "committed before anything":
-- a volatile default here would rewrite the table, so the real default is set separately and
-- applies from now on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'readings'::regclass AND attname = 'txid'
                      AND NOT attisdropped) THEN
        ALTER TABLE readings ADD COLUMN txid xid8 NOT NULL DEFAULT '0';
    END IF;
END
$$;
ALTER TABLE readings ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

CREATE TABLE IF NOT EXISTS predictions (
    id                bigserial PRIMARY KEY,
    cluster_id        integer NOT NULL,
    model_version     varchar(50) NOT NULL,
    confidence_score  double precision,
    prediction_time   timestamptz NOT NULL DEFAULT now(),
    mlflow_run_id     varchar(50),
    model_name        varchar(100) NOT NULL DEFAULT 'sensor_failure_clustering',
    reading_id        bigint NOT NULL REFERENCES readings (id),
    CONSTRAINT predictions_reading_model_key UNIQUE (reading_id, model_version)
);
ALTER TABLE predictions ALTER COLUMN prediction_time SET DEFAULT now(),
                        ALTER COLUMN model_name SET DEFAULT 'sensor_failure_clustering';

-- Readings that could not be scored (missing sensor, not a number, ...): one row each, with the
-- reason, so nothing is retried forever and nothing is lost silently.
CREATE TABLE IF NOT EXISTS reading_errors (
    id             bigserial PRIMARY KEY,
    reading_id     bigint NOT NULL REFERENCES readings (id),
    reason         varchar(40) NOT NULL,
    detail         text NOT NULL,
    model_version  varchar(50) NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reading_errors_reading_model_key UNIQUE (reading_id, model_version)
);

-- The active-model table: the newest row with is_active is the model to serve. Its bookkeeping
-- columns describe a model and may be left out by a plain SQL activation.
CREATE TABLE IF NOT EXISTS clusters (
    id                    bigserial PRIMARY KEY,
    mlflow_run_id         varchar(36) NOT NULL UNIQUE,
    mlflow_model_version  integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    is_active             boolean NOT NULL DEFAULT false,
    n_clusters            integer,
    silhouette_score      double precision,
    cluster_profiles      jsonb
);
ALTER TABLE clusters ALTER COLUMN created_at SET DEFAULT now(),
                     ALTER COLUMN is_active SET DEFAULT false,
                     ALTER COLUMN mlflow_model_version DROP NOT NULL,
                     ALTER COLUMN n_clusters DROP NOT NULL,
                     ALTER COLUMN silhouette_score DROP NOT NULL,
                     ALTER COLUMN cluster_profiles DROP NOT NULL;
CREATE INDEX IF NOT EXISTS clusters_active_idx
    ON clusters (created_at DESC, id DESC) WHERE is_active;

-- New-model notices, kept for the old system's tools; the worker marks them processed.
CREATE TABLE IF NOT EXISTS versions (
    id            bigserial PRIMARY KEY,
    version       varchar(50) NOT NULL,
    run_id        varchar(50),
    created_at    timestamptz NOT NULL DEFAULT now(),
    is_processed  boolean NOT NULL DEFAULT false
);
ALTER TABLE versions ALTER COLUMN created_at SET DEFAULT now(),
                     ALTER COLUMN is_processed SET DEFAULT false,
                     ALTER COLUMN run_id DROP NOT NULL;

-- One row per drift excursion: opened when the score rises above the threshold, closed
-- (ended_at) when it falls below the exit level.
CREATE TABLE IF NOT EXISTS drift (
    id                      bigserial PRIMARY KEY,
    detection_time          timestamptz NOT NULL DEFAULT now(),
    drift_score             double precision NOT NULL,
    reference_distribution  jsonb NOT NULL,
    current_distribution    jsonb NOT NULL
);
ALTER TABLE drift ALTER COLUMN detection_time SET DEFAULT now();
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = 'drift'::regclass AND attname = 'ended_at'
                      AND NOT attisdropped) THEN
        ALTER TABLE drift ADD COLUMN model_version varchar(50),
                          ADD COLUMN peak_score double precision,
                          ADD COLUMN ended_at timestamptz;
        -- The old predictor's rows (one per cycle while the score stayed high) are history:
        -- each is closed where it was written. drift is small; readings is not touched.
        UPDATE drift SET ended_at = detection_time, peak_score = drift_score;
    END IF;
END
$$;
-- Several replicas, or a restart mid-excursion, must not open a second row for one excursion.
CREATE UNIQUE INDEX IF NOT EXISTS drift_one_open_excursion_idx
    ON drift (model_version) WHERE ended_at IS NULL;

-- Scoring bookkeeping (the claim protocol itself is in 0003).
CREATE TABLE IF NOT EXISTS scoring_cursor (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    txid        xid8 NOT NULL DEFAULT '0',
    reading_id  bigint NOT NULL DEFAULT 0
);
INSERT INTO scoring_cursor DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS scoring_claims (
    id          bigserial PRIMARY KEY,
    from_txid   xid8 NOT NULL,
    from_id     bigint NOT NULL,
    to_txid     xid8 NOT NULL,
    to_id       bigint NOT NULL,
    worker      text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Wake-up signals. One notification per statement (never per row) and never the data itself.
CREATE OR REPLACE FUNCTION sp_notify_readings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensor_readings', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS readings_notify ON readings;
CREATE TRIGGER readings_notify AFTER INSERT ON readings
    FOR EACH STATEMENT EXECUTE FUNCTION sp_notify_readings();

CREATE OR REPLACE FUNCTION sp_notify_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensor_model', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS clusters_notify ON clusters;
CREATE TRIGGER clusters_notify AFTER INSERT OR UPDATE OR DELETE ON clusters
    FOR EACH STATEMENT EXECUTE FUNCTION sp_notify_model();
