-- Claims that work through any pooler, a moved database detected, feature names as data.
-- (docs/claims.md tells the whole protocol; 0003 has the snapshot intervals.)
--
-- 1. Two ways to own a claim, chosen per claim by whoever holds it:
--    - a session advisory lock (class 21328, key sp_claim_lock_key(id)), as in 0003: for a
--      session that is the worker's own (a direct connection, a session-mode pooler). When the
--      session ends the lock goes, and the claim is taken over at once;
--    - a lease (lease_until) that the owner renews while it scores: for a transaction-mode
--      pooler, where no session state survives a transaction. Taken over once it has expired.
--    No statement releases a lock it did not take: a claim function releases exactly the one
--    lock its caller names (the claim it finished last on this session); nothing calls
--    pg_advisory_unlock_all() any more. A takeover counts in `takeovers`, which is also the
--    owner's token: the result statement deletes the claim only with the token it was handed,
--    so a late owner (frozen past its lease, or half-open past the fallback) writes nothing.
-- 2. Orphans are looked for by a timer (sp_orphans) over the claims the caller has not seen yet
--    (id above its mark) and those it saw alive (by id): index probes, never a scan over the
--    dead rows a long transaction keeps in scoring_claims. A full look now and then is the
--    caller's safety net.
-- 3. A moved database: the cursor keeps the cluster's system identifier. When it differs, or
--    the server's transaction counter is behind the cursor's snapshot (a pg_dump restored into
--    a cluster whose counter is lower), the next claim re-anchors: claims are dropped, the
--    readings then visible that have neither a prediction nor an error are handed out by an
--    anti-join sweep in id order, in batches, and the snapshot protocol resumes from the
--    snapshot taken at the re-anchor. A writer cannot set txid any more (a BEFORE INSERT
--    trigger puts its own transaction there), nor change it (a BEFORE UPDATE OF txid trigger
--    puts the old one back).
-- 4. The read query takes the feature names as a text[] parameter ($2): no name is ever
--    part of SQL text.

ALTER TABLE scoring_claims ADD COLUMN IF NOT EXISTS lease_until timestamptz;
ALTER TABLE scoring_cursor ADD COLUMN IF NOT EXISTS system_identifier bigint,
                           ADD COLUMN IF NOT EXISTS anchor_id bigint,
                           ADD COLUMN IF NOT EXISTS anchor_snap pg_snapshot,
                           ADD COLUMN IF NOT EXISTS sweep_id bigint,
                           ADD COLUMN IF NOT EXISTS reanchors integer NOT NULL DEFAULT 0;
-- The cluster this cursor's snapshots belong to: the one migrating it.
UPDATE scoring_cursor
   SET system_identifier = (SELECT s.system_identifier FROM pg_control_system() s)
 WHERE system_identifier IS NULL;

-- Why the cursor cannot be trusted on this server, or NULL: another cluster's identifier, or
-- a transaction counter behind the cursor's snapshots.
CREATE OR REPLACE FUNCTION sp_cursor_moved() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    cur record;
    sysid bigint;
    now_xmax xid8;
BEGIN
    SELECT c.snap, c.target, c.system_identifier INTO cur FROM scoring_cursor c;
    SELECT s.system_identifier INTO sysid FROM pg_control_system() s;
    IF cur.system_identifier IS NOT NULL AND cur.system_identifier <> sysid THEN
        RETURN 'system_identifier';
    END IF;
    now_xmax := pg_snapshot_xmax(pg_current_snapshot());
    IF now_xmax < pg_snapshot_xmax(cur.snap) OR now_xmax < pg_snapshot_xmax(cur.target) THEN
        RETURN 'counter_behind';
    END IF;
    RETURN NULL;
END
$$;

