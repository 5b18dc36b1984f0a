-- chargeline 0020: verify's checkpoint. A passing `chargeline verify` records how far it
-- has checked, and the next run checks only what came after, against the state it
-- recorded: its cost follows the traffic since the last run, not all history. The
-- ledger is append-only and numbered per customer, so "after" is a sequence number per
-- customer; usage events, charges, dead letters and outbox rows are numbered by their
-- identity columns, which verify reads at a moment no writer holds them (a brief SHARE
-- lock), so no row with a smaller number can commit later. `chargeline verify --full` still checks
-- everything and leaves the checkpoint alone. Written only by verify, one run at a time.

-- How far the identity-numbered tables were checked (a single row).
CREATE TABLE verify_checkpoint (
    singleton                  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    usage_id_through           bigint NOT NULL,
    charge_id_through          bigint NOT NULL,
    dead_letter_id_through     bigint NOT NULL,
    outbox_id_through          bigint NOT NULL,
    checked_at                 timestamptz NOT NULL
);

-- Per customer: the last entry checked, and the balance, overage and last depleted/
-- recovered alert as of that entry.
CREATE TABLE verify_customer_checkpoints (
    customer_ref     text PRIMARY KEY,
    seq              bigint NOT NULL,
    balance          bigint NOT NULL,
    overage          bigint NOT NULL,
    last_alert_type  text
);

-- Per grant: the sum of its ledger deltas through its customer's checkpoint (tokens left
-- then).
CREATE TABLE verify_grant_checkpoints (
    grant_id  bigint PRIMARY KEY,
    delta     bigint NOT NULL
);

-- Per payout: the status it was checked in (a payout's charges change only when it is
-- cut or cancelled, so it is checked again only when new or its status changed).
CREATE TABLE verify_payout_checkpoints (
    payout_id  text PRIMARY KEY,
    status     text NOT NULL
);

-- The usage events after the checkpoint, by number: a BRIN index (a few pages, nearly
-- free to maintain on an append-only table) rather than the B-tree migration 0010 removed.
CREATE INDEX usage_events_usage_id_brin ON usage_events USING brin (usage_id);
-- A customer's depleted/recovered alerts after its checkpoint's sequence number.
CREATE INDEX alerts_customer_seq ON alerts (customer_ref, ledger_seq);
