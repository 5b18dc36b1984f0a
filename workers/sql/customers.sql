-- name: customer_configure
-- NULL parameters leave a setting as it is; the CHECKs and the CLI validate the rest.
INSERT INTO customers (customer_ref, stripe_customer_id, auto_reload_enabled, reload_threshold,
                       reload_tokens, reload_price, reload_currency, low_balance_threshold)
VALUES ($1, $2, coalesce($3, false), $4, $5, $6, $7, $8)
ON CONFLICT (customer_ref) DO UPDATE SET
    stripe_customer_id    = coalesce($2, customers.stripe_customer_id),
    auto_reload_enabled   = coalesce($3, customers.auto_reload_enabled),
    reload_threshold      = coalesce($4, customers.reload_threshold),
    reload_tokens         = coalesce($5, customers.reload_tokens),
    reload_price          = coalesce($6, customers.reload_price),
    reload_currency       = coalesce($7, customers.reload_currency),
    low_balance_threshold = coalesce($8, customers.low_balance_threshold),
    -- Turning auto-reload back on starts a fresh count of failures.
    reload_failures       = CASE WHEN $3 THEN 0 ELSE customers.reload_failures END,
    updated_at            = now()
RETURNING customer_ref, balance, stripe_customer_id, auto_reload_enabled, reload_threshold,
          reload_tokens, reload_price, reload_currency, reload_failures, low_balance_threshold;

-- name: customer_stripe_id
SELECT stripe_customer_id FROM customers WHERE customer_ref = $1;

-- name: customer_link_stripe
-- Link a Stripe customer to ours, creating our row when the customer has no event yet. A
-- link made first (by a concurrent setup, or by hand) is kept: the answer is the one in force.
INSERT INTO customers (customer_ref, stripe_customer_id) VALUES ($1, $2)
ON CONFLICT (customer_ref) DO UPDATE
SET stripe_customer_id = coalesce(customers.stripe_customer_id, EXCLUDED.stripe_customer_id),
    updated_at = now()
RETURNING stripe_customer_id;
