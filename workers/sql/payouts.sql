-- name: payout_cut_lock
-- Transaction-level: cuts (workers and `payouts run`) never overlap; released at commit.
SELECT pg_advisory_xact_lock($1::bigint);

-- name: payout_cut_state
-- Read after the lock, so the last cut is the one that just committed, if any.
-- clock_timestamp(), not now(): the time the cut happens, not when its transaction began
-- waiting for the lock; in milliseconds, the precision of billing.payouts events.
SELECT (SELECT max(period_end) FROM payout_cuts) AS last_end,
       date_trunc('milliseconds', clock_timestamp()) AS now,
       (SELECT min(recorded_at) FROM charges WHERE payout_id IS NULL) AS earliest_unpaid;

-- name: payout_cut_insert
INSERT INTO payout_cuts (period_end, trigger) VALUES ($1, $2) RETURNING cut_id;

-- name: payout_cut
-- One statement, so the payouts and the charges they claim come from one snapshot: every
-- charge not yet paid out and recorded before the cut ($1), grouped by the payee its flow
-- names now and by currency. A charge whose transaction commits after this snapshot is not
-- seen: it keeps payout_id NULL and goes into the next cut, whatever its recorded_at.
-- period_start is where the payee's previous payout in the currency ended, or for a first
-- payout the start of the period ($3: 'hour' or 'day', UTC) of its earliest charge. A
-- cancelled payout does not count: the next payout takes over its period with its charges.
-- The id is deterministic: the cut's end (cuts have distinct ends), the currency and a hash
-- of the payee (payee refs may hold any printable character; ids stay ASCII).
-- The last SELECT returns the payouts with what the UPDATE claimed, checked by the caller.
WITH due AS (
    SELECT c.charge_id, c.amount, c.currency, c.recorded_at, f.payee_ref
    FROM charges c
    JOIN flows f ON f.flow_id = c.flow_id
    WHERE c.payout_id IS NULL AND c.recorded_at < $1::timestamptz
),
grouped AS (
    SELECT d.payee_ref, d.currency, count(*) AS charge_count, sum(d.amount)::bigint AS amount,
           coalesce(
               (SELECT max(p.period_end) FROM payouts p
                WHERE p.payee_ref = d.payee_ref AND p.currency = d.currency
                  AND p.status <> 'cancelled'),
               date_trunc($3::text, min(d.recorded_at), 'UTC')
           ) AS period_start
    FROM due d
    GROUP BY d.payee_ref, d.currency
),
named AS (
    SELECT g.*,
           'po_'
           || to_char($1::timestamptz AT TIME ZONE 'UTC',
                      CASE WHEN date_trunc('second', $1::timestamptz) = $1::timestamptz
                               THEN 'YYYYMMDD"T"HH24MISS"Z"'
                           WHEN date_trunc('milliseconds', $1::timestamptz) = $1::timestamptz
                               THEN 'YYYYMMDD"T"HH24MISS.MS"Z"'
                           ELSE 'YYYYMMDD"T"HH24MISS.US"Z"'
                      END)
           || '_' || g.currency
           || '_' || left(encode(sha256(convert_to(g.payee_ref, 'UTF8')), 'hex'), 16)
           AS payout_id
    FROM grouped g
),
inserted AS (
    INSERT INTO payouts (payout_id, cut_id, payee_ref, currency, period_start, period_end,
                         charge_count, amount, status, stripe_account)
    SELECT n.payout_id, $2::bigint, n.payee_ref, n.currency, n.period_start, $1::timestamptz,
           n.charge_count, n.amount,
           CASE WHEN py.stripe_payouts THEN 'pending' ELSE 'recorded' END,
           CASE WHEN py.stripe_payouts THEN py.stripe_account END
    FROM named n
    LEFT JOIN payees py ON py.payee_ref = n.payee_ref
    RETURNING payout_id, payee_ref, currency, period_start, period_end, charge_count, amount,
              status, created_at
),
claimed AS (
    UPDATE charges c
    SET status = 'paid_out', payout_id = n.payout_id
    FROM due d
    JOIN named n ON n.payee_ref = d.payee_ref AND n.currency = d.currency
    WHERE c.charge_id = d.charge_id
    RETURNING c.payout_id, c.amount
),
claimed_totals AS (
    SELECT payout_id, count(*) AS charge_count, sum(amount)::bigint AS amount
    FROM claimed
    GROUP BY payout_id
)
SELECT i.*,
       coalesce(t.charge_count, 0) AS claimed_count,
       coalesce(t.amount, 0) AS claimed_amount
FROM inserted i
LEFT JOIN claimed_totals t ON t.payout_id = i.payout_id
ORDER BY i.payee_ref, i.currency;

-- name: payout_cut_done
UPDATE payout_cuts SET payouts = $2 WHERE cut_id = $1;

