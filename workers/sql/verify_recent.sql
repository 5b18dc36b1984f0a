-- verify since its checkpoint (migration 0020): the same invariants as verify.sql, each
-- checked on what came after the last passing run, against the state that run recorded.
-- Each query returns the rows that break one invariant, at most $1, in the columns of its
-- verify.sql twin. They read temporary tables made first, in the same snapshot:
--   verify_window       the customers whose ledger or row moved since their checkpoint:
--                       the checkpoint (sequence number, balance, overage, last alert)
--                       beside the row now;
--   verify_fresh        their ledger entries after the checkpoint;
--   verify_new_*        the usage events, charges, dead letters and outbox rows numbered
--                       after the checkpoint.
-- A big table is only ever probed by key from these, in LATERAL subqueries with OFFSET 0
-- (which the planner cannot turn into a join reading the whole table), or read whole
-- where it is small and bounded by customers rather than events (grants, payouts).

-- name: verify_fence
-- Run with usage_events, charges, dead_letters and outbox locked in SHARE mode, so no transaction
-- that writes them is in flight: every number handed out so far belongs to a transaction
-- that has ended, and the snapshot exported here, which verify's own transaction adopts,
-- holds each of them that committed.
SELECT pg_export_snapshot() AS snapshot,
       coalesce(pg_sequence_last_value(
           pg_get_serial_sequence('usage_events', 'usage_id')::regclass), 0) AS usage_id,
       coalesce(pg_sequence_last_value(
           pg_get_serial_sequence('charges', 'charge_id')::regclass), 0) AS charge_id,
       coalesce(pg_sequence_last_value(
           pg_get_serial_sequence('dead_letters', 'dead_letter_id')::regclass), 0)
           AS dead_letter_id,
       coalesce(pg_sequence_last_value(
           pg_get_serial_sequence('outbox', 'outbox_id')::regclass), 0) AS outbox_id;

-- name: verify_fence_holders
-- Who held the fence off: the oldest transactions holding a lock on the fenced tables
-- that SHARE conflicts with (an autovacuum shows as such), for verify_fence_busy.
SELECT a.pid, a.backend_type, a.application_name,
       round(extract(epoch FROM now() - a.xact_start)::numeric, 1)::float8 AS xact_s,
       left(a.query, 120) AS query
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted AND a.pid <> pg_backend_pid()
  AND l.relation IN ('usage_events'::regclass, 'charges'::regclass,
                     'dead_letters'::regclass, 'outbox'::regclass)
  AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock',
                 'ExclusiveLock', 'AccessExclusiveLock')
GROUP BY a.pid, a.backend_type, a.application_name, a.xact_start, a.query
ORDER BY a.xact_start NULLS LAST
LIMIT 3;

-- name: verify_recent_from
-- Where the last passing run left off (nothing: a first run, which reads everything).
SELECT coalesce(max(usage_id_through), 0) AS usage_id,
       coalesce(max(charge_id_through), 0) AS charge_id,
       coalesce(max(dead_letter_id_through), 0) AS dead_letter_id,
       coalesce(max(outbox_id_through), 0) AS outbox_id,
       max(checked_at) AS checked_at
FROM verify_checkpoint;

-- name: verify_recent_window
-- The customers whose ledger moved since their checkpoint, and those whose row no longer
-- matches it; then their new entries, an index range each (the ledger's primary key is
-- (customer_ref, seq)). OFFSET 0 keeps the range a per-customer probe: joined whole, the
-- planner may choose to read the entire ledger, which is what this file exists to avoid.
CREATE TEMPORARY TABLE verify_window ON COMMIT DROP AS
SELECT c.customer_ref, c.balance, c.overage, c.ledger_seq,
       coalesce(k.seq, 0) AS from_seq, coalesce(k.balance, 0) AS from_balance,
       coalesce(k.overage, 0) AS from_overage, k.last_alert_type
FROM customers c
LEFT JOIN verify_customer_checkpoints k USING (customer_ref)
WHERE c.ledger_seq <> coalesce(k.seq, 0) OR c.balance <> coalesce(k.balance, 0)
   OR c.overage <> coalesce(k.overage, 0);

ANALYZE verify_window;

CREATE TEMPORARY TABLE verify_fresh ON COMMIT DROP AS
SELECT e.*
FROM verify_window w
CROSS JOIN LATERAL (
    SELECT * FROM ledger_entries e
    WHERE e.customer_ref = w.customer_ref AND e.seq > w.from_seq
    OFFSET 0
) e;

