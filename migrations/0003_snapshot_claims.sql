-- Claims between two transaction snapshots, the way PgQ builds its batches: a reading is handed
-- out once its writing transaction is visible in a snapshot taken at the claim, whatever else is
-- still running on the server. 0001's protocol stopped at the oldest transaction still running
-- anywhere in the cluster (pg_snapshot_xmin), so one long transaction, even in another database,
-- held back every reading committed after it started.
--
-- The cursor says which readings have been handed out:
--   snap    every transaction visible in it has had all its readings handed out
--           (NULL: none yet; the first interval starts from nothing);
--   target  the snapshot of the interval being handed out, NULL between intervals;
--   (txid, reading_id)  how far, in (txid, id) order, that interval has been handed out.
-- The interval between snap and target is every transaction visible in target but not in snap:
--   a) the txids in [xmax(snap), xmax(target)) that are visible in target: one index range;
--   b) the txids that were still running in snap (its xip list) and are visible in target.
-- Every txid below xmax(snap) and not in its xip list was visible in snap already. A transaction
-- still running at target is in target's xip list and is taken by the next interval as soon as
-- it has committed. A claim's cost is its batch plus one index probe per transaction that was
-- running, never a scan over what a long transaction has kept waiting.
--
-- Rows that existed before the txid column (a database adopted from the old system) read as
-- txid '0': committed before everything, handed out by the first interval in id order, and
-- skipped when the old predictor had already scored them.

ALTER TABLE scoring_cursor ADD COLUMN snap pg_snapshot,
                           ADD COLUMN target pg_snapshot;

-- A claim is now the list of readings it hands out; its owner holds a session advisory lock on
-- it (class 21328, key = id mod 2^31) from the moment it is visible until its results commit.
-- When the owner's session ends (a SIGKILL, a crash, a lost connection) the server drops the
-- lock, and the next worker to look takes the claim over at once.
ALTER TABLE scoring_claims ADD COLUMN reading_ids bigint[],
                           ADD COLUMN pid integer,
                           ADD COLUMN takeovers integer NOT NULL DEFAULT 0;
-- Ranges handed out by 0001's protocol and not written yet keep their readings.
UPDATE scoring_claims s
   SET reading_ids = ARRAY(SELECT r.id FROM readings r
                            WHERE (r.txid, r.id) > (s.from_txid, s.from_id)
                              AND (r.txid, r.id) <= (s.to_txid, s.to_id)
                            ORDER BY r.txid, r.id);
ALTER TABLE scoring_claims ALTER COLUMN reading_ids SET NOT NULL,
                           DROP COLUMN from_txid, DROP COLUMN from_id,
                           DROP COLUMN to_txid, DROP COLUMN to_id;

DROP FUNCTION IF EXISTS sp_claim_range(text, integer);

