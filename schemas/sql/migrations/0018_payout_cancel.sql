-- chargeline 0018: payouts an operator can finish (`chargeline payouts retry` and `cancel`).
--
-- 'cancelled': a Stripe payout that Stripe refused ('failed'), or one still 'pending' that no
-- sender has attempted (stripe_attempts = 0: nothing can exist at Stripe), given up by an
-- operator. Its charges are released in the same transaction (payout_id NULL, status
-- 'recorded'), so the next cut gathers them again. The payout keeps charge_count and amount
-- as what it held; verify holds it to having no charges left. cancelled_at says when.
--
-- revision numbers the states of a payout published on billing.payouts: 1 for the cut's
-- record, + 1 for each status change after it (sent, failed, pending again, cancelled), each
-- written to the outbox in the transaction that makes it, with the revision in the header
-- chargeline.payout.revision. (payout_id, revision) identifies a status change; the status
-- alone repeats when a retried payout fails again. Existing payouts published only their cut.
--
-- The previous release keeps running beside this one during an upgrade: it writes neither
-- column, and the defaults fit what it writes.
ALTER TABLE payouts
    DROP CONSTRAINT payouts_status_check,
    ADD CONSTRAINT payouts_status_check
        CHECK (status IN ('recorded', 'pending', 'sent', 'failed', 'cancelled')),
    ADD COLUMN cancelled_at timestamptz,
    ADD COLUMN revision integer NOT NULL DEFAULT 1,
    ADD CONSTRAINT payouts_cancelled_when
        CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
    ADD CONSTRAINT payouts_revision_positive CHECK (revision > 0);
