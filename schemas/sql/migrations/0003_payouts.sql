-- chargeline 0003: payees, payout cuts and payouts (SPEC.md section 7).
-- A cut closes every payout period up to its period_end at once: in one transaction it
-- gathers each charge not yet paid out and recorded before period_end into one payout per
-- payee and currency. Cuts only move forward; a closed period never changes.

-- Settings per payee. A payee that flows name but that has no row here is paid without
-- Stripe (its payouts are recorded, for an external settlement).
CREATE TABLE payees (
    payee_ref      text PRIMARY KEY,
    stripe_account text,
    stripe_payouts boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payees_stripe_needs_account CHECK (NOT stripe_payouts OR stripe_account IS NOT NULL)
);

-- One row per cut, scheduled (the payouts worker, at a period boundary) or manual
-- (`chargeline payouts run`), written in the cut's transaction.
CREATE TABLE payout_cuts (
    cut_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    period_end  timestamptz NOT NULL,
    trigger     text NOT NULL CHECK (trigger IN ('scheduled', 'manual')),
    payouts     integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payout_cuts_period_end UNIQUE (period_end)
);

-- status: 'recorded' (a payee not paid through Stripe), or for Stripe payees 'pending'
-- until the sender has created the Stripe Payout ('sent'), or Stripe refused it ('failed',
-- with Stripe's code and message). stripe_account is copied from the payee at the cut, so a
-- closed payout keeps its destination.
CREATE TABLE payouts (
    payout_id        text PRIMARY KEY,
    cut_id           bigint NOT NULL REFERENCES payout_cuts (cut_id),
    payee_ref        text NOT NULL,
    currency         text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    charge_count     bigint NOT NULL CHECK (charge_count > 0),
    amount           bigint NOT NULL CHECK (amount > 0),
    status           text NOT NULL CHECK (status IN ('recorded', 'pending', 'sent', 'failed')),
    stripe_account   text,
    stripe_payout_id text,
    stripe_attempts  integer NOT NULL DEFAULT 0,  -- Stripe calls started; > 0: look up first
    last_attempt_at  timestamptz,
    failure_code     text,
    failure_message  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payouts_period_in_order CHECK (period_end > period_start),
    CONSTRAINT payouts_one_per_cut UNIQUE (payee_ref, currency, period_end),
    CONSTRAINT payouts_stripe_needs_account CHECK (status = 'recorded' OR stripe_account IS NOT NULL),
    CONSTRAINT payouts_sent_has_stripe_id CHECK (status <> 'sent' OR stripe_payout_id IS NOT NULL)
);
CREATE INDEX payouts_pending ON payouts (created_at) WHERE status = 'pending';
CREATE INDEX payouts_by_period ON payouts (period_end DESC, payee_ref, currency);

-- A charge is paid out exactly when it names its payout, and only an existing one.
ALTER TABLE charges
    ADD CONSTRAINT charges_payout FOREIGN KEY (payout_id) REFERENCES payouts (payout_id),
    ADD CONSTRAINT charges_paid_out_has_payout
        CHECK ((status = 'paid_out') = (payout_id IS NOT NULL));
-- What the next cut gathers, and the awaiting-payout gauges.
CREATE INDEX charges_unpaid ON charges (recorded_at) WHERE payout_id IS NULL;
-- `payouts show`.
CREATE INDEX charges_by_payout ON charges (payout_id) WHERE payout_id IS NOT NULL;