-- The re-anchor itself, under the cursor's row lock (the caller holds it or takes it here).
-- Claims are dropped (their owners' results, if any come, are discarded as late); the readings
-- visible now go to the sweep, the rest to the snapshot protocol from here.
CREATE OR REPLACE FUNCTION sp_reanchor(reason text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    s pg_snapshot;
    top bigint;
BEGIN
    PERFORM 1 FROM scoring_cursor FOR UPDATE;
    DELETE FROM scoring_claims;
    -- One statement: the snapshot and the readings it sees.
    SELECT pg_current_snapshot(), COALESCE((SELECT max(r.id) FROM readings r), 0) INTO s, top;
    UPDATE scoring_cursor
       SET snap = s, target = NULL, txid = '0', reading_id = 0, anchor_id = top,
           anchor_snap = s, sweep_id = 0, reanchors = reanchors + 1,
           system_identifier = (SELECT x.system_identifier FROM pg_control_system() x);
    RAISE LOG 'sensor-predictor: scoring cursor re-anchored (%): readings up to id % are swept',
              reason, top;
    RETURN top;
END
$$;

-- The claim itself (0003's sp_claim, with the sweep and the two ownerships). lease_seconds
-- NULL: owned by this session's advisory lock (taken here when take_lock); else a lease of
-- that many seconds. release_claim: the claim whose lock this session holds and has finished
-- with (written or found taken), released here to save a round trip; NULL: none.
-- `reanchored` is the reason of a re-anchor done by this call (NULL: none); such a call always
-- returns a row.
CREATE OR REPLACE FUNCTION sp_claim_next(worker_name text, batch_size integer,
                                         lease_seconds double precision, release_claim bigint,
                                         take_lock boolean)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], "full" boolean, reanchored text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
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

CREATE OR REPLACE FUNCTION sp_claim(worker_name text, batch_size integer,
                                    lease_seconds double precision, release_claim bigint)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], "full" boolean, reanchored text)
LANGUAGE sql SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT s.claim_id, s.reading_ids, s."full", s.reanchored
      FROM sp_claim_next(worker_name, batch_size, lease_seconds, release_claim, true) s
$$;

-- sp_claim and the read of its readings in one round trip. read_sql is the worker's read query
-- for its model: `$1` the claim's reading ids, `$2` the feature names (never in the text).
-- A value that cannot be cast fails the statement, and with it the claim (nothing is handed
-- out, no lock is taken: the lock comes after the read): the worker then claims with sp_claim
-- and reads the JSON.
CREATE OR REPLACE FUNCTION sp_claim_read(worker_name text, batch_size integer, read_sql text,
                                         feature_names text[], lease_seconds double precision,
                                         release_claim bigint)
RETURNS TABLE (claim_id bigint, "full" boolean, id bigint, features double precision[],
               age_seconds double precision, reanchored text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    c record;
BEGIN
    SELECT s.claim_id, s.reading_ids, s."full", s.reanchored INTO c
      FROM sp_claim_next(worker_name, batch_size, lease_seconds, release_claim, false) s;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF c.claim_id IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, c."full", NULL::bigint, NULL::float8[], NULL::float8,
                            c.reanchored;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT $3::bigint, $4, q.id::bigint, q.features::float8[], q.age_seconds::float8, $5'
            ' FROM (' || read_sql || ') q'
        USING c.reading_ids, feature_names, c.claim_id, c."full", c.reanchored;
    IF lease_seconds IS NULL THEN
        PERFORM pg_advisory_lock(21328, sp_claim_lock_key(c.claim_id));
    END IF;
END
$$;

-- Claims that may be taken over now, among those the caller names (candidates; NULL: all).
-- Lease-owned: its lease has expired. Session-owned: its owner's lock is free (the session
-- ended), or it is older than fallback_seconds (a half-open session the server has not
-- noticed: scored a second time, written once). Taken over into the caller's ownership: a
-- lease when lease_seconds is given (a transaction-level lock tests a session owner, no
-- session lock is taken), else this session's lock (`locked`). `token` is the new takeovers
-- count, which the result statement must quote.
CREATE OR REPLACE FUNCTION sp_take_orphan(worker_name text, fallback_seconds double precision,
                                          lease_seconds double precision, release_claim bigint,
                                          candidates bigint[])
