-- chargeline 0012: ANALYZE skips the columns no query filters, joins, groups or sorts by.
--
-- Autovacuum analyzes a growing table every time a tenth of it is new. Each ANALYZE samples
-- 30,000 rows and, for every column, sorts the sample's values to build the planner's
-- statistics. While a large backlog drains into growing tables, those analyzes are a third
-- of Postgres's CPU, most of it on charges, usage_events and ledger_entries, and most of
-- that on columns no plan ever uses.
--
-- The payloads, the metadata, the fingerprints and digests, and the source positions are
-- stored to be returned, never to be searched: every query finds rows by the dedup keys,
-- customers, flows and times. The one predicate on raw_digest (workers/sql/known.sql) checks
-- the single row a unique key has found, where no estimate matters. A statistics target of 0
-- leaves these columns out of ANALYZE; every other column keeps its statistics.
DO $$
DECLARE
    stored_only record;
    col text;
BEGIN
    FOR stored_only IN
        SELECT * FROM (VALUES
            -- Every event table: the event's fingerprint and digest, where it was read from.
            ('charges', ARRAY['metadata', 'payload']),
            ('usage_events', ARRAY['metadata']),
            ('grants', ARRAY['payload', 'description']),
            ('credit_voids', ARRAY['payload'])
        ) AS t(tbl, cols)
    LOOP
        FOREACH col IN ARRAY stored_only.cols
            || ARRAY['fingerprint', 'raw_digest', 'source_topic', 'source_partition',
                     'source_offset']
        LOOP
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I SET STATISTICS 0',
                           stored_only.tbl, col);
        END LOOP;
    END LOOP;
END $$;

-- The ledger is read by customer and sequence and summed or checked by verify; no query
-- selects entries by their amounts, balances or cause.
ALTER TABLE ledger_entries
    ALTER COLUMN amount SET STATISTICS 0,
    ALTER COLUMN grant_delta SET STATISTICS 0,
    ALTER COLUMN overage_delta SET STATISTICS 0,
    ALTER COLUMN balance_after SET STATISTICS 0,
    ALTER COLUMN reference SET STATISTICS 0;

-- The outbox is read by its unpublished index; the records themselves are only relayed.
ALTER TABLE outbox
    ALTER COLUMN record_key SET STATISTICS 0,
    ALTER COLUMN record_value SET STATISTICS 0,
    ALTER COLUMN headers SET STATISTICS 0;
