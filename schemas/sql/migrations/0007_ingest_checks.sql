-- chargeline 0007: two per-row costs of the ingest path that bought nothing there.
--
-- 1. charges.flow_id: checked by `chargeline verify` (check charge_flows), not by a foreign
--    key. record_charges already joins every charge to its flow, share-locked (FOR SHARE),
--    and inserts only those whose flow is active; the FK then repeated that lookup and lock
--    once per row in a trigger, a third of the statement's cost. Flows are never
--    deleted (no command does, and the runtime role may not: roles.sql).
ALTER TABLE charges DROP CONSTRAINT IF EXISTS charges_flow_id_fkey;

-- 2. usage_events_report (customer_ref, occurred_at): a second B-tree with 10,000 random
--    insertion points beside the dedup key's, maintained for `chargeline usage` alone, a
--    third of the cost of each usage row. The report reads a customer's usage through
--    the dedup key (customer_ref, reference) instead, filtering occurred_at: one index range
--    per customer, which is what a report of one customer reads anyway.
DROP INDEX IF EXISTS usage_events_report;