ANALYZE verify_fresh;

-- name: verify_recent_new_usage
-- The numbered rows after the checkpoint ($1: the last number checked), each into a small
-- table of its own; usage_events by its BRIN index.
CREATE TEMPORARY TABLE verify_new_usage ON COMMIT DROP AS
SELECT usage_id, customer_ref, reference, tokens FROM usage_events WHERE usage_id > $1;

-- name: verify_recent_new_charges
CREATE TEMPORARY TABLE verify_new_charges ON COMMIT DROP AS
SELECT charge_id, flow_id, reference, payout_id, amount, currency, status
FROM charges WHERE charge_id > $1;

-- name: verify_recent_new_dead_letters
CREATE TEMPORARY TABLE verify_new_dead_letters ON COMMIT DROP AS
SELECT dead_letter_id, topic, partition, "offset", reason, created_at
FROM dead_letters WHERE dead_letter_id > $1;

-- name: verify_recent_new_outbox
-- The alerts' and dead letters' outbox rows, each alert's id read from its JSON once.
CREATE TEMPORARY TABLE verify_new_outbox ON COMMIT DROP AS
SELECT outbox_id, kind, created_at,
       CASE WHEN kind = 'alert'
            THEN (convert_from(record_value, 'UTF8')::jsonb ->> 'alert_id')::uuid END AS alert_id
FROM outbox WHERE outbox_id > $1 AND kind IN ('alert', 'dead_letter');

-- name: verify_recent_analyze
ANALYZE verify_new_usage;
ANALYZE verify_new_charges;
ANALYZE verify_new_dead_letters;
ANALYZE verify_new_outbox;

-- name: verify_recent_scope
SELECT (SELECT count(*) FROM verify_fresh) AS entries,
       (SELECT count(DISTINCT customer_ref) FROM verify_fresh) AS customers;

-- name: verify_recent_duplicate_keys
-- Postgres refuses a second row for a key its unique index holds, so rather than probing
-- the index for each new row: the three dedup keys are unique constraints on exactly their
-- columns, with valid indexes (a restore without them, or a failed rebuild, would let
-- duplicates in), and no key repeats among the new rows. --full groups the tables whole.
SELECT 'dedup key not enforced: ' || k.name AS kind, k.tbl AS key1,
       array_to_string(k.cols, ', ') AS key2, NULL::bigint AS copies
FROM (VALUES ('charges_dedup_key', 'charges', ARRAY['flow_id', 'reference']),
             ('usage_events_dedup_key', 'usage_events', ARRAY['customer_ref', 'reference']),
             ('grants_dedup_key', 'grants', ARRAY['customer_ref', 'reference']))
     AS k(name, tbl, cols)
LEFT JOIN pg_constraint c
       ON c.conname = k.name AND c.conrelid = to_regclass(k.tbl) AND c.contype IN ('p', 'u')
LEFT JOIN pg_index i ON i.indexrelid = c.conindid
WHERE c.oid IS NULL OR NOT i.indisunique OR NOT i.indisvalid
   OR k.cols::text[] <> ARRAY(
          SELECT a.attname::text
          FROM unnest(c.conkey) WITH ORDINALITY AS key(attnum, position)
          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = key.attnum
          ORDER BY key.position)
UNION ALL
SELECT 'charge', flow_id, reference, count(*)
FROM verify_new_charges GROUP BY flow_id, reference HAVING count(*) > 1
UNION ALL
SELECT 'usage', customer_ref, reference, count(*)
FROM verify_new_usage GROUP BY customer_ref, reference HAVING count(*) > 1
UNION ALL
SELECT 'credit_grant', customer_ref, reference, count(*)
FROM grants GROUP BY customer_ref, reference HAVING count(*) > 1
LIMIT $1;

-- name: verify_recent_usage_applied_once
-- A usage event and its entries are written in one transaction, so a usage event new since
-- the checkpoint has all its entries after it, and an entry after it names a new event: an
-- entry for an older event is that event applied again.
WITH applied AS (
    SELECT customer_ref, usage_id, min(reference) AS reference, -sum(amount) AS consumed,
           count(*) AS entries
    FROM verify_fresh WHERE usage_id IS NOT NULL
    GROUP BY customer_ref, usage_id
), new_usage AS (
    SELECT usage_id, customer_ref, reference, tokens FROM verify_new_usage
)
SELECT coalesce(u.usage_id, a.usage_id) AS usage_id,
       coalesce(u.customer_ref, a.customer_ref) AS customer_ref,
       coalesce(u.reference, a.reference) AS reference, u.tokens, a.consumed, a.entries