-- name: payout_outbox
-- billing.payouts records, keyed by payee: the cut's (revision 1) and each status change.
INSERT INTO outbox (kind, topic, record_key, record_value, headers)
SELECT 'payout', $4::text, convert_to(k.payee_ref, 'UTF8'), k.message, k.headers::jsonb
FROM unnest($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY
     AS k(payee_ref, message, headers, ord)
ORDER BY k.ord;

-- name: payout_backlog
-- The awaiting-payout gauges (the partial index charges_unpaid).
SELECT count(*)::bigint AS awaiting,
       coalesce(extract(epoch FROM clock_timestamp() - min(recorded_at)), 0)::float8
           AS oldest_age_s
FROM charges
WHERE payout_id IS NULL;

-- name: payout_send_try_lock
-- Session-level: one sender at a time, so a payout is never with Stripe twice at once.
SELECT pg_try_advisory_lock($1::bigint);

-- name: payout_send_unlock
SELECT pg_advisory_unlock($1::bigint);

-- name: payouts_to_send
SELECT payout_id, payee_ref, currency, amount, stripe_account, stripe_attempts
FROM payouts
WHERE status = 'pending'
ORDER BY created_at, payout_id
LIMIT $1;

-- name: payout_send_attempt
-- Committed before Stripe is called: an attempt that may have reached Stripe is never
-- forgotten, so the next one looks the Stripe Payout up before it could create another.
UPDATE payouts
SET stripe_attempts = stripe_attempts + 1, last_attempt_at = now(), updated_at = now()
WHERE payout_id = $1 AND status = 'pending'
RETURNING stripe_attempts - 1 AS earlier_attempts;

-- Each status change after the cut counts a revision and returns what its billing.payouts
-- record says; the caller writes that record in the same transaction.

-- name: payout_mark_sent
UPDATE payouts
SET status = 'sent', stripe_payout_id = $2, failure_code = NULL, failure_message = NULL,
    revision = revision + 1, updated_at = now()
WHERE payout_id = $1 AND status = 'pending'
RETURNING payout_id, payee_ref, currency, period_start, period_end, charge_count, amount,
          status, created_at, revision;

-- name: payout_mark_failed
UPDATE payouts
SET status = 'failed', failure_code = $2, failure_message = $3, revision = revision + 1,
    updated_at = now()
WHERE payout_id = $1 AND status = 'pending'
RETURNING payout_id, payee_ref, currency, period_start, period_end, charge_count, amount,
          status, created_at, revision;

-- name: payout_reopen
-- `payouts retry`: a failed payout goes back to the senders. stripe_attempts is kept, so the
-- next attempt looks for a Stripe Payout carrying the id before it could create one.
UPDATE payouts
SET status = 'pending', failure_code = NULL, failure_message = NULL, revision = revision + 1,
    updated_at = now()
WHERE payout_id = $1 AND status = 'failed'
RETURNING payout_id, payee_ref, currency, period_start, period_end, charge_count, amount,
          status, created_at, revision, stripe_account, stripe_attempts;

-- name: payout_cancel
-- `payouts cancel`: failed, or pending and never attempted, and still as the caller saw it
-- ($2: its stripe_attempts, checked at Stripe when > 0). charge_count and amount stay as
-- what it held; payout_release_charges, in the same transaction, frees the charges.
UPDATE payouts
SET status = 'cancelled', cancelled_at = now(), revision = revision + 1, updated_at = now()
WHERE payout_id = $1
  AND stripe_attempts = $2
  AND (status = 'failed' OR (status = 'pending' AND stripe_attempts = 0))
RETURNING payout_id, payee_ref, currency, period_start, period_end, charge_count, amount,
          status, created_at, revision, cancelled_at;

-- name: payout_release_charges
-- The charges of a payout being cancelled: unpaid again, for the next cut.
WITH released AS (
    UPDATE charges
    SET status = 'recorded', payout_id = NULL
    WHERE payout_id = $1
    RETURNING amount
)
SELECT count(*) AS charge_count, coalesce(sum(amount), 0)::bigint AS amount FROM released;

-- name: payout_list
SELECT payout_id, payee_ref, currency, period_start, period_end, charge_count, amount, status,
       created_at, stripe_payout_id, failure_code, failure_message
FROM payouts
WHERE ($1::text IS NULL OR payee_ref = $1)
  AND ($2::text IS NULL OR currency = $2)
  AND ($3::text IS NULL OR status = $3)
ORDER BY period_end DESC, payee_ref, currency
LIMIT $4;

-- name: payout_show
SELECT payout_id, payee_ref, currency, period_start, period_end, charge_count, amount, status,
       created_at, updated_at, stripe_account, stripe_payout_id, stripe_attempts,
       failure_code, failure_message
FROM payouts
WHERE payout_id = $1;

-- name: payout_charges
SELECT charge_id, flow_id, customer_ref, reference, amount, currency, occurred_at, recorded_at
FROM charges
WHERE payout_id = $1
ORDER BY recorded_at, charge_id;

-- name: payee_configure
-- Options left out keep their value; the CHECK refuses Stripe payouts without an account.
INSERT INTO payees (payee_ref, stripe_account, stripe_payouts)
VALUES ($1, $2, coalesce($3, false))
ON CONFLICT (payee_ref) DO UPDATE
SET stripe_account = coalesce($2, payees.stripe_account),
    stripe_payouts = coalesce($3, payees.stripe_payouts),
    updated_at = now()
RETURNING payee_ref;

-- name: payee_list
-- Payees with settings and payees only named by flows (paid without Stripe).
SELECT p.payee_ref, s.stripe_account, coalesce(s.stripe_payouts, false) AS stripe_payouts,
       (SELECT count(*) FROM flows f WHERE f.payee_ref = p.payee_ref) AS flows
FROM (SELECT payee_ref FROM payees UNION SELECT payee_ref FROM flows) p
LEFT JOIN payees s ON s.payee_ref = p.payee_ref
WHERE ($1::text IS NULL OR p.payee_ref = $1)
ORDER BY p.payee_ref;

-- name: flow_update
-- The payee of a flow's charges is read at the cut: charges not yet paid out follow it.
UPDATE flows
SET name = coalesce($2, name), payee_ref = coalesce($3, payee_ref), updated_at = now()
WHERE flow_id = $1
RETURNING flow_id;
