-- name: api_idempotency_claim
-- The key for this route, or nothing when another request holds it. A concurrent request
-- with the same key waits here until the first one's transaction ends, then gets nothing
-- (it committed: the caller reads its row) or the key (it rolled back).
INSERT INTO idempotency_keys (idempotency_key, route, request_hash, reload_id, api_key_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT ON CONSTRAINT idempotency_keys_pkey DO NOTHING
RETURNING reload_id;

-- name: api_idempotency_show
SELECT request_hash, reload_id, response_status, response_body
FROM idempotency_keys
WHERE idempotency_key = $1 AND route = $2;

-- name: api_idempotency_answer
-- The final answer, stored once: whoever stores it first wins, everyone gets what is stored.
UPDATE idempotency_keys
SET response_status = coalesce(response_status, $3),
    response_body = coalesce(response_body, $4::jsonb),
    answered_at = coalesce(answered_at, now())
WHERE idempotency_key = $1 AND route = $2
RETURNING response_status, response_body;

-- name: api_topup_customer
-- Not locked: should the Stripe customer go before the reload is processed, the reload
-- fails with no_stripe_customer (a 402), as the CLI's would.
SELECT stripe_customer_id FROM customers WHERE customer_ref = $1;

-- name: api_topup_state
SELECT reload_id, customer_ref, status, tokens, price, currency, payment_intent_id,
       stripe_code, stripe_message
FROM reload_requests
WHERE reload_id = $1;

-- name: api_topup_balance
-- The balance right after the top-up's grant (its last entry: the grant, or the overage it
-- settled), else the balance now.
SELECT coalesce(
    (SELECT e.balance_after FROM ledger_entries e
     WHERE e.customer_ref = $1 AND e.reference = $2
       AND e.kind IN ('grant', 'overage_settlement')
     ORDER BY e.seq DESC LIMIT 1),
    (SELECT c.balance FROM customers c WHERE c.customer_ref = $1),
    0);