FROM new_usage u
FULL JOIN applied a ON a.customer_ref = u.customer_ref AND a.usage_id = u.usage_id
WHERE a.consumed IS DISTINCT FROM u.tokens
LIMIT $1;

-- name: verify_recent_conflicts_recorded
SELECT d.dead_letter_id, d.topic, d.partition, d."offset"
FROM verify_new_dead_letters d
LEFT JOIN LATERAL (
    SELECT conflict_id FROM conflicts c
    WHERE c.topic = d.topic AND c.partition = d.partition AND c."offset" = d."offset"
    OFFSET 0
) c ON true
WHERE d.reason = 'reference_conflict' AND c.conflict_id IS NULL
LIMIT $1;

-- name: verify_recent_balances
-- A customer whose ledger moved, or whose row changed, since its checkpoint: the ledger sum
-- is the checkpoint's balance plus the new entries. (A customer's balance changes only
-- with an entry, which moves its ledger_seq; verify_window holds the others too.)
WITH moved AS (
    SELECT customer_ref, sum(amount) AS amount, sum(overage_delta) AS overage
    FROM verify_fresh GROUP BY customer_ref
), touched AS (
    SELECT w.customer_ref, w.balance, w.overage,
           w.from_balance + coalesce(m.amount, 0) AS ledger_sum,
           w.from_overage + coalesce(m.overage, 0) AS ledger_overage
    FROM verify_window w
    LEFT JOIN moved m USING (customer_ref)
), remaining AS (
    SELECT g.customer_ref, sum(g.remaining) AS total
    FROM grants g JOIN touched t USING (customer_ref)
    GROUP BY g.customer_ref
)
SELECT t.customer_ref, t.balance, t.ledger_sum, coalesce(r.total, 0) AS grants_remaining,
       t.overage, t.ledger_overage
FROM touched t
LEFT JOIN remaining r USING (customer_ref)
WHERE t.balance <> t.ledger_sum
   OR t.balance <> coalesce(r.total, 0) - t.overage
   OR t.overage <> t.ledger_overage
LIMIT $1;

-- name: verify_recent_grants
-- Every grant: tokens left = its deltas through the checkpoint plus the new ones.
WITH moved AS (
    SELECT grant_id, sum(grant_delta) AS delta
    FROM verify_fresh WHERE grant_id IS NOT NULL GROUP BY grant_id
)
SELECT g.grant_id, g.customer_ref, g.reference, g.remaining,
       coalesce(k.delta, 0) + coalesce(m.delta, 0) AS ledger_delta
FROM grants g
LEFT JOIN verify_grant_checkpoints k USING (grant_id)
LEFT JOIN moved m USING (grant_id)
WHERE g.remaining <> coalesce(k.delta, 0) + coalesce(m.delta, 0)
LIMIT $1;

-- name: verify_recent_ledger_sequence
-- The new entries go on from the checkpoint: numbered without gaps, each balance_after the
-- checkpoint's balance plus a running sum.
SELECT customer_ref, seq, balance_after, running
FROM (
    SELECT f.customer_ref, f.seq, f.balance_after,
           w.from_balance + sum(f.amount) OVER (PARTITION BY f.customer_ref ORDER BY f.seq)
               AS running,
           w.from_seq + row_number() OVER (PARTITION BY f.customer_ref ORDER BY f.seq)
               AS position
    FROM verify_fresh f
    JOIN verify_window w USING (customer_ref)
) e
WHERE balance_after <> running OR seq <> position
UNION ALL
-- The customer row names its last entry (ledger_seq): how the window finds what moved.
SELECT w.customer_ref, w.ledger_seq, NULL, NULL
FROM verify_window w
LEFT JOIN verify_fresh f USING (customer_ref)
GROUP BY w.customer_ref, w.ledger_seq, w.from_seq
HAVING w.ledger_seq <> coalesce(max(f.seq), w.from_seq)
LIMIT $1;

