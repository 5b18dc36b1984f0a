-- name: balance_customer
-- One customer's balance and alert state, as the usage and expiry workers last wrote it.
SELECT customer_ref, balance, overage, low_balance_threshold,
       balance <= 0 AS depleted,
       coalesce(balance < low_balance_threshold, false) AS below_low_threshold,
       ledger_seq, updated_at AS last_activity_at
FROM customers
WHERE customer_ref = $1;

-- name: balance_grants
-- Every grant of a customer: those with tokens left first, in the order they are consumed
-- (soonest expiry, never-expiring last, then priority, cost basis, age), then the pending
-- (not yet effective), then the used up, expired and voided.
SELECT reference, tokens, remaining, expires_at, source, effective_at, priority,
       trim_scale(cost_basis)::text AS cost_basis, currency, status, description
FROM grants
WHERE customer_ref = $1
ORDER BY CASE WHEN status = 'active' AND remaining > 0 THEN 0
              WHEN status = 'pending' THEN 1
              ELSE 2 END,
         expires_at NULLS LAST, priority, grants.cost_basis, effective_at, grant_id;

-- name: balance_recent_alerts
-- A customer's last $2 alerts, newest first (alerts of one batch share created_at).
SELECT alert_id::text AS alert_id, type, balance, previous_balance, threshold, cause_type,
       cause_reference, created_at AS at
FROM alerts
WHERE customer_ref = $1
ORDER BY created_at DESC, ledger_seq DESC NULLS LAST, type
LIMIT $2;

-- name: balance_list
-- Customers, lowest balance first (so `--limit` keeps those closest to depletion);
-- $1 true: only the depleted (balance <= 0).
SELECT c.customer_ref, c.balance, c.overage, c.low_balance_threshold,
       c.balance <= 0 AS depleted, g.grants_with_tokens, c.updated_at AS last_activity_at
FROM customers c
CROSS JOIN LATERAL (
    SELECT count(*) AS grants_with_tokens
    FROM grants
    WHERE grants.customer_ref = c.customer_ref AND grants.remaining > 0
) g
WHERE (NOT $1::boolean OR c.balance <= 0)
ORDER BY c.balance, c.customer_ref
LIMIT $2;

-- name: customer_exists
SELECT EXISTS (SELECT 1 FROM customers WHERE customer_ref = $1);

-- name: usage_report
-- Tokens used per period (UTC calendar day or month, $4) and feature, from usage events
-- that occurred in [$2, $3); $5 restricts to one feature. Periods without usage are absent.
-- Read through the dedup key's index (customer_ref, reference): one range per customer (0007).
SELECT $1::text AS customer_ref,
       date_trunc($4::text, occurred_at, 'UTC') AS period_start,
       feature,
       count(*) AS events,
       sum(tokens)::bigint AS tokens
FROM usage_events
WHERE customer_ref = $1::text
  AND occurred_at >= $2::timestamptz
  AND occurred_at < $3::timestamptz
  AND ($5::text IS NULL OR feature = $5::text)
GROUP BY period_start, feature
ORDER BY period_start, feature NULLS LAST;
