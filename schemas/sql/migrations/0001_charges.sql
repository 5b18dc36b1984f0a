-- chargeline 0001: flows, charges, conflicts, dead letters, the transactional outbox.
-- Every table that records an input event carries its source position (topic, partition,
-- offset) so an operator can trace any row back to the record that made it.

CREATE TABLE flows (
    flow_id     text PRIMARY KEY,
    name        text NOT NULL,
    payee_ref   text NOT NULL DEFAULT 'default',
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paused')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per applied charge. (flow_id, reference) is the permanent dedup key: a unique
-- index, not a time window.
CREATE TABLE charges (
    charge_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_id          text NOT NULL REFERENCES flows (flow_id),
    reference        text NOT NULL,
    customer_ref     text NOT NULL,
    amount           bigint NOT NULL CHECK (amount > 0),
    currency         text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    metadata         json,
    occurred_at      timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    status           text NOT NULL DEFAULT 'recorded' CHECK (status IN ('recorded', 'paid_out')),
    payout_id        text,
    fingerprint      bytea NOT NULL,
    payload          jsonb NOT NULL,
    source_topic     text NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    CONSTRAINT charges_dedup_key UNIQUE (flow_id, reference)
);
CREATE INDEX charges_flow_recorded ON charges (flow_id, recorded_at);
CREATE INDEX charges_customer_recorded ON charges (customer_ref, recorded_at);
CREATE INDEX charges_recorded ON charges (recorded_at);

-- Every record that could not be applied, exactly once per source position.
CREATE TABLE dead_letters (
    dead_letter_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic            text NOT NULL,
    partition        integer NOT NULL,
    "offset"         bigint NOT NULL,
    record_key       bytea,
    record_value     bytea,
    record_headers   jsonb NOT NULL DEFAULT '[]',
    record_timestamp timestamptz,
    reason           text NOT NULL,
    detail           text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz,
    CONSTRAINT dead_letters_source_position UNIQUE (topic, partition, "offset")
);
CREATE INDEX dead_letters_reason ON dead_letters (reason, created_at);

-- A reference re-used with another payload: never applied, kept with both payloads.
CREATE TABLE conflicts (
    conflict_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_type          text NOT NULL,
    dedup_key           text[] NOT NULL,
    original_payload    jsonb NOT NULL,
    conflicting_payload jsonb NOT NULL,
    topic               text NOT NULL,
    partition           integer NOT NULL,
    "offset"            bigint NOT NULL,
    detected_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT conflicts_source_position UNIQUE (topic, partition, "offset")
);

-- Transactional outbox: everything chargeline emits to Kafka is first written here in the
-- same transaction as the change it reports, then published at least once by the relay.
CREATE TABLE outbox (
    outbox_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind          text NOT NULL,
    topic         text NOT NULL,
    record_key    bytea,
    record_value  bytea NOT NULL,
    headers       jsonb NOT NULL DEFAULT '[]',
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (outbox_id) WHERE published_at IS NULL;