-- name: verify_recent_consumption_order
-- verify_consumption_order on the new usage entries. A grant with tokens left at the
-- checkpoint is held from it; one without is held from a new entry crediting it; either
-- until the new entry that takes its last token.
WITH running AS (
    SELECT f.grant_id, f.seq, f.grant_delta,
           coalesce(k.delta, 0)
               + sum(f.grant_delta) OVER (PARTITION BY f.grant_id ORDER BY f.seq) AS remaining
    FROM verify_fresh f
    LEFT JOIN verify_grant_checkpoints k USING (grant_id)
    WHERE f.grant_id IS NOT NULL
),
moved AS (
    SELECT grant_id,
           min(seq) FILTER (WHERE grant_delta > 0) AS credited_seq,
           min(seq) FILTER (WHERE grant_delta < 0 AND remaining = 0) AS until_seq
    FROM running
    GROUP BY grant_id
),
paying AS (
    SELECT DISTINCT customer_ref FROM verify_fresh WHERE kind = 'usage'
),
-- Only the grants that held tokens at some point of the window: a long-lived customer has
-- many more spent ones, and each usage entry is compared with every grant held beside it.
held AS MATERIALIZED (
    SELECT * FROM (
        SELECT h.grant_id, h.customer_ref,
               CASE WHEN coalesce(k.delta, 0) > 0 THEN w.from_seq ELSE m.credited_seq END
                   AS from_seq,
               m.until_seq
        FROM paying p
        JOIN grants h USING (customer_ref)
        JOIN verify_window w USING (customer_ref)
        LEFT JOIN verify_grant_checkpoints k USING (grant_id)
        LEFT JOIN moved m USING (grant_id)
    ) candidate
    WHERE from_seq IS NOT NULL
),
since AS (
    SELECT coalesce(
        (SELECT applied_at FROM schema_migrations WHERE version LIKE '0013\_%'), '-infinity'
    ) AS at
)
SELECT u.customer_ref, u.seq, u.reference AS usage_reference, g.reference AS paid_by,
       h.reference AS passed_over
FROM verify_fresh u
JOIN grants g ON g.grant_id = u.grant_id
JOIN held ON held.customer_ref = u.customer_ref AND held.grant_id <> g.grant_id
JOIN grants h ON h.grant_id = held.grant_id
WHERE u.kind = 'usage'
  AND u.created_at >= (SELECT at FROM since)
  AND held.from_seq < u.seq AND (held.until_seq IS NULL OR held.until_seq > u.seq)
  AND (h.expires_at IS NULL, coalesce(h.expires_at, '-infinity'), h.priority, h.cost_basis,
       h.effective_at, h.grant_id)
    < (g.expires_at IS NULL, coalesce(g.expires_at, '-infinity'), g.priority, g.cost_basis,
       g.effective_at, g.grant_id)
ORDER BY u.customer_ref, u.seq
LIMIT $1;

-- name: verify_recent_ledger_references
-- Every usage event with an entry after the checkpoint is new (verify_recent_usage_applied_once
-- says why), so a usage entry's event is looked for among the new ones: one that is not
-- there does not exist, or was applied before.
SELECT e.entry_id, e.customer_ref, e.seq, e.kind, e.grant_id, e.usage_id, e.void_id
FROM verify_fresh e
LEFT JOIN grants g ON g.grant_id = e.grant_id
LEFT JOIN verify_new_usage u ON u.customer_ref = e.customer_ref AND u.usage_id = e.usage_id
LEFT JOIN credit_voids v ON v.void_id = e.void_id
WHERE (e.grant_id IS NOT NULL AND g.grant_id IS NULL)
   OR (e.usage_id IS NOT NULL AND u.usage_id IS NULL)
   OR (e.void_id IS NOT NULL AND v.void_id IS NULL)
LIMIT $1;

-- name: verify_recent_charge_flows
SELECT c.charge_id, c.flow_id, c.reference
FROM verify_new_charges c
LEFT JOIN flows f ON f.flow_id = c.flow_id
WHERE f.flow_id IS NULL
LIMIT $1;

