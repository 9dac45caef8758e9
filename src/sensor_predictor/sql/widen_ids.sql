-- `sensor-predictor widen-ids`: the integer ids of a database adopted from the old system
-- (readings.id, predictions.id, predictions.reading_id) widened to bigint while the old consumer
-- and the worker keep writing. Run by widen_ids.py, which creates these helpers at its start and
-- drops them at its end (nothing of this stays in the schema).
--
-- Every step reads its state from the catalog, so an interrupted run is simply run again:
--   1. prepare   a bigint copy "<column>_bigint" of each integer column, kept in step by a BEFORE
--                INSERT OR UPDATE trigger, and a CHECK (copy IS NOT NULL) NOT VALID;
--   2. backfill  batches of UPDATE ... SET copy = column over id ranges (rows already copied are
--                skipped);
--   3. validate  the CHECK (a scan that blocks no writer), so that SET NOT NULL later needs none;
--   4. index     a copy of every index on those columns, built CONCURRENTLY (an invalid copy left
--                by an interrupted build is dropped and built again);
--   5. swap      one short transaction under lock_timeout: foreign keys dropped, the constraints
--                moved onto the copies' indexes, defaults, sequence ownership and column grants
--                moved, the old columns dropped, the copies renamed, the sequences made bigint,
--                the foreign keys added back NOT VALID;
--   6. validate  the foreign keys (a scan that blocks no writer).

-- The columns still to widen: (table, column) of ours that are integer.
CREATE OR REPLACE FUNCTION sp_widen_targets()
RETURNS TABLE (tbl text, col text, wide text, wide_exists boolean)
LANGUAGE sql STABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT t.tbl, t.col, t.col || '_bigint',
           EXISTS (SELECT 1 FROM pg_attribute w
                    WHERE w.attrelid = a.attrelid AND w.attname = t.col || '_bigint'
                      AND NOT w.attisdropped)
      FROM (VALUES ('readings', 'id', 1), ('predictions', 'id', 2),
                   ('predictions', 'reading_id', 3)) t (tbl, col, ord)
      JOIN pg_attribute a ON a.attrelid = to_regclass(t.tbl) AND a.attname = t.col
                         AND NOT a.attisdropped
     WHERE a.atttypid = 'integer'::regtype
     ORDER BY t.ord
$$;

-- Step 1 for one table: the copy columns, the trigger that keeps them in step, the NOT VALID
-- check. Each statement is skipped when already done. Locks: a moment of ACCESS EXCLUSIVE (the
-- caller sets lock_timeout and retries).
CREATE OR REPLACE FUNCTION sp_widen_prepare(target text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    t record;
    body text := '';
BEGIN
    FOR t IN SELECT * FROM sp_widen_targets() s WHERE s.tbl = target LOOP
        EXECUTE format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS %I bigint', t.tbl, t.wide);
        body := body || format('NEW.%I := NEW.%I; ', t.wide, t.col);
        IF NOT EXISTS (SELECT 1 FROM pg_constraint c
                        WHERE c.conrelid = to_regclass(t.tbl) AND c.conname = t.wide || '_not_null')
        THEN
            EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (%I IS NOT NULL) NOT VALID',
                           t.tbl, t.wide || '_not_null', t.wide);
        END IF;
    END LOOP;
    IF body = '' THEN
        RETURN;
    END IF;
    EXECUTE format($f$CREATE OR REPLACE FUNCTION %I() RETURNS trigger LANGUAGE plpgsql
                     SET search_path = pg_catalog, public, pg_temp
                     AS 'BEGIN %s RETURN NEW; END'$f$, 'sp_widen_copy_' || target, body);
    IF NOT EXISTS (SELECT 1 FROM pg_trigger g
                    WHERE g.tgrelid = to_regclass(target) AND g.tgname = 'sp_widen_copy') THEN
        EXECUTE format('CREATE TRIGGER sp_widen_copy BEFORE INSERT OR UPDATE ON %I'
                       ' FOR EACH ROW EXECUTE FUNCTION %I()', target, 'sp_widen_copy_' || target);
    END IF;