RETURNS TABLE (claim_id bigint, reading_ids bigint[], previous_worker text,
               age_seconds double precision, token integer, locked boolean)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    c record;
    k integer;
    free boolean;
    tok integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    IF release_claim IS NOT NULL THEN
        PERFORM pg_advisory_unlock(21328, sp_claim_lock_key(release_claim));
    END IF;
    FOR c IN SELECT s.id, s.reading_ids, s.worker, s.claimed_at, s.lease_until, s.takeovers
               FROM scoring_claims s WHERE candidates IS NULL
             UNION ALL  -- by index probes: what a long transaction keeps is never scanned
             SELECT s.id, s.reading_ids, s.worker, s.claimed_at, s.lease_until, s.takeovers
               FROM scoring_claims s WHERE s.id = ANY (candidates)
              ORDER BY 1 LOOP
        k := sp_claim_lock_key(c.id);
        IF c.lease_until IS NOT NULL THEN
            CONTINUE WHEN c.lease_until >= clock_timestamp();
            free := lease_seconds IS NOT NULL OR pg_try_advisory_lock(21328, k);
            CONTINUE WHEN NOT free;
        ELSIF lease_seconds IS NULL AND pg_try_advisory_lock(21328, k) THEN
            free := true;
        ELSIF lease_seconds IS NOT NULL AND pg_try_advisory_xact_lock(21328, k) THEN
            free := true;
        ELSIF c.claimed_at < clock_timestamp() - make_interval(secs => fallback_seconds) THEN
            free := false;  -- its owner's lock stays where it is
        ELSE
            CONTINUE;
        END IF;
        UPDATE scoring_claims s
           SET worker = worker_name, pid = pg_backend_pid(), claimed_at = clock_timestamp(),
               takeovers = s.takeovers + 1,
               lease_until = clock_timestamp() + make_interval(secs => lease_seconds)
         -- unchanged since it was looked at: not taken by another, not renewed by its owner
         WHERE s.id = c.id AND s.takeovers = c.takeovers
           AND s.lease_until IS NOT DISTINCT FROM c.lease_until
        RETURNING s.takeovers INTO tok;
        IF FOUND THEN
            RETURN QUERY SELECT c.id, c.reading_ids, c.worker,
                extract(epoch FROM clock_timestamp() - c.claimed_at)::float8, tok,
                free AND lease_seconds IS NULL;
            RETURN;
        END IF;
        -- Written, or taken by someone else, meanwhile.
        IF free AND lease_seconds IS NULL THEN
            PERFORM pg_advisory_unlock(21328, k);
        END IF;
    END LOOP;
END
$$;

-- The orphan timer's look: the claims with id above after_id and those in known (the ones it
-- saw alive last time), each with whether it may be taken over now (sp_take_orphan's rules,
-- tested without taking anything: a transaction-level lock, gone when this returns), and one
-- row with id NULL, last, whose `mark` is the caller's next after_id. Index probes only: what
-- a long transaction keeps of the claims written since never costs a scan.
-- The mark never passes a claim still in flight. Claims are created under the cursor's row
-- lock and commit with it, so they commit in id order and only the lock holder's can be
-- uncommitted, all above every committed one. Their transaction holds (21328, -1) shared
-- from before its first id. When this look gets that lock (and lets it go at once) no claim
-- is in flight: every id the sequence has handed out is committed or gone, and the sequence's
-- position is the mark. When a claim is in flight, the mark is the highest claim id found (or
-- after_id): the one in flight is above it, and the next look sees it once it commits.
-- (The cursor's row is not touched: under a long transaction it carries a dead version per
-- claim, and locking it cost 7-12 ms per look in bench/claims_orphans.py.)
CREATE OR REPLACE FUNCTION sp_orphans(after_id bigint, known bigint[],
                                      fallback_seconds double precision)
