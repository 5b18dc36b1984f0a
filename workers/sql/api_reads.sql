-- The HTTP API's reads (workers/api/reads.py, customers.py). Every list is a keyset page, newest first:
-- the caller asks for one row more than it shows, to know whether there are more, and
-- passes the last row's key back to continue after it. Parameters that are NULL filter
-- nothing (every connection plans each execution with its values: db.SERVER_SETTINGS, so
-- those conditions fold away and the indexes on the other columns serve).

-- name: api_charge_page
-- Charges by (recorded_at, charge_id) descending: a walk sees every charge once even while
-- new ones arrive ($7/$8: the key of the last charge of the previous page). Written as a
-- range on recorded_at plus the tie-break, so the recorded_at indexes bound the scan.
SELECT charge_id, flow_id, customer_ref, reference, amount, currency, status,
       metadata::text AS metadata, occurred_at, recorded_at, payout_id
FROM charges
WHERE ($1::text IS NULL OR flow_id = $1)
  AND ($2::text IS NULL OR customer_ref = $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::timestamptz IS NULL OR recorded_at >= $4)
  AND ($5::timestamptz IS NULL OR recorded_at < $5)
  AND ($6::text IS NULL OR payout_id = $6)
  AND ($7::timestamptz IS NULL
       OR (recorded_at <= $7 AND (recorded_at < $7 OR charge_id < $8::bigint)))
ORDER BY recorded_at DESC, charge_id DESC
LIMIT $9;

-- name: api_credits
-- One customer's balance, settings and grants in one statement (one snapshot, so that the
-- balance and the grants' tokens left agree while a worker applies a batch): one row per
-- grant, the customer's columns on each; a single row of NULL grant columns when there is
-- no grant, and NULL customer columns for a customer with no event yet. Grants in the
-- order of `balances show` (balance_grants).
SELECT c.balance, c.low_balance_threshold,
       coalesce(c.auto_reload_enabled, false) AS auto_reload_enabled,
       c.reload_threshold, c.reload_tokens, c.reload_price, c.reload_currency,
       c.payment_method_type, c.payment_method_brand, c.payment_method_last4,
       g.reference, g.tokens, g.remaining, g.expires_at, g.source, g.effective_at, g.priority,
       trim_scale(g.cost_basis)::text AS cost_basis, g.currency, g.status, g.description
FROM (SELECT $1::text AS customer_ref) k
LEFT JOIN customers c ON c.customer_ref = k.customer_ref
LEFT JOIN grants g ON g.customer_ref = k.customer_ref
ORDER BY CASE WHEN g.status = 'active' AND g.remaining > 0 THEN 0
              WHEN g.status = 'pending' THEN 1
              ELSE 2 END,
         g.expires_at NULLS LAST, g.priority, g.cost_basis, g.effective_at, g.grant_id;

-- name: api_ledger_page
-- A customer's ledger entries by seq descending ($2: the seq of the last entry of the
-- previous page), through the primary key (customer_ref, seq); each with the reference of
-- the grant it moved tokens of, if any, and the reference of the event that caused it.
SELECT e.seq, e.kind, e.amount, e.balance_after, g.reference AS grant_reference,
       e.reference AS cause_reference, e.created_at
FROM ledger_entries e
LEFT JOIN grants g ON g.grant_id = e.grant_id
WHERE e.customer_ref = $1
  AND ($2::bigint IS NULL OR e.seq < $2)
ORDER BY e.seq DESC
LIMIT $3;

-- name: api_payout_page
-- Payouts newest period first, then payee and currency (the index payouts_by_period; the
-- three are unique together). $4-$6: the key of the last payout of the previous page.
SELECT payout_id, payee_ref, currency, period_start, period_end, charge_count, amount, status,
       created_at, stripe_payout_id, failure_code, failure_message
FROM payouts
WHERE ($1::text IS NULL OR payee_ref = $1)
  AND ($2::text IS NULL OR currency = $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::timestamptz IS NULL
       OR period_end < $4
       OR (period_end = $4 AND (payee_ref, currency) > ($5::text, $6::text)))
ORDER BY period_end DESC, payee_ref, currency
LIMIT $7;

-- name: api_dead_letter_page
-- Dead letters newest first ($3: the id of the last one of the previous page).
SELECT dead_letter_id AS id, reason, topic, partition, "offset", detail, created_at,
       replayed_at
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1)
  AND ($2::timestamptz IS NULL OR created_at >= $2)
  AND ($3::bigint IS NULL OR dead_letter_id < $3)
ORDER BY dead_letter_id DESC
LIMIT $4;