CREATE FUNCTION sp_claim_lock_key(claim_id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT (claim_id % 2147483647)::integer $$;

-- Hand out the next readings to score, at most batch_size. Returns:
--   no row                       nothing new to hand out;
--   claim_id NULL, no readings   progress without work (adopted rows the old predictor scored);
--   claim_id, reading_ids        a claim, locked by this session, to score and then delete;
-- and `full`: the batch was filled, or as many rows as allowed were looked at (adopted rows
-- already scored are passed over), so more are likely waiting: the worker is behind.
-- The claim's commit does not wait for the disk: the commit of its results comes later in the
-- WAL, so a crash that loses the claim loses its results too, and the readings are handed out
-- again. The lock of this session's previous claim (already written) is released here, which
-- saves a round trip per batch.
CREATE FUNCTION sp_claim(worker_name text, batch_size integer)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], "full" boolean)
LANGUAGE plpgsql AS $$
DECLARE
    cur record;
    lo xid8;
    hi xid8;
    from_txid xid8;
    from_id bigint;
    running xid8[];
    n integer;
    last_txid xid8;
    last_id bigint;
    ids bigint[];
    opened boolean;
    new_id bigint;
    scan integer;
    n_todo integer;
    scanned bigint;
    more boolean;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_unlock_all();
    SELECT c.snap, c.target, c.txid, c.reading_id INTO cur FROM scoring_cursor c FOR UPDATE;
    FOR attempt IN 1..2 LOOP
        opened := cur.target IS NULL;
        IF opened THEN
            -- Taken after the cursor lock, so it is never older than the cursor's snap.
            cur.target := pg_current_snapshot();
            IF cur.snap IS NOT NULL AND cur.target::text = cur.snap::text THEN
                RETURN;  -- no transaction has ended since: nothing can be new
            END IF;
        END IF;
        hi := pg_snapshot_xmax(cur.target);
        IF cur.snap IS NULL THEN
            lo := '0';
            running := '{}';
        ELSE
            lo := pg_snapshot_xmax(cur.snap);
            running := ARRAY(SELECT x FROM pg_snapshot_xip(cur.snap) AS x
                              WHERE pg_visible_in_snapshot(x, cur.target) ORDER BY x);
        END IF;
        IF cur.txid >= lo THEN
            from_txid := cur.txid;
            from_id := cur.reading_id;
        ELSE
            from_txid := lo;
            from_id := -9223372036854775808;
        END IF;
        -- Adopted rows (txid '0', first interval only) that the old predictor scored are
        -- passed over; there, up to 4 batches of rows are looked at to fill one batch.
        scan := CASE WHEN cur.snap IS NULL AND cur.txid = '0' THEN 4 * batch_size
                     ELSE batch_size END;
        SELECT count(*), (array_agg(k.txid ORDER BY k.txid DESC, k.id DESC))[1],
               (array_agg(k.id ORDER BY k.txid DESC, k.id DESC))[1],
               array_agg(k.id ORDER BY k.txid, k.id) FILTER (WHERE k.todo),
               count(*) FILTER (WHERE k.todo), max(k.scanned)
          INTO n, last_txid, last_id, ids, n_todo, scanned
          FROM (SELECT p.txid, p.id, p.todo,
                       count(*) FILTER (WHERE p.todo) OVER (ORDER BY p.txid, p.id) AS seen,
                       count(*) OVER () AS scanned
                  FROM (SELECT u.txid, u.id,
                               (u.txid <> '0' OR NOT EXISTS (
                                   SELECT 1 FROM predictions o WHERE o.reading_id = u.id)) AS todo
                          FROM (SELECT r.txid, r.id
                                  FROM unnest(running) AS x(t),
                                       LATERAL (SELECT r.txid, r.id FROM readings r
                                                 WHERE r.txid = x.t
                                                   AND (r.txid, r.id) > (cur.txid, cur.reading_id)
                                                 ORDER BY r.txid, r.id
                                                 LIMIT scan) r
                                UNION ALL
                                (SELECT r.txid, r.id FROM readings r
                                  WHERE (r.txid, r.id) > (from_txid, from_id) AND r.txid < hi
                                    AND pg_visible_in_snapshot(r.txid, cur.target)
                                  ORDER BY r.txid, r.id
                                  LIMIT scan)) u
                         ORDER BY u.txid, u.id
                         LIMIT scan) p) k
         -- up to and including the batch_size-th reading to score
         WHERE k.seen < batch_size OR (k.seen = batch_size AND k.todo);
        more := n_todo >= batch_size OR scanned >= scan;
        IF more THEN
            cur.txid := last_txid;  -- more of this interval is left
            cur.reading_id := last_id;
        ELSE
            cur.snap := cur.target;  -- the interval is handed out
            cur.target := NULL;
            cur.txid := '0';
            cur.reading_id := 0;
        END IF;
        UPDATE scoring_cursor
           SET snap = cur.snap, target = cur.target, txid = cur.txid, reading_id = cur.reading_id;
        IF n > 0 THEN
            IF ids IS NULL THEN
                RETURN QUERY SELECT NULL::bigint, '{}'::bigint[], more;
                RETURN;
            END IF;
            INSERT INTO scoring_claims AS s (reading_ids, worker, pid)
            VALUES (ids, worker_name, pg_backend_pid())
            RETURNING s.id INTO new_id;
            -- Held before the claim can be seen by anyone (it is seen once this commits).
            PERFORM pg_advisory_lock(21328, sp_claim_lock_key(new_id));
            RETURN QUERY SELECT new_id, ids, more;
            RETURN;
        END IF;
        -- An interval that was already open and turned out empty: open a fresh one at once.
        EXIT WHEN opened;
    END LOOP;
END
$$;