-- name: verify_recent_payouts
-- The payouts new or in another status since they were checked (a payout's charges change
-- only when it is cut or cancelled), and the new charges and those of those payouts.
WITH unchecked AS (
    SELECT p.*
    FROM payouts p
    LEFT JOIN verify_payout_checkpoints k USING (payout_id)
    WHERE k.status IS DISTINCT FROM p.status
), held AS (
    SELECT c.charge_id, c.payout_id, c.amount, c.currency, c.status
    FROM unchecked u
    CROSS JOIN LATERAL (
        SELECT * FROM charges c WHERE c.payout_id = u.payout_id OFFSET 0
    ) c
    UNION
    SELECT charge_id, payout_id, amount, currency, status FROM verify_new_charges
)
SELECT p.payout_id, p.charge_count, p.amount, coalesce(c.charges, 0) AS charges,
       coalesce(c.total, 0) AS charges_total
FROM unchecked p
LEFT JOIN (
    SELECT payout_id, count(*) AS charges, sum(amount) AS total
    FROM held WHERE payout_id IS NOT NULL GROUP BY payout_id
) c USING (payout_id)
WHERE CASE WHEN p.status = 'cancelled' THEN c.charges IS NOT NULL
           ELSE p.charge_count <> coalesce(c.charges, 0) OR p.amount <> coalesce(c.total, 0)
      END
UNION ALL
SELECT c.payout_id, NULL, NULL, c.charge_id, c.amount
FROM held c
LEFT JOIN payouts p USING (payout_id)
WHERE (c.payout_id IS NOT NULL AND p.payout_id IS NULL)
   OR ((c.status = 'paid_out') <> (c.payout_id IS NOT NULL))
   OR p.currency <> c.currency
LIMIT $1;

-- name: verify_recent_alerts
-- A customer's depleted/recovered alerts after its checkpoint, the first following the
-- checkpoint's last alert.
WITH recent AS (
    SELECT a.alert_id, a.customer_ref, a.type, a.previous_balance, a.balance, a.ledger_seq,
           coalesce(lag(a.type) OVER (PARTITION BY a.customer_ref
                                      ORDER BY a.ledger_seq, a.created_at),
                    w.last_alert_type) AS previous_type
    FROM (SELECT DISTINCT customer_ref FROM verify_fresh) t
    JOIN verify_window w USING (customer_ref)
    CROSS JOIN LATERAL (
        SELECT * FROM alerts a
        WHERE a.customer_ref = t.customer_ref AND a.ledger_seq > w.from_seq
          AND a.type IN ('credit_balance_depleted', 'credit_balance_recovered')
        OFFSET 0
    ) a
)
SELECT a.alert_id::text, a.customer_ref, a.type, a.previous_balance, a.balance,
       e.balance_after, a.previous_type
FROM recent a
LEFT JOIN verify_fresh e ON e.customer_ref = a.customer_ref AND e.seq = a.ledger_seq
WHERE e.balance_after IS DISTINCT FROM a.balance
   OR (a.type = 'credit_balance_depleted'
       AND NOT (a.previous_balance > 0 AND a.balance <= 0))
   OR (a.type = 'credit_balance_recovered'
       AND NOT (a.previous_balance <= 0 AND a.balance > 0))
   OR a.type = a.previous_type
   OR (a.previous_type IS NULL AND a.type <> 'credit_balance_recovered')
LIMIT $1;

