-- chargeline 0015: the Idempotency-Key of the HTTP API's money-moving requests.
--
-- One row per (key, route): the hash of the request it was first used with, what it set
-- going (a top-up's reload request) and, once final, the answer every later request with
-- the same key and body is given. The primary key is what makes concurrent requests with
-- one key create one reload request: the second INSERT ... ON CONFLICT waits for the first
-- transaction and then finds its row. A key is stored only once a request got that far (a
-- request refused by validation, or for a customer without a Stripe customer, stores
-- nothing, so the key can be used again once the request is fixed).
CREATE TABLE idempotency_keys (
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    route           text NOT NULL,
    request_hash    bytea NOT NULL,
    -- Deferred: the key's row is inserted first (it serialises concurrent requests), the
    -- reload request after it, in the same transaction.
    reload_id       uuid REFERENCES reload_requests (reload_id) DEFERRABLE INITIALLY DEFERRED,
    api_key_id      bigint,
    response_status integer CHECK (response_status BETWEEN 200 AND 599),
    response_body   jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    answered_at     timestamptz,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (idempotency_key, route),
    CONSTRAINT idempotency_keys_answer CHECK ((response_status IS NULL) = (response_body IS NULL))
);
