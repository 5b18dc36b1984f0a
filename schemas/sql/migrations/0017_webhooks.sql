-- chargeline 0017: outbound webhooks, alerts delivered to HTTP endpoints (Standard Webhooks).
--
-- An endpoint is a URL, the secret its deliveries are signed with (kept in clear: signing
-- needs it; shown once, at creation) and the alert types it wants (NULL: every type).
-- Removing one keeps the row (its deliveries refer to it), so that the listings still say
-- where each delivery went.
CREATE TABLE webhook_endpoints (
    endpoint_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text NOT NULL CHECK (length(url) BETWEEN 1 AND 2000),
    secret      text NOT NULL,
    events      text[] CHECK (events IS NULL OR cardinality(events) > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    removed_at  timestamptz
);

-- One row per (endpoint, alert): the fan-out writes them from the outbox in commit order, so
-- delivery_id order is commit order, and the unique key makes a repeated fan-out a no-op.
-- ``payload`` is the alert exactly as published on billing.alerts (the outbox's
-- record_value), sent unchanged. ``claimed_until`` is a lease, not a lock held across the
-- HTTP call: a worker that dies mid-delivery leaves it to run out, and the delivery is sent
-- again (at least once; receivers dedupe on webhook-id, the alert_id).
-- ``alert_created_at`` is when the alert's outbox row was written: the lag metric's start.
CREATE TABLE webhook_deliveries (
    delivery_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id      bigint NOT NULL REFERENCES webhook_endpoints (endpoint_id),
    alert_id         uuid NOT NULL,
    customer_ref     text NOT NULL,
    event_type       text NOT NULL,
    payload          bytea NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz DEFAULT now(),
    claimed_until    timestamptz,
    last_status      integer,
    last_error       text,
    alert_created_at timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    CONSTRAINT webhook_deliveries_once UNIQUE (endpoint_id, alert_id)
);
-- The dispatcher's scan: an endpoint's pending deliveries, oldest first. Finished ones
-- (nearly all of the table, in time) are not in it.
CREATE INDEX webhook_deliveries_pending
    ON webhook_deliveries (endpoint_id, delivery_id) WHERE status = 'pending';
-- The order check: is an earlier delivery of this endpoint and customer still pending?
CREATE INDEX webhook_deliveries_pending_order
    ON webhook_deliveries (endpoint_id, customer_ref, delivery_id) WHERE status = 'pending';
-- The per-endpoint cap: how many of an endpoint's deliveries are leased right now.
CREATE INDEX webhook_deliveries_leased
    ON webhook_deliveries (endpoint_id, claimed_until) WHERE status = 'pending';
-- The listings, newest first per endpoint (the primary key serves the unfiltered one).
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, delivery_id);
ALTER TABLE webhook_deliveries ALTER COLUMN payload SET STATISTICS 0;

-- Alert rows not yet fanned out to the endpoints. A flag of its own rather than
-- published_at: the Kafka relay and the webhooks stay independent, neither waits for the
-- other. Rows written before this migration are false: endpoints get alerts from now on.
ALTER TABLE outbox ADD COLUMN webhooks_pending boolean NOT NULL DEFAULT false;
CREATE INDEX outbox_webhooks_pending ON outbox (outbox_id) WHERE webhooks_pending;
