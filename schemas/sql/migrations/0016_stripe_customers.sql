-- chargeline 0016: Stripe's side of a customer (the card collected by payment-setup) and
-- the Stripe events the webhook endpoint received.
--
-- Of a payment method only what a page shows is kept: its Stripe id, type, card brand and
-- last four digits. Never a number, an expiry or a fingerprint.
ALTER TABLE customers
    ADD COLUMN payment_method_id    text,
    ADD COLUMN payment_method_type  text,
    ADD COLUMN payment_method_brand text,
    ADD COLUMN payment_method_last4 text CHECK (payment_method_last4 ~ '^[0-9]{4}$');

-- One row per Stripe event id: the primary key is what makes a redelivered or replayed
-- event a no-op. ``data`` holds only the fields a handler reads (ids, statuses, metadata,
-- an error code), not Stripe's whole object, which for a payment can carry card details.
-- The endpoint records the row and answers; the reloads worker handles it afterwards
-- (Stripe retries an endpoint that is slow to answer), under a lease like reload requests.
CREATE TABLE stripe_events (
    event_id      text PRIMARY KEY,
    type          text NOT NULL,
    object_id     text,
    data          jsonb NOT NULL,
    created       timestamptz,
    received_at   timestamptz NOT NULL DEFAULT now(),
    attempts      integer NOT NULL DEFAULT 0,
    claimed_until timestamptz,
    handled_at    timestamptz,
    outcome       text
);
CREATE INDEX stripe_events_unhandled ON stripe_events (received_at) WHERE handled_at IS NULL;
