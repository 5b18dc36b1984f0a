-- name: claim_reloads
-- A lease, not a lock held across the Stripe call: a worker that dies mid-charge leaves
-- the request 'charging', and after the lease another worker picks it up (and looks for
-- the PaymentIntent the first one may have created before creating any).
UPDATE reload_requests r
SET status = 'charging', attempts = r.attempts + 1,
    claimed_until = now() + make_interval(secs => $2::float8), updated_at = now()
FROM (
    SELECT reload_id FROM reload_requests
    WHERE status IN ('requested', 'charging')
      AND (claimed_until IS NULL OR claimed_until < now())
      AND ($3::uuid IS NULL OR reload_id = $3::uuid)
    ORDER BY created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) picked, customers c
WHERE r.reload_id = picked.reload_id AND c.customer_ref = r.customer_ref
RETURNING r.reload_id, r.customer_ref, r.kind, r.tokens, r.price, r.currency, r.attempts,
          r.payment_intent_id, r.cause_reference, c.stripe_customer_id, c.reload_threshold;

-- name: reload_request_manual
INSERT INTO reload_requests (reload_id, customer_ref, kind, tokens, price, currency)
VALUES ($1, $2, 'manual', $3, $4, $5);

-- name: reload_insert_grant
-- The tokens a charge bought, as a grant whose reference is the PaymentIntent id: the
-- unique key makes granting the same PaymentIntent twice impossible.
INSERT INTO grants (customer_ref, reference, tokens, cost_basis, currency, effective_at,
                    priority, source, description, fingerprint, payload, source_topic,
                    source_partition, source_offset)
VALUES ($1, $2, $3, $4, $5, now(), 0, $6, $7, $8, $9::jsonb, 'chargeline:reloads', 0, 0)
ON CONFLICT ON CONSTRAINT grants_dedup_key DO NOTHING
RETURNING grant_id, effective_at;

-- name: reload_succeeded
UPDATE reload_requests
SET status = 'succeeded', payment_intent_id = $2, grant_reference = $2, claimed_until = NULL,
    stripe_code = NULL, stripe_message = NULL, updated_at = now()
WHERE reload_id = $1;

-- name: reload_failed
-- Only an open request fails, once: the worker and a payment_intent.payment_failed event
-- may both conclude it, and the failure must count once toward disabling auto-reload.
UPDATE reload_requests
SET status = 'failed', payment_intent_id = coalesce($2, payment_intent_id), stripe_code = $3,
    stripe_message = $4, claimed_until = NULL, updated_at = now()
WHERE reload_id = $1 AND status IN ('requested', 'charging')
RETURNING reload_id;

-- name: reload_open
-- An open request as claim_reloads returns it, without claiming it: what a Stripe event
-- settles (a lease held by a worker waiting on Stripe does not stop it; both settling is
-- harmless, see the reloads worker).
SELECT r.reload_id, r.customer_ref, r.kind, r.tokens, r.price, r.currency, r.attempts,
       r.payment_intent_id, r.cause_reference, c.stripe_customer_id, c.reload_threshold
FROM reload_requests r JOIN customers c USING (customer_ref)
WHERE r.reload_id = $1 AND r.status IN ('requested', 'charging');

-- name: reload_count_failure
-- Consecutive failures of automatic reloads; the third turns auto-reload off.
UPDATE customers
SET reload_failures = reload_failures + 1,
    auto_reload_enabled = auto_reload_enabled AND reload_failures + 1 < $2,
    updated_at = now()
WHERE customer_ref = $1
RETURNING reload_failures, auto_reload_enabled, balance;

-- name: reload_reset_failures
UPDATE customers SET reload_failures = 0 WHERE customer_ref = $1;

-- name: reload_show
SELECT reload_id, customer_ref, kind, tokens, price, currency, status, attempts,
       payment_intent_id, stripe_code, stripe_message, created_at, updated_at
FROM reload_requests WHERE reload_id = $1;
