-- What one transaction of a replay changed, read inside that transaction before it commits
-- (or, for --dry-run, before it rolls back). "Written by this transaction" is
-- `xmin = pg_current_xact_id()::xid`: exact for rows the transaction inserted or updated
-- (the apply path opens no savepoints, whose rows would carry a subtransaction's xid).
-- Each query is narrowed by an index first: recorded_at / created_at default to now(),
-- which is the transaction's start time, and $1 is the batch's customers.

-- name: replay_new_charges
SELECT flow_id, currency, count(*)::bigint AS count, sum(amount)::bigint AS amount
FROM charges
WHERE recorded_at = now() AND xmin = pg_current_xact_id()::xid
GROUP BY flow_id, currency
ORDER BY flow_id, currency;

-- name: replay_balance_changes
-- The ledger is append-only and a customer's row stays locked (FOR UPDATE) from the first
-- batch that touches it to the end of the transaction, so this transaction's entries are
-- the tail of the customer's ledger: the balance before them is balance_after of the
-- last entry written by anyone else (0 for a customer without one). A short backward scan
-- of ledger_entries_customer_seq, not the customer's whole history.
SELECT c.customer_ref,
       coalesce((SELECT e.balance_after
                 FROM ledger_entries e
                 WHERE e.customer_ref = c.customer_ref
                   AND e.xmin <> pg_current_xact_id()::xid
                 ORDER BY e.seq DESC
                 LIMIT 1), 0)::bigint AS before,
       c.balance AS after
FROM customers c
WHERE c.customer_ref = ANY($1::text[])
  AND c.xmin = pg_current_xact_id()::xid
ORDER BY c.customer_ref;

-- name: replay_new_alerts
SELECT customer_ref, type, balance, previous_balance, cause_type, cause_reference, ledger_seq
FROM alerts
WHERE customer_ref = ANY($1::text[])
  AND created_at = now()
  AND xmin = pg_current_xact_id()::xid
ORDER BY customer_ref, ledger_seq NULLS LAST, type;

-- name: replay_has_reload_requests
SELECT to_regclass('reload_requests') IS NOT NULL;

-- name: replay_new_reload_requests
SELECT customer_ref, kind, tokens, price, currency
FROM reload_requests
WHERE customer_ref = ANY($1::text[])
  AND xmin = pg_current_xact_id()::xid
ORDER BY customer_ref;
