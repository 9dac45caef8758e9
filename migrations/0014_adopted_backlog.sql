-- An adopted backlog drains as fast as a fresh one (issue 22).
--
-- On a database adopted from the old system, the rows from before the txid column read as txid
-- '0' and the first interval hands them out in id order, passing over those the old predictor
-- scored. Until this migration, each claim walked them in (txid, id) order, looked at up to 4
-- batches of rows and probed predictions for each (0008's sp_claim_next): on 1M readings, 45 %
-- scored, a claim of 1,000 probed 4,000 rows (of which about 2,200 were walked again by the next
-- claim), under the cursor's row lock, so the lanes queued behind it; and sp_backlog() probed
-- every adopted row at every call (about 300 ms on 200,000 readings while draining).
--
-- Now a one-time pass lists the adopted rows that still wait, once, in scoring_adopted:
--   - sp_adopt_step(chunk) lists the next `chunk` ids of adopted rows (txid '0') that have no
--     prediction, and records how far it got (scoring_adoption.upto), in one transaction. The
--     migration runner calls it after the migrations until it says done (migrate.py), each
--     call its own transaction: online (it reads readings and predictions, and locks nothing a
--     writer takes), in batches, and resumed where it stopped after a crash (the next migrate,
--     which every worker runs at start, goes on from `upto`);
--   - until the list is complete, claims walk as in 0008 (the list is not trusted half-built);
--     once it is, the first interval hands out the adopted rows from the list: batch_size ids
--     per claim, each checked again (still there, still txid '0', still without a prediction);
--   - sp_backlog() counts the adopted rows left as the list's ids beyond the cursor.
-- `top` is the highest adopted id when this migration ran: txid '0' rows cannot be written any
-- more (the column's default, and 0008's triggers), so the set is closed. Rows the first interval
-- had handed out already, and databases that never had adopted rows, need no list (top = upto).
-- Once the cursor passes top the list is read no more; it may be emptied (TRUNCATE
-- scoring_adopted) then, and costs about 30 bytes per waiting row until then.
-- The sweep after a re-anchor (0008) is not changed: it walks every reading below the anchor,
-- scored or not, and its state (anchor_id) turns this list off.

CREATE TABLE IF NOT EXISTS scoring_adopted (
    id bigint PRIMARY KEY  -- a reading id (txid '0', no prediction when listed)
);
CREATE TABLE IF NOT EXISTS scoring_adoption (
    top bigint NOT NULL,   -- the adopted rows to list are those with id <= top
    upto bigint NOT NULL   -- listed up to this id; the list is complete when upto >= top
);
-- One row: the first interval's position decides where the list starts (an adopted database
-- whose first interval is already under way lists only what is left of it).
INSERT INTO scoring_adoption (top, upto)
SELECT t.top, CASE WHEN c.snap IS NULL AND c.txid = '0' AND c.anchor_id IS NULL
                   THEN LEAST(c.reading_id, t.top) ELSE t.top END
  FROM (SELECT COALESCE((SELECT max(r.id) FROM readings r WHERE r.txid = '0'), 0) AS top) t
  LEFT JOIN scoring_cursor c ON true
 WHERE NOT EXISTS (SELECT 1 FROM scoring_adoption);

-- One step of the pass: the next `chunk` ids' adopted rows without a prediction are listed;
-- true once the list is complete. Concurrent callers take turns (the state row's lock).
CREATE OR REPLACE FUNCTION sp_adopt_step(chunk integer) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    st record;
    upto_next bigint;
BEGIN
    SELECT a.top, a.upto INTO st FROM scoring_adoption a FOR UPDATE;
    IF st.upto >= st.top THEN
        RETURN true;
    END IF;
    upto_next := LEAST(st.upto + chunk, st.top);
    INSERT INTO scoring_adopted (id)
    SELECT r.id FROM readings r
     WHERE r.txid = '0' AND r.id > st.upto AND r.id <= upto_next
       AND NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
    ON CONFLICT (id) DO NOTHING;
    UPDATE scoring_adoption SET upto = upto_next;
    RETURN upto_next >= st.top;
END
$$;

-- 0008's sp_claim_next, with the adopted rows handed out from scoring_adopted (marked 0014).
CREATE OR REPLACE FUNCTION sp_claim_next(worker_name text, batch_size integer,
                                         lease_seconds double precision, release_claim bigint,
                                         take_lock boolean)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], "full" boolean, reanchored text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
