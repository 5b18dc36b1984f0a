-- chargeline 0002: the token ledger. Customers with balances kept for fast reads, grants,
-- usage events, voids, the append-only ledger, and alerts (also sent through the outbox).

CREATE TABLE customers (
    customer_ref          text PRIMARY KEY,
    balance               bigint NOT NULL DEFAULT 0,   -- = sum(ledger_entries.amount)
    overage               bigint NOT NULL DEFAULT 0 CHECK (overage >= 0),
    ledger_seq            bigint NOT NULL DEFAULT 0,   -- seq of the customer's last entry
    low_balance_threshold bigint CHECK (low_balance_threshold >= 0),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_depleted ON customers (customer_ref) WHERE balance <= 0;

CREATE TABLE grants (
    grant_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref     text NOT NULL,
    reference        text NOT NULL,
    tokens           bigint NOT NULL CHECK (tokens > 0),
    remaining        bigint NOT NULL DEFAULT 0 CHECK (remaining >= 0),
    cost_basis       numeric(36, 18) NOT NULL CHECK (cost_basis >= 0),
    currency         text NOT NULL,
    effective_at     timestamptz NOT NULL,
    expires_at       timestamptz,
    priority         integer NOT NULL DEFAULT 0,
    source           text NOT NULL,
    description      text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'active', 'expired', 'voided')),
    fingerprint      bytea NOT NULL,
    payload          jsonb NOT NULL,
    source_topic     text NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT grants_dedup_key UNIQUE (customer_ref, reference),
    CONSTRAINT grants_expire_after_effective CHECK (expires_at IS NULL OR expires_at > effective_at)
);
-- The grants a batch must load: pending, or with tokens left.
CREATE INDEX grants_open ON grants (customer_ref) WHERE status = 'pending' OR remaining > 0;
-- What the expiry worker looks for.
CREATE INDEX grants_due_expiry ON grants (expires_at)
    WHERE expires_at IS NOT NULL AND (status = 'pending' OR remaining > 0);
CREATE INDEX grants_due_effective ON grants (effective_at) WHERE status = 'pending';

CREATE TABLE usage_events (
    usage_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref     text NOT NULL,
    reference        text NOT NULL,
    tokens           bigint NOT NULL CHECK (tokens > 0),
    feature          text,
    metadata         json,
    occurred_at      timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    fingerprint      bytea NOT NULL,
    source_topic     text NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    CONSTRAINT usage_events_dedup_key UNIQUE (customer_ref, reference)
);
CREATE INDEX usage_events_report ON usage_events (customer_ref, occurred_at);

CREATE TABLE credit_voids (
    void_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref     text NOT NULL,
    reference        text NOT NULL,
    grant_reference  text NOT NULL,
    reason           text NOT NULL,
    fingerprint      bytea NOT NULL,
    payload          jsonb NOT NULL,
    source_topic     text NOT NULL,
    source_partition integer NOT NULL,
    source_offset    bigint NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT credit_voids_dedup_key UNIQUE (customer_ref, reference)
);

-- Append-only. Per customer: balance = sum(amount); overage = sum(overage_delta);
-- per grant: remaining = sum(grant_delta). A usage event paid by two grants and overage
-- has three entries, each naming what paid.
CREATE TABLE ledger_entries (
    entry_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_ref  text NOT NULL,
    seq           bigint NOT NULL,
    kind          text NOT NULL
                  CHECK (kind IN ('grant', 'overage_settlement', 'usage', 'expiry', 'void')),
    amount        bigint NOT NULL,
    grant_id      bigint REFERENCES grants (grant_id),
    grant_delta   bigint NOT NULL DEFAULT 0,
    overage_delta bigint NOT NULL DEFAULT 0,
    reference     text NOT NULL,
    usage_id      bigint REFERENCES usage_events (usage_id),
    void_id       bigint REFERENCES credit_voids (void_id),
    balance_after bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_entries_customer_seq UNIQUE (customer_ref, seq)
);
CREATE INDEX ledger_entries_usage ON ledger_entries (usage_id) WHERE usage_id IS NOT NULL;
CREATE INDEX ledger_entries_grant ON ledger_entries (grant_id) WHERE grant_id IS NOT NULL;

CREATE TABLE alerts (
    alert_id         uuid PRIMARY KEY,
    type             text NOT NULL,
    customer_ref     text NOT NULL,
    balance          bigint NOT NULL,
    previous_balance bigint,
    threshold        bigint,
    cause_type       text NOT NULL,
    cause_reference  text,
    ledger_seq       bigint,
    detail           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_customer ON alerts (customer_ref, created_at);
