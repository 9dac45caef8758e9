-- The tables of the system we replace (same names and columns, so its writers, trainer and
-- dashboards keep working), with bigint ids, timestamptz and the columns the worker needs.

CREATE TABLE machines (
    id          bigserial PRIMARY KEY,
    machine_id  varchar(36) NOT NULL UNIQUE,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE failures (
    id          bigserial PRIMARY KEY,
    start_time  timestamptz NOT NULL DEFAULT now(),
    end_time    timestamptz,
    is_active   boolean NOT NULL DEFAULT true,
    machine_id  bigint NOT NULL REFERENCES machines (id)
);

CREATE TABLE readings (
    id           bigserial PRIMARY KEY,
    "timestamp"  timestamptz NOT NULL DEFAULT now(),
    "values"     jsonb,
    machine_id   bigint NOT NULL REFERENCES machines (id),
    failure_id   bigint REFERENCES failures (id),
    -- When the row was written; the latency histogram measures from here to the commit of the
    -- prediction. Writers never set it.
    inserted_at  timestamptz NOT NULL DEFAULT statement_timestamp(),
    -- The writing transaction. The worker hands out readings in (txid, id) order and only below
    -- the oldest transaction still running, so a reading whose id was taken early but committed
    -- late is never skipped (ids come from a sequence before the commit). Writers never set it.
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX readings_txid_id_idx ON readings (txid, id);
CREATE INDEX readings_machine_id_idx ON readings (machine_id);

CREATE TABLE predictions (
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
CREATE INDEX predictions_prediction_time_idx ON predictions (prediction_time);

-- Readings that could not be scored (missing sensor, not a number, ...): one row each, with the
-- reason, so nothing is retried forever and nothing is lost silently.
CREATE TABLE reading_errors (
    id             bigserial PRIMARY KEY,
    reading_id     bigint NOT NULL REFERENCES readings (id),
    reason         varchar(40) NOT NULL,
    detail         text NOT NULL,
    model_version  varchar(50) NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reading_errors_reading_model_key UNIQUE (reading_id, model_version)
);

-- The active-model table: the newest row with is_active is the model to serve.
CREATE TABLE clusters (
    id                    bigserial PRIMARY KEY,
    mlflow_run_id         varchar(36) NOT NULL UNIQUE,
    mlflow_model_version  integer,
    created_at            timestamptz NOT NULL DEFAULT now(),
    is_active             boolean NOT NULL DEFAULT false,
    n_clusters            integer,
    silhouette_score      double precision,
    cluster_profiles      jsonb
);
CREATE INDEX clusters_active_idx ON clusters (created_at DESC, id DESC) WHERE is_active;

-- New-model notices, kept for the old system's tools; the worker marks them processed.
CREATE TABLE versions (
    id            bigserial PRIMARY KEY,
    version       varchar(50) NOT NULL,
    run_id        varchar(50),
    created_at    timestamptz NOT NULL DEFAULT now(),
    is_processed  boolean NOT NULL DEFAULT false
);

-- One row per drift excursion: opened when the score rises above the threshold, closed
-- (ended_at) when it falls below the exit level.
CREATE TABLE drift (
    id                      bigserial PRIMARY KEY,
    detection_time          timestamptz NOT NULL DEFAULT now(),
    drift_score             double precision NOT NULL,
    reference_distribution  jsonb NOT NULL,
    current_distribution    jsonb NOT NULL,
    model_version           varchar(50),
    peak_score              double precision,
    ended_at                timestamptz
);
-- Several replicas, or a restart mid-excursion, must not open a second row for one excursion.
CREATE UNIQUE INDEX drift_one_open_excursion_idx ON drift (model_version) WHERE ended_at IS NULL;

-- Scoring bookkeeping. The cursor is the last (txid, id) handed out; a claim is a handed-out
-- range not yet scored. Whoever deletes a claim row in the transaction that writes the range's
-- predictions has scored it: a claim left by a killed worker stays, and another worker takes it.
CREATE TABLE scoring_cursor (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    txid        xid8 NOT NULL DEFAULT '0',
    reading_id  bigint NOT NULL DEFAULT 0
);
INSERT INTO scoring_cursor DEFAULT VALUES;

CREATE TABLE scoring_claims (
    id          bigserial PRIMARY KEY,
    from_txid   xid8 NOT NULL,
    from_id     bigint NOT NULL,
    to_txid     xid8 NOT NULL,
    to_id       bigint NOT NULL,
    worker      text NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Hand out the next range of at most batch_size readings, in (txid, id) order, taking only rows
-- whose writing transaction has ended. Returns no row when there is nothing to hand out.
CREATE FUNCTION sp_claim_range(worker_name text, batch_size integer)
RETURNS TABLE (claim_id bigint, from_txid xid8, from_id bigint, to_txid xid8, to_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    horizon xid8;
    cur_txid xid8;
    cur_id bigint;
    last_txid xid8;
    last_id bigint;
BEGIN
    -- Taken before this transaction locks anything (and so before it has an xid of its own):
    -- every transaction below the horizon has ended, and none can start below it.
    horizon := pg_snapshot_xmin(pg_current_snapshot());
    SELECT c.txid, c.reading_id INTO cur_txid, cur_id FROM scoring_cursor c FOR UPDATE;
    SELECT b.txid, b.id INTO last_txid, last_id
      FROM (SELECT r.txid, r.id FROM readings r
             WHERE (r.txid, r.id) > (cur_txid, cur_id) AND r.txid < horizon
             ORDER BY r.txid, r.id
             LIMIT batch_size) b
     ORDER BY b.txid DESC, b.id DESC
     LIMIT 1;
    IF last_id IS NULL THEN
        RETURN;
    END IF;
    UPDATE scoring_cursor SET txid = last_txid, reading_id = last_id;
    RETURN QUERY
        INSERT INTO scoring_claims AS s (from_txid, from_id, to_txid, to_id, worker)
        VALUES (cur_txid, cur_id, last_txid, last_id, worker_name)
        RETURNING s.id, s.from_txid, s.from_id, s.to_txid, s.to_id;
END
$$;

-- Wake-up signals. One notification per statement (never per row) and never the data itself.
CREATE FUNCTION sp_notify_readings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensor_readings', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER readings_notify AFTER INSERT ON readings
    FOR EACH STATEMENT EXECUTE FUNCTION sp_notify_readings();

CREATE FUNCTION sp_notify_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensor_model', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER clusters_notify AFTER INSERT OR UPDATE OR DELETE ON clusters
    FOR EACH STATEMENT EXECUTE FUNCTION sp_notify_model();