-- 0009's planner settings (a CREATE OR REPLACE replaces the function's SET clauses).
SET jit = off SET max_parallel_workers_per_gather = 0 AS $$
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
    moved text;
    top bigint;
    adopt_top bigint;  -- 0014: the adopted rows up to here are handed out from scoring_adopted
    adopt_upto bigint;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF release_claim IS NOT NULL THEN
        PERFORM pg_advisory_unlock(21328, sp_claim_lock_key(release_claim));
    END IF;
    SELECT c.snap, c.target, c.txid, c.reading_id, c.system_identifier, c.anchor_id,
           c.anchor_snap, c.sweep_id
      INTO cur FROM scoring_cursor c FOR UPDATE;
    -- A claim in flight, until this transaction ends: sp_orphans does not move its mark past
    -- the claim sequence while this is held (key -1: never a claim's key).
    PERFORM pg_advisory_xact_lock_shared(21328, -1);
    -- sp_cursor_moved, inline (one statement less per claim).
    SELECT x.system_identifier INTO top FROM pg_control_system() x;
    IF cur.system_identifier IS NULL THEN  -- a cursor from before 0008 on an unknown cluster
        UPDATE scoring_cursor SET system_identifier = top;
    ELSIF cur.system_identifier <> top THEN
        moved := 'system_identifier';
    END IF;
    hi := pg_snapshot_xmax(pg_current_snapshot());
    IF moved IS NULL AND (hi < pg_snapshot_xmax(cur.snap) OR hi < pg_snapshot_xmax(cur.target))
    THEN
        moved := 'counter_behind';
    END IF;
    IF moved IS NOT NULL THEN
        PERFORM sp_reanchor(moved);
        SELECT c.snap, c.target, c.txid, c.reading_id, c.system_identifier, c.anchor_id,
               c.anchor_snap, c.sweep_id
          INTO cur FROM scoring_cursor c;
    END IF;

    -- The sweep after a re-anchor: readings up to anchor_id with neither a prediction nor an
    -- error, among those visible at the re-anchor (by their txid) or whose txid is beyond the
    -- server's counter (restored from a cluster whose counter was ahead: the snapshot protocol
    -- would reach them only once the counter passes them, and then skips them, see todo).
    -- The others (written by transactions running at the re-anchor) are the protocol's.
    -- batch_size rows are looked at per call, whatever they hold.
    IF cur.sweep_id IS NOT NULL THEN
        SELECT count(*), max(w.id),
               array_agg(w.id ORDER BY w.id) FILTER (
                   WHERE (pg_visible_in_snapshot(w.txid, cur.anchor_snap)
                          OR w.txid >= pg_snapshot_xmax(pg_current_snapshot()))
                     AND NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = w.id)
                     AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = w.id))
          INTO n, top, ids
          FROM (SELECT r.id, r.txid FROM readings r
                 WHERE r.id > cur.sweep_id AND r.id <= cur.anchor_id
                 ORDER BY r.id LIMIT batch_size) w;
        IF n > 0 THEN
            UPDATE scoring_cursor SET sweep_id = top;
            IF ids IS NULL THEN
                RETURN QUERY SELECT NULL::bigint, '{}'::bigint[], true, moved;
                RETURN;
            END IF;
            INSERT INTO scoring_claims AS s (reading_ids, worker, pid, lease_until)
            VALUES (ids, worker_name, pg_backend_pid(),
                    clock_timestamp() + make_interval(secs => lease_seconds))
            RETURNING s.id INTO new_id;
            IF take_lock AND lease_seconds IS NULL THEN
                PERFORM pg_advisory_lock(21328, sp_claim_lock_key(new_id));
            END IF;
            RETURN QUERY SELECT new_id, ids, true, moved;
            RETURN;
        END IF;
        UPDATE scoring_cursor SET sweep_id = NULL;  -- swept: the protocol resumes
        RAISE LOG 'sensor-predictor: sweep after the re-anchor done (up to id %)', cur.anchor_id;
    END IF;

    FOR attempt IN 1..2 LOOP
        opened := cur.target IS NULL;
        IF opened THEN
            -- Taken after the cursor lock, so it is never older than the cursor's snap.
            cur.target := pg_current_snapshot();
            IF cur.snap IS NOT NULL AND cur.target::text = cur.snap::text THEN
                EXIT;  -- no transaction has ended since: nothing can be new
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
        -- 0014: an adopted backlog, once scoring_adopted is built, is handed out from there:
        -- the unscored adopted rows in id order, batch_size looked at per claim, each checked
        -- again (still there, still txid '0', still without a prediction: two index probes).
        -- The rows the old predictor scored are never walked. Past adopt_top, the walk below
        -- goes on as in 0008 (txid '0' rows written since the build: only a test makes them).
        IF cur.snap IS NULL AND cur.txid = '0' AND cur.anchor_id IS NULL THEN
            SELECT a.top, a.upto INTO adopt_top, adopt_upto FROM scoring_adoption a;
            IF adopt_upto >= adopt_top AND cur.reading_id < adopt_top THEN
                SELECT count(*), max(w.id), array_agg(w.id ORDER BY w.id) FILTER (WHERE w.todo)
                  INTO n, last_id, ids
                  FROM (SELECT l.id, r.id IS NOT NULL AND o.id IS NULL AS todo
                          FROM (SELECT a.id FROM scoring_adopted a
                                 WHERE a.id > cur.reading_id AND a.id <= adopt_top
                                 ORDER BY a.id
                                 LIMIT batch_size) l
                          -- probes per row (LIMIT 1: never planned as a hash of every row)
                          LEFT JOIN LATERAL (SELECT r.id FROM readings r
                                              WHERE r.id = l.id AND r.txid = '0' LIMIT 1) r
                                 ON true
                          LEFT JOIN LATERAL (SELECT o.reading_id AS id FROM predictions o
                                              WHERE o.reading_id = l.id LIMIT 1) o ON true) w;
                IF n > 0 THEN
                    UPDATE scoring_cursor SET target = cur.target, reading_id = last_id;
                    IF ids IS NULL THEN
                        RETURN QUERY SELECT NULL::bigint, '{}'::bigint[], true, moved;
                        RETURN;
                    END IF;
                    INSERT INTO scoring_claims AS s (reading_ids, worker, pid, lease_until)
                    VALUES (ids, worker_name, pg_backend_pid(),
                            clock_timestamp() + make_interval(secs => lease_seconds))
                    RETURNING s.id INTO new_id;
                    IF take_lock AND lease_seconds IS NULL THEN
                        PERFORM pg_advisory_lock(21328, sp_claim_lock_key(new_id));
                    END IF;
                    RETURN QUERY SELECT new_id, ids, true, moved;
                    RETURN;
                END IF;
                cur.reading_id := adopt_top;  -- every adopted row is handed out: walk on
                from_id := adopt_top;
            END IF;
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
                                   SELECT 1 FROM predictions o WHERE o.reading_id = u.id))
                               -- at or below the anchor: only what nobody has handled (the
                               -- sweep may hold it, or have written it)
                               AND (cur.anchor_id IS NULL OR u.id > cur.anchor_id OR (
                                   NOT EXISTS (SELECT 1 FROM predictions o
                                                WHERE o.reading_id = u.id)
                                   AND NOT EXISTS (SELECT 1 FROM reading_errors e
                                                    WHERE e.reading_id = u.id)
                                   AND NOT EXISTS (SELECT 1 FROM scoring_claims c
                                                    WHERE c.reading_ids @> ARRAY[u.id::bigint])))
                                   AS todo
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
                RETURN QUERY SELECT NULL::bigint, '{}'::bigint[], more, moved;
                RETURN;
            END IF;
            INSERT INTO scoring_claims AS s (reading_ids, worker, pid, lease_until)
            VALUES (ids, worker_name, pg_backend_pid(),
                    clock_timestamp() + make_interval(secs => lease_seconds))
            RETURNING s.id INTO new_id;
            -- Held before the claim can be seen by anyone (it is seen once this commits).
            IF take_lock AND lease_seconds IS NULL THEN
                PERFORM pg_advisory_lock(21328, sp_claim_lock_key(new_id));
            END IF;
            RETURN QUERY SELECT new_id, ids, more, moved;
            RETURN;
        END IF;
        -- An interval that was already open and turned out empty: open a fresh one at once.
        EXIT WHEN opened;
    END LOOP;
    IF moved IS NOT NULL THEN  -- the caller must hear of it
        RETURN QUERY SELECT NULL::bigint, '{}'::bigint[], false, moved;
    END IF;
