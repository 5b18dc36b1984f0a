-- Each query returns the rows that break one invariant (SPEC.md section 9), at most $1.
-- Set-based: one pass per check over the tables, no per-customer loops.

-- name: verify_duplicate_keys
SELECT 'charge' AS kind, flow_id AS key1, reference AS key2, count(*) AS copies
FROM charges GROUP BY flow_id, reference HAVING count(*) > 1
UNION ALL
SELECT 'usage', customer_ref, reference, count(*)
FROM usage_events GROUP BY customer_ref, reference HAVING count(*) > 1
UNION ALL
SELECT 'credit_grant', customer_ref, reference, count(*)
FROM grants GROUP BY customer_ref, reference HAVING count(*) > 1
LIMIT $1;

-- name: verify_usage_applied_once
-- Every usage event is in the ledger exactly once: its entries add up to its tokens.
SELECT u.usage_id, u.customer_ref, u.reference, u.tokens, e.consumed, e.entries
FROM usage_events u
LEFT JOIN (
    SELECT usage_id, -sum(amount) AS consumed, count(*) AS entries
    FROM ledger_entries WHERE usage_id IS NOT NULL GROUP BY usage_id
) e USING (usage_id)
WHERE e.consumed IS DISTINCT FROM u.tokens
LIMIT $1;

-- name: verify_conflicts_recorded
SELECT d.dead_letter_id, d.topic, d.partition, d."offset"
FROM dead_letters d
LEFT JOIN conflicts c USING (topic, partition, "offset")
WHERE d.reason = 'reference_conflict' AND c.conflict_id IS NULL
LIMIT $1;

-- name: verify_balances
-- balance = sum of ledger entries = grants remaining - overage, and overage = its entries.
WITH ledger AS (
    SELECT customer_ref, sum(amount) AS total, sum(overage_delta) AS overage
    FROM ledger_entries GROUP BY customer_ref
), remaining AS (
    SELECT customer_ref, sum(remaining) AS total FROM grants GROUP BY customer_ref
)
SELECT c.customer_ref, c.balance, coalesce(l.total, 0) AS ledger_sum,
       coalesce(r.total, 0) AS grants_remaining, c.overage,
       coalesce(l.overage, 0) AS ledger_overage
FROM customers c
LEFT JOIN ledger l USING (customer_ref)
LEFT JOIN remaining r USING (customer_ref)
WHERE c.balance <> coalesce(l.total, 0)
   OR c.balance <> coalesce(r.total, 0) - c.overage
   OR c.overage <> coalesce(l.overage, 0)
UNION ALL
-- Ledger entries of customers that have no balance row.
SELECT l.customer_ref, NULL, sum(l.amount), NULL, NULL, NULL
FROM ledger_entries l
LEFT JOIN customers c USING (customer_ref)
WHERE c.customer_ref IS NULL
GROUP BY l.customer_ref
LIMIT $1;

-- name: verify_grants
-- Per grant: tokens left = the sum of its ledger deltas.
SELECT g.grant_id, g.customer_ref, g.reference, g.remaining, coalesce(e.delta, 0) AS ledger_delta
FROM grants g
LEFT JOIN (
    SELECT grant_id, sum(grant_delta) AS delta FROM ledger_entries
    WHERE grant_id IS NOT NULL GROUP BY grant_id
) e USING (grant_id)
WHERE g.remaining <> coalesce(e.delta, 0)
LIMIT $1;

-- name: verify_ledger_sequence
-- Entries of a customer are numbered 1..n without gaps, each balance_after a running sum.
SELECT customer_ref, seq, balance_after, running
FROM (
    SELECT customer_ref, seq, balance_after,
           sum(amount) OVER (PARTITION BY customer_ref ORDER BY seq) AS running,
           row_number() OVER (PARTITION BY customer_ref ORDER BY seq) AS position
    FROM ledger_entries
) e
WHERE balance_after <> running OR seq <> position
LIMIT $1;