END
$$;

-- Step 2, one batch: the next batch_size rows from from_id on (gaps in the ids cost nothing),
-- those whose copies are not set yet updated. Returns the batch's last id and the rows copied.
CREATE OR REPLACE FUNCTION sp_widen_backfill(target text, from_id bigint, batch_size integer,
                                             OUT upto bigint, OUT copied bigint)
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    sets text;
    pending text;
BEGIN
    copied := 0;
    SELECT string_agg(format('%I = %I', s.wide, s.col), ', '),
           string_agg(format('%I IS NULL', s.wide), ' OR ')
      INTO sets, pending
      FROM sp_widen_targets() s WHERE s.tbl = target AND s.wide_exists;
    EXECUTE format('SELECT max(id) FROM (SELECT id FROM %I WHERE id >= $1 ORDER BY id LIMIT $2) b',
                   target)
      INTO upto USING from_id, batch_size;
    IF sets IS NULL OR upto IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('UPDATE %I SET %s WHERE id >= $1 AND id <= $2 AND (%s)', target, sets, pending)
      USING from_id, upto;
    GET DIAGNOSTICS copied = ROW_COUNT;
END
$$;

-- Steps 3 and 4: the statements still to run outside any transaction, in order (the CHECKs
-- validated, invalid index copies dropped, missing ones built CONCURRENTLY). An index on a
-- widened column is copied with the copy column in its place; an expression or partial index
-- is refused (nothing of ours or the old system's has one).
CREATE OR REPLACE FUNCTION sp_widen_online_steps()
RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    t record;
    i record;
    cols text[];
    k integer;
    colname text;
BEGIN
    FOR t IN SELECT c.conrelid::regclass::text AS tbl, c.conname
               FROM pg_constraint c
               JOIN sp_widen_targets() s ON c.conrelid = to_regclass(s.tbl)
                                        AND c.conname = s.wide || '_not_null'
              WHERE NOT c.convalidated LOOP
        RETURN NEXT format('ALTER TABLE %I VALIDATE CONSTRAINT %I', t.tbl, t.conname);
    END LOOP;
    FOR i IN SELECT x.indexrelid, x.indrelid, x.indisunique, x.indnatts, x.indkey,
                    x.indexprs IS NOT NULL OR x.indpred IS NOT NULL AS complex,
                    ic.relname AS name, left(ic.relname, 56) || '_bigint' AS wide_name
               FROM pg_index x
               JOIN pg_class ic ON ic.oid = x.indexrelid
              WHERE EXISTS (SELECT 1 FROM sp_widen_targets() s
                              JOIN pg_attribute a ON a.attrelid = to_regclass(s.tbl)
                                                 AND a.attname = s.col
                             WHERE s.wide_exists AND a.attrelid = x.indrelid
                               AND a.attnum = ANY (x.indkey))
              ORDER BY ic.relname LOOP
        IF i.complex THEN
            RAISE EXCEPTION 'index % is an expression or partial index: widen it by hand', i.name;
        END IF;
        IF EXISTS (SELECT 1 FROM pg_class w JOIN pg_index wx ON wx.indexrelid = w.oid
                    WHERE w.relname = i.wide_name AND w.relnamespace = 'public'::regnamespace
                      AND wx.indisvalid) THEN
            CONTINUE;
        END IF;
        IF to_regclass(i.wide_name) IS NOT NULL THEN  -- left invalid by an interrupted build
            RETURN NEXT format('DROP INDEX CONCURRENTLY %I', i.wide_name);
        END IF;
        cols := '{}';
        FOR k IN 1 .. i.indnatts LOOP
            SELECT a.attname INTO colname FROM pg_attribute a
             WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[k - 1];
            IF EXISTS (SELECT 1 FROM sp_widen_targets() s
                        WHERE to_regclass(s.tbl) = i.indrelid AND s.col = colname) THEN
                colname := colname || '_bigint';
            END IF;
            cols := cols || quote_ident(colname);
        END LOOP;
        RETURN NEXT format('CREATE %sINDEX CONCURRENTLY %I ON %s (%s)',
                           CASE WHEN i.indisunique THEN 'UNIQUE ' ELSE '' END, i.wide_name,
                           i.indrelid::regclass, array_to_string(cols, ', '));
    END LOOP;
END
$$;

-- Step 5: the swap, in the caller's transaction (which sets lock_timeout and retries when a lock
-- is not granted in time). Every statement here changes the catalog only: no scan, no rewrite.
CREATE OR REPLACE FUNCTION sp_widen_swap()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    t record;
    f record;
    i record;
    g record;
    fks text[] := '{}';
    moves text[] := '{}';
    stmt text;
    seq text;
    dflt text;
    n integer := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sp_widen_targets() s WHERE s.wide_exists) THEN
        RETURN 0;
    END IF;
    -- Every table involved, in one order (readings before predictions, as writers touch them).
    FOR t IN SELECT DISTINCT c.relname, CASE c.relname WHEN 'readings' THEN 0 ELSE 1 END AS o
               FROM pg_class c
              WHERE c.oid IN (SELECT to_regclass(s.tbl) FROM sp_widen_targets() s)
                 OR c.oid IN (SELECT k.conrelid FROM pg_constraint k
                               WHERE k.contype = 'f' AND k.confrelid IN
                                     (SELECT to_regclass(s.tbl) FROM sp_widen_targets() s))
              ORDER BY o, c.relname LOOP
        EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE', t.relname);
    END LOOP;
    -- The foreign keys from or to a widened column: dropped now, added back NOT VALID at the end.
    FOR f IN SELECT DISTINCT k.conrelid::regclass::text AS tbl, k.conname,
                    pg_get_constraintdef(k.oid) AS def
               FROM pg_constraint k
               JOIN sp_widen_targets() s
                 ON (k.conrelid = to_regclass(s.tbl) AND (SELECT a.attnum FROM pg_attribute a
                        WHERE a.attrelid = k.conrelid AND a.attname = s.col) = ANY (k.conkey))
                 OR (k.confrelid = to_regclass(s.tbl) AND (SELECT a.attnum FROM pg_attribute a
                        WHERE a.attrelid = k.confrelid AND a.attname = s.col) = ANY (k.confkey))
              WHERE k.contype = 'f' AND s.wide_exists LOOP
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', f.tbl, f.conname);
        fks := fks || format('ALTER TABLE %I ADD CONSTRAINT %I %s NOT VALID',
                             f.tbl, f.conname, f.def);
    END LOOP;
    -- The old columns' indexes and the constraints they back: dropped, their copies take their
    -- names (and their constraints, on the same index).
    FOR i IN SELECT x.indexrelid, x.indrelid::regclass::text AS tbl, ic.relname AS name,
                    left(ic.relname, 56) || '_bigint' AS wide_name, k.conname, k.contype
               FROM pg_index x
               JOIN pg_class ic ON ic.oid = x.indexrelid
               LEFT JOIN pg_constraint k ON k.conindid = x.indexrelid AND k.contype IN ('p', 'u')
                                         AND k.conrelid = x.indrelid
              WHERE EXISTS (SELECT 1 FROM sp_widen_targets() s
                              JOIN pg_attribute a ON a.attrelid = to_regclass(s.tbl)
                                                 AND a.attname = s.col
                             WHERE s.wide_exists AND a.attrelid = x.indrelid
                               AND a.attnum = ANY (x.indkey))
              ORDER BY ic.relname LOOP
        IF to_regclass(i.wide_name) IS NULL THEN
            RAISE EXCEPTION 'index copy % is missing: run widen-ids again', i.wide_name;
        END IF;
        IF i.conname IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', i.tbl, i.conname);
            moves := moves || format('ALTER TABLE %I ADD CONSTRAINT %I %s USING INDEX %I',
                i.tbl, i.conname, CASE i.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END,
                i.wide_name);
        ELSE
            EXECUTE format('DROP INDEX %I', i.name);
            moves := moves || format('ALTER INDEX %I RENAME TO %I', i.wide_name, i.name);
        END IF;
    END LOOP;
    FOR t IN SELECT * FROM sp_widen_targets() s WHERE s.wide_exists LOOP
        -- NOT NULL proven by the validated CHECK: no scan.
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET NOT NULL', t.tbl, t.wide);
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', t.tbl, t.wide || '_not_null');
        -- The default (nextval) and the sequence move to the copy; the sequence becomes bigint.
        SELECT pg_get_expr(d.adbin, d.adrelid) INTO dflt
          FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
         WHERE d.adrelid = to_regclass(t.tbl) AND a.attname = t.col;
        IF dflt IS NOT NULL THEN
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET DEFAULT %s', t.tbl, t.wide, dflt);
        END IF;
        seq := pg_get_serial_sequence(t.tbl, t.col);
        IF seq IS NOT NULL THEN
            EXECUTE format('ALTER SEQUENCE %s OWNED BY %I.%I', seq, t.tbl, t.wide);
            EXECUTE format('ALTER SEQUENCE %s AS bigint', seq);
        END IF;
        -- Column grants (the worker's SELECT (reading_id, model_version) ON predictions).
        FOR g IN SELECT x.grantee::regrole::text AS grantee, x.privilege_type
                   FROM pg_attribute a, aclexplode(a.attacl) x
                  WHERE a.attrelid = to_regclass(t.tbl) AND a.attname = t.col AND x.grantee <> 0
        LOOP
            EXECUTE format('GRANT %s (%I) ON %I TO %s', g.privilege_type, t.wide, t.tbl,
                           g.grantee);
        END LOOP;
        EXECUTE format('ALTER TABLE %I DROP COLUMN %I', t.tbl, t.col);
        EXECUTE format('ALTER TABLE %I RENAME COLUMN %I TO %I', t.tbl, t.wide, t.col);
        n := n + 1;
    END LOOP;
    FOREACH stmt IN ARRAY moves || fks LOOP
        EXECUTE stmt;
    END LOOP;
    FOR t IN SELECT tg.tgrelid::regclass::text AS tbl FROM pg_trigger tg
              WHERE tg.tgname = 'sp_widen_copy' LOOP
        EXECUTE format('DROP TRIGGER sp_widen_copy ON %I', t.tbl);
        EXECUTE format('DROP FUNCTION IF EXISTS %I()', 'sp_widen_copy_' || t.tbl);
    END LOOP;
    RETURN n;
END
$$;

-- Step 2's range: the ids of a table when the trigger is in place (rows above are copied by it).
CREATE OR REPLACE FUNCTION sp_widen_bounds(target text, OUT lo bigint, OUT hi bigint)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
    EXECUTE format('SELECT min(id), max(id) FROM %I', target) INTO lo, hi;
END
$$;

-- Step 6: the foreign keys from or to readings and predictions not validated yet.
CREATE OR REPLACE FUNCTION sp_widen_fk_steps()
RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, public, pg_temp
AS $$
    SELECT format('ALTER TABLE %s VALIDATE CONSTRAINT %I', k.conrelid::regclass, k.conname)
      FROM pg_constraint k
     WHERE k.contype = 'f' AND NOT k.convalidated
       AND (k.conrelid IN (to_regclass('readings'), to_regclass('predictions'))
            OR k.confrelid IN (to_regclass('readings'), to_regclass('predictions')))
$$;