END
$$;

-- 0008's sp_backlog, with the adopted rows counted in scoring_adopted (marked 0014).
CREATE OR REPLACE FUNCTION sp_backlog() RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, public, pg_temp
-- 0014: every count here is meant as an index range. PostgreSQL has no estimate for a range
-- of xid8 (it assumes a third of the table), so a count of the few readings beyond the
-- snapshot was planned as a scan of all of them, every 5 s.
SET enable_seqscan = off AS $$
DECLARE
    cur record;
    base pg_snapshot;
    from_txid xid8;
    from_id bigint;
    total bigint;
    part bigint;
    -- Readings beyond the server's counter (restored from one that was ahead) are swept.
    now_xmax xid8 := pg_snapshot_xmax(pg_current_snapshot());
    adopt_top bigint;  -- 0014: adopted rows up to here are counted in scoring_adopted
    adopt_upto bigint;
    adopt_left bigint := 0;
BEGIN
    IF sp_cursor_moved() IS NOT NULL THEN  -- the next claim re-anchors: all of these wait
        SELECT count(*) INTO part FROM readings r
         WHERE NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
           AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id);
        RETURN part;
    END IF;
    SELECT c.snap, c.target, c.txid, c.reading_id, c.anchor_id, c.anchor_snap, c.sweep_id
      INTO cur FROM scoring_cursor c;
    SELECT COALESCE(sum(cardinality(s.reading_ids)), 0) INTO total FROM scoring_claims s;
    -- 0014: while the first interval hands out adopted rows from scoring_adopted, those left
    -- are the ones there beyond the cursor (an index-only count, no probe per row); the walks
    -- below start after adopt_top.
    IF cur.snap IS NULL AND cur.txid = '0' AND cur.anchor_id IS NULL THEN
        SELECT a.top, a.upto INTO adopt_top, adopt_upto FROM scoring_adoption a;
        IF adopt_upto >= adopt_top AND cur.reading_id < adopt_top THEN
            SELECT count(*) INTO adopt_left FROM scoring_adopted a
             WHERE a.id > cur.reading_id AND a.id <= adopt_top;
        ELSE
            adopt_top := NULL;
        END IF;
    END IF;
    IF cur.sweep_id IS NOT NULL THEN
        SELECT count(*) INTO part FROM readings r
         WHERE r.id > cur.sweep_id AND r.id <= cur.anchor_id
           AND (pg_visible_in_snapshot(r.txid, cur.anchor_snap) OR r.txid >= now_xmax)
           AND NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
           AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id);
        total := total + part;
    END IF;
    base := COALESCE(cur.target, cur.snap);
    IF base IS NULL THEN  -- nothing handed out yet
        SELECT count(*) INTO part FROM readings r
         WHERE (r.txid, r.id) > ('0'::xid8, COALESCE(adopt_top, -1))  -- 0014: past adopt_top
           AND (r.txid <> '0'
                OR NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id));
        RETURN total + adopt_left + part;
    END IF;
    IF cur.target IS NOT NULL THEN
        IF cur.snap IS NOT NULL THEN
            SELECT count(*) INTO part FROM readings r
             WHERE r.txid = ANY (ARRAY(SELECT x FROM pg_snapshot_xip(cur.snap) AS x
                                        WHERE pg_visible_in_snapshot(x, cur.target)))
               AND (r.txid, r.id) > (cur.txid, cur.reading_id)
               AND (cur.anchor_id IS NULL OR r.id > cur.anchor_id OR (
                    NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
                    AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id)
                    AND NOT EXISTS (SELECT 1 FROM scoring_claims c
                                     WHERE c.reading_ids @> ARRAY[r.id::bigint])
                    AND NOT (cur.sweep_id IS NOT NULL AND r.id > cur.sweep_id
                             AND (pg_visible_in_snapshot(r.txid, cur.anchor_snap)
                                  OR r.txid >= now_xmax))));
            total := total + part;
        END IF;
        IF cur.snap IS NULL OR cur.txid >= pg_snapshot_xmax(cur.snap) THEN
            from_txid := cur.txid;
            from_id := GREATEST(cur.reading_id, adopt_top);  -- 0014: past adopt_top
        ELSE
            from_txid := pg_snapshot_xmax(cur.snap);
            from_id := -9223372036854775808;
        END IF;
        SELECT count(*) INTO part FROM readings r
         WHERE (r.txid, r.id) > (from_txid, from_id)
           AND r.txid < pg_snapshot_xmax(cur.target)
           AND pg_visible_in_snapshot(r.txid, cur.target)
           AND (r.txid <> '0'
                OR NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id))
           AND (cur.anchor_id IS NULL OR r.id > cur.anchor_id OR (
                NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
                AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id)
                AND NOT EXISTS (SELECT 1 FROM scoring_claims c
                                 WHERE c.reading_ids @> ARRAY[r.id::bigint])
                AND NOT (cur.sweep_id IS NOT NULL AND r.id > cur.sweep_id
                         AND (pg_visible_in_snapshot(r.txid, cur.anchor_snap)
                              OR r.txid >= now_xmax))));
        total := total + part;
    END IF;
    -- 0014: the readings beyond base as two index ranges (UNION ALL); an OR of the two
    -- conditions was planned as a scan of the whole index, at every call (about 270 ms on 1M
    -- readings, every 5 s from the worker's gauge, however small the backlog).
    SELECT count(*) INTO part
      FROM (SELECT r.id, r.txid FROM readings r WHERE r.txid >= pg_snapshot_xmax(base)
            UNION ALL
            SELECT r.id, r.txid FROM readings r
             WHERE r.txid = ANY (ARRAY(SELECT pg_snapshot_xip(base)))
               AND r.txid < pg_snapshot_xmax(base)) r
     WHERE (cur.anchor_id IS NULL OR r.id > cur.anchor_id OR (
            NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
            AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id)
            AND NOT EXISTS (SELECT 1 FROM scoring_claims c
                             WHERE c.reading_ids @> ARRAY[r.id::bigint])
            AND NOT (cur.sweep_id IS NOT NULL AND r.id > cur.sweep_id
                     AND (pg_visible_in_snapshot(r.txid, cur.anchor_snap)
                          OR r.txid >= now_xmax))));
    RETURN total + adopt_left + part;
END
$$;

-- The claim and the count read the list and its state (functions run as their caller).
GRANT SELECT ON scoring_adopted, scoring_adoption TO sensor_predictor_worker;
REVOKE EXECUTE ON FUNCTION sp_adopt_step(integer) FROM PUBLIC;
