-- name: stripe_event_record
-- The event recorded once: a redelivery or a replay of its id inserts nothing.
INSERT INTO stripe_events (event_id, type, object_id, data, created)
VALUES ($1, $2, $3, $4::jsonb, to_timestamp($5::float8))
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id;

-- name: stripe_events_claim
-- A lease, as for reload requests: a worker that dies while handling an event leaves it to
-- be claimed again once the lease has run out.
UPDATE stripe_events e
SET attempts = e.attempts + 1, claimed_until = now() + make_interval(secs => $2::float8)
FROM (
    SELECT event_id FROM stripe_events
    WHERE handled_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY received_at, event_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) picked
WHERE e.event_id = picked.event_id
RETURNING e.event_id, e.type, e.data::text AS data, e.attempts;

-- name: stripe_event_handled
UPDATE stripe_events SET handled_at = now(), outcome = $2, claimed_until = NULL
WHERE event_id = $1;

-- name: customer_of_stripe
SELECT customer_ref, payment_method_id FROM customers WHERE stripe_customer_id = $1;

-- name: customer_payment_method
-- The card a customer's reloads are charged to, as a page may show it; NULLs clear it.
UPDATE customers
SET payment_method_id = $2, payment_method_type = $3, payment_method_brand = $4,
    payment_method_last4 = $5, updated_at = now()
WHERE customer_ref = $1;

-- name: customer_stripe_deleted
-- The Stripe customer is gone: nothing can be charged, so auto-reload is turned off and the
-- link and card forgotten (a new payment-setup creates a new Stripe customer).
UPDATE customers
SET auto_reload_enabled = false, stripe_customer_id = NULL, payment_method_id = NULL,
    payment_method_type = NULL, payment_method_brand = NULL, payment_method_last4 = NULL,
    updated_at = now()
WHERE stripe_customer_id = $1
RETURNING customer_ref;