-- sp_claim and the read of its readings in one round trip: read_sql is the worker's read query
-- for its model (its features extracted in SQL, `$1` the claim's reading ids). Rows as
-- (claim_id, id, features, age_seconds); no row when nothing is new; one row of NULLs for
-- progress without work. A value that cannot be cast fails the statement, and with it the
-- claim (nothing is handed out): the worker then claims with sp_claim and reads the JSON.
CREATE FUNCTION sp_claim_read(worker_name text, batch_size integer, read_sql text)
RETURNS TABLE (claim_id bigint, "full" boolean, id bigint, features double precision[],
               age_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    SELECT s.claim_id, s.reading_ids, s."full" INTO c FROM sp_claim(worker_name, batch_size) s;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF c.claim_id IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, c."full", NULL::bigint, NULL::float8[], NULL::float8;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT $2::bigint, $3, q.id::bigint, q.features::float8[], q.age_seconds::float8'
            ' FROM (' || read_sql || ') q'
        USING c.reading_ids, c.claim_id, c."full";
END
$$;

-- A claim whose owner's session has ended (its lock is free): taken over by this session, at
-- once. A claim whose owner still holds its lock is left alone, however slow, except past
-- fallback_seconds: a half-open session the server has not noticed yet keeps its lock, and its
-- claim is then scored a second time; whoever deletes the claim row first writes the results,
-- the other one writes nothing.
CREATE FUNCTION sp_take_orphan(worker_name text, fallback_seconds double precision)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], previous_worker text, age_seconds float8)
LANGUAGE plpgsql AS $$
DECLARE
    c record;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_unlock_all();
    FOR c IN SELECT s.id, s.reading_ids, s.worker, s.claimed_at FROM scoring_claims s
              ORDER BY s.id LOOP
        IF pg_try_advisory_lock(21328, sp_claim_lock_key(c.id)) THEN
            UPDATE scoring_claims s
               SET worker = worker_name, pid = pg_backend_pid(), claimed_at = clock_timestamp(),
                   takeovers = s.takeovers + 1
             WHERE s.id = c.id;
            IF FOUND THEN
                RETURN QUERY SELECT c.id, c.reading_ids, c.worker,
                    extract(epoch FROM clock_timestamp() - c.claimed_at)::float8;
                RETURN;
            END IF;
            -- Written and deleted meanwhile by its owner.
            PERFORM pg_advisory_unlock(21328, sp_claim_lock_key(c.id));
        ELSIF c.claimed_at < clock_timestamp() - make_interval(secs => fallback_seconds) THEN
            UPDATE scoring_claims s
               SET claimed_at = clock_timestamp(), takeovers = s.takeovers + 1
             WHERE s.id = c.id;
            IF FOUND THEN
                RETURN QUERY SELECT c.id, c.reading_ids, c.worker,
                    extract(epoch FROM clock_timestamp() - c.claimed_at)::float8;
                RETURN;
            END IF;
        END IF;
    END LOOP;
END
$$;

-- Readings not scored yet: in a claim not written yet, in the open interval beyond its
-- position, or committed by a transaction that no interval has reached yet (not visible in the
-- cursor's latest snapshot). Adopted rows (txid '0') the old predictor scored do not count.
-- Every part is an index range or one probe per transaction that was running: like a claim, it
-- costs what is waiting, never what a long transaction has kept behind it.
CREATE FUNCTION sp_backlog() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    cur record;
    base pg_snapshot;
    from_txid xid8;
    from_id bigint;
    total bigint;
    part bigint;
BEGIN
    SELECT c.snap, c.target, c.txid, c.reading_id INTO cur FROM scoring_cursor c;
    SELECT COALESCE(sum(cardinality(s.reading_ids)), 0) INTO total FROM scoring_claims s;
    base := COALESCE(cur.target, cur.snap);
    IF base IS NULL THEN  -- nothing handed out yet
        SELECT count(*) INTO part FROM readings r
         WHERE r.txid <> '0' OR NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id);
        RETURN total + part;
    END IF;
    IF cur.target IS NOT NULL THEN
        IF cur.snap IS NOT NULL THEN
            SELECT count(*) INTO part FROM readings r
             WHERE r.txid = ANY (ARRAY(SELECT x FROM pg_snapshot_xip(cur.snap) AS x
                                        WHERE pg_visible_in_snapshot(x, cur.target)))
               AND (r.txid, r.id) > (cur.txid, cur.reading_id);
            total := total + part;
        END IF;
        IF cur.snap IS NULL OR cur.txid >= pg_snapshot_xmax(cur.snap) THEN
            from_txid := cur.txid;
            from_id := cur.reading_id;
        ELSE
            from_txid := pg_snapshot_xmax(cur.snap);
            from_id := -9223372036854775808;
        END IF;
        SELECT count(*) INTO part FROM readings r
         WHERE (r.txid, r.id) > (from_txid, from_id)
           AND r.txid < pg_snapshot_xmax(cur.target)
           AND pg_visible_in_snapshot(r.txid, cur.target)
           AND (r.txid <> '0'
                OR NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id));
        total := total + part;
    END IF;
    SELECT count(*) INTO part FROM readings r
     WHERE r.txid >= pg_snapshot_xmax(base)
        OR r.txid = ANY (ARRAY(SELECT pg_snapshot_xip(base)));
    RETURN total + part;
END
$$;

-- Privileges of the least-privileged worker role (0002): the new functions, and the new column
-- of scoring_claims it updates when it takes a claim over.
REVOKE EXECUTE ON FUNCTION sp_claim(text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_take_orphan(text, double precision) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_claim_read(text, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sp_claim(text, integer) TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_take_orphan(text, double precision) TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_claim_read(text, integer, text) TO sensor_predictor_worker;
-- sp_claim and sp_backlog look up predictions by reading_id only: 0002's column grant covers it.
GRANT UPDATE (worker, pid, claimed_at, takeovers) ON scoring_claims TO sensor_predictor_worker;