RETURNS TABLE (id bigint, orphan boolean, mark bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
-- A custom plan would look up the index's actual end while planning, over the dead entries
-- a long transaction keeps there: one generic plan per session instead.
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    top bigint := 9223372036854775807;
    settled boolean;
BEGIN
    settled := pg_try_advisory_lock(21328, -1);
    IF settled THEN
        top := COALESCE(pg_sequence_last_value('scoring_claims_id_seq'), 0);
        PERFORM pg_advisory_unlock(21328, -1);  -- the one lock taken here
    END IF;
    RETURN QUERY
    WITH f AS (
        SELECT s.id,
               CASE WHEN s.lease_until IS NOT NULL THEN s.lease_until < clock_timestamp()
                    ELSE s.claimed_at < clock_timestamp() - make_interval(secs => fallback_seconds)
                         OR pg_try_advisory_xact_lock(21328, sp_claim_lock_key(s.id)) END
                   AS orphan
          FROM scoring_claims s
         WHERE s.id > after_id AND s.id <= top  -- a range: planned as an index range scan
        UNION ALL  -- two index conditions (an OR of them scans the whole index)
        SELECT s.id,
               CASE WHEN s.lease_until IS NOT NULL THEN s.lease_until < clock_timestamp()
                    ELSE s.claimed_at < clock_timestamp() - make_interval(secs => fallback_seconds)
                         OR pg_try_advisory_xact_lock(21328, sp_claim_lock_key(s.id)) END
          FROM scoring_claims s
         WHERE s.id = ANY (known) AND s.id <= after_id)
    SELECT f.id, f.orphan, NULL::bigint FROM f
    UNION ALL
    SELECT NULL::bigint, NULL::boolean,
           CASE WHEN settled THEN top
                ELSE GREATEST(after_id, (SELECT max(g.id) FROM f g WHERE g.id > after_id)) END;
END
$$;

-- Readings not scored yet (0003's count, plus the sweep after a re-anchor, and everything
-- without a result while a move has not been handled yet).
CREATE OR REPLACE FUNCTION sp_backlog() RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    cur record;
    base pg_snapshot;
    from_txid xid8;
    from_id bigint;
    total bigint;
    part bigint;
    -- Readings beyond the server's counter (restored from one that was ahead) are swept.
    now_xmax xid8 := pg_snapshot_xmax(pg_current_snapshot());
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
         WHERE r.txid <> '0' OR NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id);
        RETURN total + part;
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
    SELECT count(*) INTO part FROM readings r
     WHERE (r.txid >= pg_snapshot_xmax(base)
            OR r.txid = ANY (ARRAY(SELECT pg_snapshot_xip(base))))
       AND (cur.anchor_id IS NULL OR r.id > cur.anchor_id OR (
            NOT EXISTS (SELECT 1 FROM predictions o WHERE o.reading_id = r.id)
            AND NOT EXISTS (SELECT 1 FROM reading_errors e WHERE e.reading_id = r.id)
            AND NOT EXISTS (SELECT 1 FROM scoring_claims c
                             WHERE c.reading_ids @> ARRAY[r.id::bigint])
            AND NOT (cur.sweep_id IS NOT NULL AND r.id > cur.sweep_id
                     AND (pg_visible_in_snapshot(r.txid, cur.anchor_snap)
                          OR r.txid >= now_xmax))));
    RETURN total + part;
END
$$;

-- 0003's signatures, for a worker of the previous version during a rolling upgrade: session
-- locks, names in the read query's text. Only that worker calls them, on a session of its own,
-- and it never releases a claim's lock itself: each first releases its session's claim locks
-- (class 21328: the previous claim's, written by now), or an old worker would pile up one lock
-- per batch and keep every claim it ever had from the orphan look. 0003 released every lock of
-- the session; only the claim class is released here (a lock of the application's stays).
-- The current signatures never do this.
CREATE OR REPLACE FUNCTION sp_claim(worker_name text, batch_size integer)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], "full" boolean)
LANGUAGE sql SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT count(pg_advisory_unlock(21328, (l.objid::bigint - CASE WHEN l.objid::bigint
                                      > 2147483647 THEN 4294967296 ELSE 0 END)::integer))
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.classid = 21328
       AND l.objsubid = 2 AND l.mode = 'ExclusiveLock' AND l.granted;
    SELECT s.claim_id, s.reading_ids, s."full"
      FROM sp_claim_next(worker_name, batch_size, NULL, NULL, true) s
     WHERE s.claim_id IS NOT NULL OR s.reanchored IS NULL OR s."full"
$$;

