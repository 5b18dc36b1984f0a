-- chargeline 0010: four B-trees fewer to write per usage event.
--
-- Each usage event inserted a row in usage_events (two indexes: the identity key usage_id
-- and the dedup key) and, most often, one in ledger_entries (four: entry_id, the customer
-- sequence, and partial indexes on usage_id and on grant_id). No query reads any of
-- usage_events_pkey, ledger_entries_pkey, ledger_entries_usage or ledger_entries_grant:
-- the ledger is read by customer and sequence, usage by dedup key, and verify's checks
-- aggregate or hash-join whole tables. An entry names its cause by customer_ref and
-- reference too, which the dedup keys index.
--
-- So the natural keys become the primary keys (usage_events by its dedup key, the ledger by
-- customer and sequence), the identity columns stay as plain columns (the ledger's
-- usage_id, grant_id and void_id still point at them), and the two partial indexes go.
-- The constraint names the workers use (ON CONFLICT ON CONSTRAINT usage_events_dedup_key)
-- are kept. Both primary keys are built anew, holding each table's lock while they are:
-- on a large database, migrate in a quiet window.
ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_pkey;
ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_dedup_key;
ALTER TABLE usage_events ADD CONSTRAINT usage_events_dedup_key PRIMARY KEY (customer_ref, reference);

ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_pkey;
ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_customer_seq;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_customer_seq PRIMARY KEY (customer_ref, seq);
DROP INDEX IF EXISTS ledger_entries_usage;
DROP INDEX IF EXISTS ledger_entries_grant;