-- name: verify_consumption_order
-- No usage paid by a grant while a grant earlier in consumption order (soonest expiry, never
-- expiring last; priority; cost basis; age) had tokens left. A grant holds tokens from the
-- entry that credits it until the entry that takes its last one (what is left never grows
-- back), so each grant is one interval of the customer's sequence numbers, and the check is
-- a join of usage entries to the intervals around them. Entries written before migration
-- 0013 were made under an older order for grants that never expire and are not checked
-- (schemas/README.md says how to audit them).
WITH running AS (
    SELECT grant_id, seq, grant_delta,
           sum(grant_delta) OVER (PARTITION BY grant_id ORDER BY seq) AS remaining
    FROM ledger_entries
    WHERE grant_id IS NOT NULL
),
held AS (
    SELECT grant_id,
           min(seq) FILTER (WHERE grant_delta > 0) AS from_seq,
           min(seq) FILTER (WHERE grant_delta < 0 AND remaining = 0) AS until_seq
    FROM running
    GROUP BY grant_id
),
since AS (
    SELECT coalesce(
        (SELECT applied_at FROM schema_migrations WHERE version LIKE '0013\_%'), '-infinity'
    ) AS at
)
SELECT u.customer_ref, u.seq, u.reference AS usage_reference, g.reference AS paid_by,
       h.reference AS passed_over
FROM ledger_entries u
JOIN grants g ON g.grant_id = u.grant_id
JOIN grants h ON h.customer_ref = u.customer_ref AND h.grant_id <> g.grant_id
JOIN held ON held.grant_id = h.grant_id
WHERE u.kind = 'usage'
  AND u.created_at >= (SELECT at FROM since)
  AND held.from_seq < u.seq AND (held.until_seq IS NULL OR held.until_seq > u.seq)
  AND (h.expires_at IS NULL, coalesce(h.expires_at, '-infinity'), h.priority, h.cost_basis,
       h.effective_at, h.grant_id)
    < (g.expires_at IS NULL, coalesce(g.expires_at, '-infinity'), g.priority, g.cost_basis,
       g.effective_at, g.grant_id)
ORDER BY u.customer_ref, u.seq
LIMIT $1;

-- name: verify_ledger_references
-- Every entry's grant, usage event and void exists (the ledger has no foreign keys: 0005).
SELECT e.entry_id, e.customer_ref, e.seq, e.kind, e.grant_id, e.usage_id, e.void_id
FROM ledger_entries e
LEFT JOIN grants g ON g.grant_id = e.grant_id
LEFT JOIN usage_events u ON u.usage_id = e.usage_id
LEFT JOIN credit_voids v ON v.void_id = e.void_id
WHERE (e.grant_id IS NOT NULL AND g.grant_id IS NULL)
   OR (e.usage_id IS NOT NULL AND u.usage_id IS NULL)
   OR (e.void_id IS NOT NULL AND v.void_id IS NULL)
LIMIT $1;

-- name: verify_charge_flows
-- Every charge's flow exists (charges have no foreign key to flows: 0007).
SELECT c.charge_id, c.flow_id, c.reference
FROM charges c
LEFT JOIN flows f ON f.flow_id = c.flow_id
WHERE f.flow_id IS NULL
LIMIT $1;

-- name: verify_alerts
-- Each depleted/recovered alert is a crossing at its ledger position, and per customer
-- they alternate, starting with recovered (a new customer starts at 0).
SELECT a.alert_id::text, a.customer_ref, a.type, a.previous_balance, a.balance,
       e.balance_after, a.previous_type