CREATE OR REPLACE FUNCTION sp_claim_read(worker_name text, batch_size integer, read_sql text)
RETURNS TABLE (claim_id bigint, "full" boolean, id bigint, features double precision[],
               age_seconds double precision)
LANGUAGE sql SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT count(pg_advisory_unlock(21328, (l.objid::bigint - CASE WHEN l.objid::bigint
                                      > 2147483647 THEN 4294967296 ELSE 0 END)::integer))
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.classid = 21328
       AND l.objsubid = 2 AND l.mode = 'ExclusiveLock' AND l.granted;
    SELECT s.claim_id, s."full", s.id, s.features, s.age_seconds
      FROM sp_claim_read(worker_name, batch_size, read_sql, '{}'::text[], NULL, NULL) s
     WHERE s.claim_id IS NOT NULL OR s.reanchored IS NULL OR s."full"
$$;

CREATE OR REPLACE FUNCTION sp_take_orphan(worker_name text, fallback_seconds double precision)
RETURNS TABLE (claim_id bigint, reading_ids bigint[], previous_worker text, age_seconds float8)
LANGUAGE sql SET search_path = pg_catalog, public, pg_temp AS $$
    SELECT count(pg_advisory_unlock(21328, (l.objid::bigint - CASE WHEN l.objid::bigint
                                      > 2147483647 THEN 4294967296 ELSE 0 END)::integer))
      FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.classid = 21328
       AND l.objsubid = 2 AND l.mode = 'ExclusiveLock' AND l.granted;
    SELECT s.claim_id, s.reading_ids, s.previous_worker, s.age_seconds
      FROM sp_take_orphan(worker_name, fallback_seconds, NULL, NULL, NULL) s
$$;

-- A writer cannot choose the transaction its readings are handed out with: an explicit txid
-- (an INSERT naming the column, a COPY of an export that carries it) is replaced by the
-- writer's own. The WHEN clause keeps the plain insert (the column's default) free of any
-- function call. Restored rows keep theirs (pg_dump creates triggers after the data); a
-- re-anchor handles them.
CREATE OR REPLACE FUNCTION sp_readings_own_txid() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS readings_own_txid ON readings;
CREATE TRIGGER readings_own_txid BEFORE INSERT ON readings FOR EACH ROW
    WHEN (NEW.txid IS DISTINCT FROM pg_current_xact_id())
    EXECUTE FUNCTION sp_readings_own_txid();

-- Nor move a reading it wrote: an UPDATE that changes txid (an ORM saving every column, a
-- fix-up script) would put it behind the cursor or past any snapshot, never handed out. The
-- old txid is kept, silently (an old-system writer that rewrites whole rows keeps working).
-- An UPDATE whose SET list does not name txid does not fire this trigger at all.
CREATE OR REPLACE FUNCTION sp_readings_keep_txid() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
    NEW.txid := OLD.txid;
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS readings_keep_txid ON readings;
CREATE TRIGGER readings_keep_txid BEFORE UPDATE OF txid ON readings FOR EACH ROW
    WHEN (NEW.txid IS DISTINCT FROM OLD.txid)
    EXECUTE FUNCTION sp_readings_keep_txid();

REVOKE EXECUTE ON FUNCTION sp_cursor_moved() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_reanchor(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_claim_next(text, integer, double precision, bigint, boolean)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_claim(text, integer, double precision, bigint) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_claim_read(text, integer, text, text[], double precision, bigint)
    FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_take_orphan(text, double precision, double precision, bigint,
                                          bigint[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION sp_orphans(bigint, bigint[], double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sp_cursor_moved() TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_reanchor(text) TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_claim_next(text, integer, double precision, bigint, boolean)
    TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_claim(text, integer, double precision, bigint)
    TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_claim_read(text, integer, text, text[], double precision, bigint)
    TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_take_orphan(text, double precision, double precision, bigint,
                                         bigint[]) TO sensor_predictor_worker;
GRANT EXECUTE ON FUNCTION sp_orphans(bigint, bigint[], double precision)
    TO sensor_predictor_worker;
-- A takeover moves the lease; the owner renews it (queries.sql: renew_leases).
GRANT UPDATE (lease_until) ON scoring_claims TO sensor_predictor_worker;
