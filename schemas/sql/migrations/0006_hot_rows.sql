-- Customers and grants are the rows every usage batch rewrites (a balance, a grant's tokens
-- left): thousands of new row versions a second under load. Measured on the bench machine,
-- a 10,000-customer load of 1,000,000 events spent 6 s of its 31 s of Postgres time in the
-- UPDATEs and lookups of these two tables, 20 to 50 times their cost on a fresh database,
-- because every update left a dead version and a new index entry behind.
--
-- 1. customers: no index may mention a column the ledger updates, so that updates are HOT
--    (heap-only: no index entry, dead versions pruned in place). customers_depleted
--    (WHERE balance <= 0) was the one; `balances list --depleted` filters a scan instead.
--    Half of each page is left free for the new versions.
DROP INDEX IF EXISTS customers_depleted;
ALTER TABLE customers SET (fillfactor = 50);

-- 2. grants keep partial indexes on status and tokens left (the open-grant and expiry
--    lookups need them), so their updates cannot be HOT: vacuum them often instead, as
--    soon as a few thousand versions are dead rather than a fifth of the table.
ALTER TABLE grants SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0
);
ALTER TABLE customers SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 2000,
    autovacuum_vacuum_cost_delay = 0
);