FROM (
    SELECT alert_id, customer_ref, type, previous_balance, balance, ledger_seq,
           lag(type) OVER (PARTITION BY customer_ref ORDER BY ledger_seq, created_at) AS previous_type
    FROM alerts
    WHERE type IN ('credit_balance_depleted', 'credit_balance_recovered')
) a
LEFT JOIN ledger_entries e ON e.customer_ref = a.customer_ref AND e.seq = a.ledger_seq
WHERE e.balance_after IS DISTINCT FROM a.balance
   OR (a.type = 'credit_balance_depleted'
       AND NOT (a.previous_balance > 0 AND a.balance <= 0))
   OR (a.type = 'credit_balance_recovered'
       AND NOT (a.previous_balance <= 0 AND a.balance > 0))
   OR a.type = a.previous_type
   OR (a.previous_type IS NULL AND a.type <> 'credit_balance_recovered')
LIMIT $1;

-- name: verify_alerts_in_outbox
-- Every alert was written to the outbox exactly once: checked for the alerts written after
-- the retention mark (an alert and its outbox row share their transaction's now()), where
-- the outbox still holds every row; older rows may have been removed once published.
-- Each outbox row's JSON is read once, then hash-joined: linear, not alerts x outbox.
WITH mark AS (
    SELECT coalesce((SELECT pruned_through FROM outbox_retention), '-infinity') AS since
), emitted AS MATERIALIZED (
    SELECT (convert_from(record_value, 'UTF8')::jsonb ->> 'alert_id')::uuid AS alert_id
    FROM outbox, mark WHERE kind = 'alert' AND created_at > mark.since
), emitted_counts AS (
    SELECT alert_id, count(*) AS outbox_rows FROM emitted GROUP BY alert_id
)
SELECT a.alert_id::text, a.customer_ref, a.type, coalesce(e.outbox_rows, 0) AS outbox_rows
FROM alerts a
CROSS JOIN mark
LEFT JOIN emitted_counts e USING (alert_id)
WHERE a.created_at > mark.since AND coalesce(e.outbox_rows, 0) <> 1
LIMIT $1;

-- name: verify_dead_letters
-- Every dead letter once per source position, with that position, and once on billing.dlq.
SELECT topic, partition, "offset", count(*) AS copies
FROM dead_letters
GROUP BY topic, partition, "offset"
HAVING count(*) > 1 OR topic IS NULL OR partition IS NULL OR "offset" IS NULL
UNION ALL
SELECT 'outbox rows for dead letters', NULL, NULL, o.rows - d.rows
FROM (SELECT coalesce((SELECT pruned_through FROM outbox_retention), '-infinity') AS since) m,
     LATERAL (SELECT count(*) AS rows FROM outbox
              WHERE kind = 'dead_letter' AND created_at > m.since) o,
     LATERAL (SELECT count(*) AS rows FROM dead_letters WHERE created_at > m.since) d
WHERE o.rows <> d.rows
LIMIT $1;

-- name: verify_payouts
-- Every recorded charge is in at most one payout (one payout_id column, and paid_out
-- exactly when it has one); a payout's count and total are those of its charges. A
-- cancelled payout keeps what it held as history, and no charge names it any more.
SELECT p.payout_id, p.charge_count, p.amount, coalesce(c.charges, 0) AS charges,
       coalesce(c.total, 0) AS charges_total
FROM payouts p
LEFT JOIN (
    SELECT payout_id, count(*) AS charges, sum(amount) AS total
    FROM charges WHERE payout_id IS NOT NULL GROUP BY payout_id
) c USING (payout_id)
WHERE CASE WHEN p.status = 'cancelled' THEN c.charges IS NOT NULL
           ELSE p.charge_count <> coalesce(c.charges, 0) OR p.amount <> coalesce(c.total, 0)
      END
UNION ALL
SELECT c.payout_id, NULL, NULL, c.charge_id, c.amount
FROM charges c
LEFT JOIN payouts p USING (payout_id)
WHERE (c.payout_id IS NOT NULL AND p.payout_id IS NULL)
   OR ((c.status = 'paid_out') <> (c.payout_id IS NOT NULL))
   OR p.currency <> c.currency
LIMIT $1;