-- name: verify_recent_alerts_in_outbox
-- An alert and its outbox row are written in one transaction, so each new alert has exactly
-- one new outbox row (unless written before the retention mark: then it may be gone), and
-- each new outbox row of an alert names an alert: a new one, or one that names no ledger
-- position (a reload's, which the window by sequence number does not find); one with a
-- position that is not new would be sent twice.
WITH mark AS (
    SELECT coalesce((SELECT pruned_through FROM outbox_retention), '-infinity') AS since
), emitted_counts AS (
    SELECT alert_id, count(*) AS outbox_rows
    FROM verify_new_outbox WHERE kind = 'alert' GROUP BY alert_id
), recent AS (
    SELECT a.alert_id, a.customer_ref, a.type, a.created_at
    FROM (SELECT DISTINCT customer_ref FROM verify_fresh) t
    JOIN verify_window w USING (customer_ref)
    CROSS JOIN LATERAL (
        SELECT * FROM alerts a
        WHERE a.customer_ref = t.customer_ref AND a.ledger_seq > w.from_seq
        OFFSET 0
    ) a
)
SELECT alert_id::text, coalesce(a.customer_ref, o.customer_ref) AS customer_ref,
       coalesce(a.type, o.type) AS type, coalesce(e.outbox_rows, 0) AS outbox_rows
FROM recent a
FULL JOIN emitted_counts e USING (alert_id)
CROSS JOIN mark
LEFT JOIN LATERAL (
    SELECT x.customer_ref, x.type, x.ledger_seq FROM alerts x
    WHERE a.alert_id IS NULL AND x.alert_id = e.alert_id
    OFFSET 0
) o ON true
WHERE (a.alert_id IS NULL
       AND (o.customer_ref IS NULL OR o.ledger_seq IS NOT NULL OR e.outbox_rows <> 1))
   OR (a.alert_id IS NOT NULL AND a.created_at > mark.since
       AND coalesce(e.outbox_rows, 0) <> 1)
LIMIT $1;

-- name: verify_recent_dead_letters
-- The new dead letters: once per source position, with that position; as many new outbox
-- rows for dead letters as new dead letters (both numbered at the same fence; the outbox
-- rows of dead letters written before the retention mark may be gone).
SELECT d.topic, d.partition, d."offset", n.copies
FROM verify_new_dead_letters d
CROSS JOIN LATERAL (
    SELECT count(*) AS copies FROM dead_letters o
    WHERE o.topic = d.topic AND o.partition = d.partition AND o."offset" = d."offset"
) n
WHERE (n.copies > 1 OR d.topic IS NULL OR d.partition IS NULL OR d."offset" IS NULL)
UNION ALL
SELECT 'outbox rows for dead letters', NULL, NULL, o.rows - d.rows
FROM (SELECT coalesce((SELECT pruned_through FROM outbox_retention), '-infinity') AS since) m,
     LATERAL (SELECT count(*) AS rows FROM verify_new_outbox
              WHERE kind = 'dead_letter' AND created_at > m.since) o,
     LATERAL (SELECT count(*) AS rows FROM verify_new_dead_letters
              WHERE created_at > m.since) d
WHERE o.rows <> d.rows
LIMIT $1;

-- name: verify_recent_advance
-- After a passing run, the checkpoint moves to what this run saw: per customer, grant and
-- payout here, the numbered tables' last numbers (from the fence) in the next statement.
-- Grants add their new deltas to what was recorded: runs are serialized, each starting
-- from the last one's checkpoint.
INSERT INTO verify_customer_checkpoints AS k (customer_ref, seq, balance, overage,
                                              last_alert_type)
SELECT f.customer_ref, max(f.seq), w.from_balance + sum(f.amount),
       w.from_overage + sum(f.overage_delta),
       coalesce((SELECT a.type FROM alerts a
                 WHERE a.customer_ref = f.customer_ref AND a.ledger_seq > w.from_seq
                   AND a.type IN ('credit_balance_depleted', 'credit_balance_recovered')
                 ORDER BY a.ledger_seq DESC, a.created_at DESC LIMIT 1),
                w.last_alert_type)
FROM verify_fresh f
JOIN verify_window w USING (customer_ref)
GROUP BY f.customer_ref, w.from_seq, w.from_balance, w.from_overage, w.last_alert_type
ON CONFLICT (customer_ref) DO UPDATE
SET seq = excluded.seq, balance = excluded.balance, overage = excluded.overage,
    last_alert_type = excluded.last_alert_type;

INSERT INTO verify_grant_checkpoints AS k (grant_id, delta)
SELECT grant_id, sum(grant_delta) FROM verify_fresh WHERE grant_id IS NOT NULL
GROUP BY grant_id
ON CONFLICT (grant_id) DO UPDATE SET delta = k.delta + excluded.delta;

INSERT INTO verify_payout_checkpoints AS k (payout_id, status)
SELECT p.payout_id, p.status
FROM payouts p
LEFT JOIN verify_payout_checkpoints c USING (payout_id)
WHERE c.status IS DISTINCT FROM p.status
ON CONFLICT (payout_id) DO UPDATE SET status = excluded.status;

-- name: verify_recent_advance_numbers
INSERT INTO verify_checkpoint AS k (usage_id_through, charge_id_through,
                                    dead_letter_id_through, outbox_id_through, checked_at)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (singleton) DO UPDATE
SET usage_id_through = excluded.usage_id_through,
    charge_id_through = excluded.charge_id_through,
    dead_letter_id_through = excluded.dead_letter_id_through,
    outbox_id_through = excluded.outbox_id_through,
    checked_at = excluded.checked_at;
