-- chargeline 0004: customer billing settings and reload requests (auto-reload, top-ups).
-- No card data is stored anywhere: only Stripe ids.

ALTER TABLE customers
    ADD COLUMN stripe_customer_id   text,
    ADD COLUMN auto_reload_enabled  boolean NOT NULL DEFAULT false,
    ADD COLUMN reload_threshold     bigint CHECK (reload_threshold >= 0),
    ADD COLUMN reload_tokens        bigint CHECK (reload_tokens > 0),
    ADD COLUMN reload_price         bigint CHECK (reload_price > 0),
    ADD COLUMN reload_currency      text,
    ADD COLUMN reload_failures      integer NOT NULL DEFAULT 0;

-- One row per requested charge: created in the usage worker's transaction when a balance
-- falls below the threshold (kind 'auto'), or by `credits topup` (kind 'manual').
CREATE TABLE reload_requests (
    reload_id          uuid PRIMARY KEY,
    customer_ref       text NOT NULL REFERENCES customers (customer_ref),
    kind               text NOT NULL CHECK (kind IN ('auto', 'manual')),
    tokens             bigint NOT NULL CHECK (tokens > 0),
    price              bigint NOT NULL CHECK (price > 0),
    currency           text NOT NULL,
    status             text NOT NULL DEFAULT 'requested'
                       CHECK (status IN ('requested', 'charging', 'succeeded', 'failed')),
    attempts           integer NOT NULL DEFAULT 0,
    claimed_until      timestamptz,
    payment_intent_id  text,
    stripe_code        text,
    stripe_message     text,
    grant_reference    text,
    cause_reference    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- Never two automatic reloads in flight for one customer.
CREATE UNIQUE INDEX reload_requests_one_in_flight ON reload_requests (customer_ref)
    WHERE kind = 'auto' AND status IN ('requested', 'charging');
CREATE INDEX reload_requests_open ON reload_requests (created_at)
    WHERE status IN ('requested', 'charging');
