-- chargeline 0008: the update every usage event makes to its grant becomes HOT.
--
-- A grant used up to its last token was 'active' with remaining = 0, and the partial
-- indexes that find open grants named `remaining` in their predicates. Postgres counts a
-- column in an index predicate as indexed, so no update of a grant's tokens left could be
-- HOT (heap-only): each left a dead version and a new entry in every index of grants, the
-- indexes bloated, and the grant updates grew slower the longer a drain ran.
--
-- Now such a grant is 'used' (written so by the ledger when its last token goes), 'active'
-- means tokens left (a CHECK holds it), and the predicates name only `status`, which an
-- update of the tokens left does not change. grants has fillfactor 70 (0006): room on the
-- page for the new versions.
ALTER TABLE grants DROP CONSTRAINT IF EXISTS grants_status_check;
UPDATE grants SET status = 'used' WHERE status = 'active' AND remaining = 0;
ALTER TABLE grants
    ADD CONSTRAINT grants_status_check
        CHECK (status IN ('pending', 'active', 'used', 'expired', 'voided')),
    ADD CONSTRAINT grants_active_has_tokens CHECK (status <> 'active' OR remaining > 0);

DROP INDEX IF EXISTS grants_open;
CREATE INDEX grants_open ON grants (customer_ref) WHERE status IN ('pending', 'active');
DROP INDEX IF EXISTS grants_due_expiry;
CREATE INDEX grants_due_expiry ON grants (expires_at)
    WHERE expires_at IS NOT NULL AND status IN ('pending', 'active');
