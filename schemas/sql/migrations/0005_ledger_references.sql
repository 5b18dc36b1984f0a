-- The ledger's references to the events that caused its entries are checked by
-- `chargeline verify` (check ledger_references), not by foreign keys.
--
-- Why: an FK check is a per-row trigger that looks up and share-locks the referenced row.
-- On the hot path every usage entry paid two of them (its grant and its usage event), which
-- made the ledger COPY 2.4 times slower (113k against 268k rows/s on the bench machine) and
-- was the largest single cost of a usage batch in Postgres. The rows referenced are written
-- or locked in the same transaction as the entries, by the only writer of the ledger, and the
-- runtime role cannot delete grants, usage events or ledger entries (roles.sql); the one table
-- it may delete from, credit_voids, loses only voids that made no entry (drop_voids).
ALTER TABLE ledger_entries
    DROP CONSTRAINT IF EXISTS ledger_entries_grant_id_fkey,
    DROP CONSTRAINT IF EXISTS ledger_entries_usage_id_fkey,
    DROP CONSTRAINT IF EXISTS ledger_entries_void_id_fkey;
