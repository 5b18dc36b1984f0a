-- name: record_usage
-- Dedup rows for usage events, set-wise; reports what was stored before (see charges.sql).
WITH input AS (
    SELECT *
    FROM unnest($1::usage_input[]) WITH ORDINALITY
         AS t(customer_ref, reference, tokens, feature, metadata, occurred_at, fingerprint,
              source_partition, source_offset, raw_digest, ord)
),
inserted AS (
    INSERT INTO usage_events (customer_ref, reference, tokens, feature, metadata, occurred_at,
                              fingerprint, source_topic, source_partition, source_offset,
                              raw_digest)
    SELECT customer_ref, reference, tokens, feature, metadata::json, occurred_at, fingerprint,
           $2::text, source_partition, source_offset, raw_digest
    FROM input
    ORDER BY ord
    ON CONFLICT ON CONSTRAINT usage_events_dedup_key DO NOTHING
    RETURNING usage_id AS new_id, customer_ref, reference
)
SELECT array_agg(ins.new_id ORDER BY i.ord) AS new_ids,
       array_agg(existing.fingerprint ORDER BY i.ord) AS stored_fingerprints,
       -- The stored payload only where it differs (a conflict): a duplicate's is its own.
       array_agg(CASE WHEN existing.fingerprint <> i.fingerprint THEN jsonb_strip_nulls(
           jsonb_build_object(
               'type', 'usage', 'customer_ref', existing.customer_ref,
               'reference', existing.reference, 'tokens', existing.tokens,
               'feature', existing.feature, 'metadata', existing.metadata::jsonb,
               'occurred_at', existing.occurred_at))::text END ORDER BY i.ord)
           AS stored_payloads
FROM input i
LEFT JOIN inserted ins ON ins.customer_ref = i.customer_ref AND ins.reference = i.reference
-- An index probe for each row not inserted, to tell a duplicate from a conflict (the
-- condition on ins is a one-time filter: new rows skip the probe). LIMIT 1 keeps the
-- planner from hashing the whole table.
LEFT JOIN LATERAL (
    SELECT * FROM usage_events e
    WHERE ins.new_id IS NULL
      AND e.customer_ref = i.customer_ref AND e.reference = i.reference
    LIMIT 1
) existing ON true;

-- name: stored_usage
SELECT u.customer_ref, u.reference, u.fingerprint,
       jsonb_build_object('type', 'usage', 'customer_ref', u.customer_ref,
                          'reference', u.reference, 'tokens', u.tokens)::text AS payload
FROM usage_events u
JOIN unnest($1::text[], $2::text[]) AS k(customer_ref, reference)
  ON u.customer_ref = k.customer_ref AND u.reference = k.reference;

-- name: record_grants
WITH input AS (
    SELECT *
    FROM unnest($1::grant_input[]) WITH ORDINALITY
         AS t(customer_ref, reference, tokens, cost_basis, currency, effective_at, expires_at,
              priority, source, description, fingerprint, payload, source_partition,
              source_offset, raw_digest, ord)
),
inserted AS (
    INSERT INTO grants (customer_ref, reference, tokens, cost_basis, currency, effective_at,
                        expires_at, priority, source, description, fingerprint, payload,
                        source_topic, source_partition, source_offset, raw_digest)
    SELECT customer_ref, reference, tokens, cost_basis, currency, effective_at, expires_at,
           priority, source, description, fingerprint, payload::jsonb, $2::text,
           source_partition, source_offset, raw_digest
    FROM input
    ORDER BY ord
    ON CONFLICT ON CONSTRAINT grants_dedup_key DO NOTHING
    RETURNING grant_id AS new_id, customer_ref, reference
)
SELECT array_agg(ins.new_id ORDER BY i.ord) AS new_ids,
       array_agg(existing.fingerprint ORDER BY i.ord) AS stored_fingerprints,
       array_agg(CASE WHEN existing.fingerprint <> i.fingerprint THEN existing.payload::text END
                 ORDER BY i.ord) AS stored_payloads
FROM input i
LEFT JOIN inserted ins ON ins.customer_ref = i.customer_ref AND ins.reference = i.reference
-- An index probe for each row not inserted, to tell a duplicate from a conflict (the
-- condition on ins is a one-time filter: new rows skip the probe). LIMIT 1 keeps the
-- planner from hashing the whole table.
LEFT JOIN LATERAL (
    SELECT * FROM grants e
    WHERE ins.new_id IS NULL
      AND e.customer_ref = i.customer_ref AND e.reference = i.reference
    LIMIT 1
) existing ON true;

-- name: stored_grants
SELECT g.customer_ref, g.reference, g.fingerprint, g.payload::text AS payload
FROM grants g
JOIN unnest($1::text[], $2::text[]) AS k(customer_ref, reference)
  ON g.customer_ref = k.customer_ref AND g.reference = k.reference;

-- name: record_voids
WITH input AS (
    SELECT *
    FROM unnest($1::void_input[]) WITH ORDINALITY
         AS t(customer_ref, reference, grant_reference, reason, fingerprint, payload,
              source_partition, source_offset, raw_digest, ord)
),
inserted AS (
    INSERT INTO credit_voids (customer_ref, reference, grant_reference, reason, fingerprint,
                              payload, source_topic, source_partition, source_offset,
                              raw_digest)
    SELECT customer_ref, reference, grant_reference, reason, fingerprint, payload::jsonb,
           $2::text, source_partition, source_offset, raw_digest
    FROM input
    ORDER BY ord
    ON CONFLICT ON CONSTRAINT credit_voids_dedup_key DO NOTHING
    RETURNING void_id AS new_id, customer_ref, reference
)
SELECT array_agg(ins.new_id ORDER BY i.ord) AS new_ids,
       array_agg(existing.fingerprint ORDER BY i.ord) AS stored_fingerprints,
       array_agg(CASE WHEN existing.fingerprint <> i.fingerprint THEN existing.payload::text END
                 ORDER BY i.ord) AS stored_payloads
FROM input i
LEFT JOIN inserted ins ON ins.customer_ref = i.customer_ref AND ins.reference = i.reference
-- An index probe for each row not inserted, to tell a duplicate from a conflict (the
-- condition on ins is a one-time filter: new rows skip the probe). LIMIT 1 keeps the
-- planner from hashing the whole table.
LEFT JOIN LATERAL (
    SELECT * FROM credit_voids e
    WHERE ins.new_id IS NULL
      AND e.customer_ref = i.customer_ref AND e.reference = i.reference
    LIMIT 1
) existing ON true;

-- name: stored_voids
SELECT v.customer_ref, v.reference, v.fingerprint, v.payload::text AS payload
FROM credit_voids v
JOIN unnest($1::text[], $2::text[]) AS k(customer_ref, reference)
  ON v.customer_ref = k.customer_ref AND v.reference = k.reference;

-- name: drop_voids
-- Voids of unknown grants are dead letters, not ledger events: their dedup rows go.
DELETE FROM credit_voids WHERE void_id = ANY($1::bigint[]);

-- name: lock_customers
-- Create the missing customers and lock the others, returning all of them, in one round
-- trip. Sorted, like every lock taken on customers, so that two transactions touching the
-- same customers cannot deadlock. The parts cannot see each other's rows (one snapshot):
-- the new ones come from `created`, the others from `existing`. A customer that another
-- transaction creates while this statement waits for it is in neither (ON CONFLICT skipped
-- it, the snapshot predates it): the caller runs the statement again for those, whose
-- fresh snapshot holds them committed.
WITH wanted AS (
    SELECT DISTINCT customer_ref FROM unnest($1::text[]) AS t(customer_ref)
),
created AS (
    INSERT INTO customers (customer_ref)
    SELECT customer_ref FROM wanted ORDER BY 1
    ON CONFLICT (customer_ref) DO NOTHING
    RETURNING customer_ref, balance, overage, ledger_seq, low_balance_threshold,
              CASE WHEN auto_reload_enabled THEN reload_threshold END AS reload_threshold
),
existing AS (
    SELECT c.customer_ref, c.balance, c.overage, c.ledger_seq, c.low_balance_threshold,
           CASE WHEN c.auto_reload_enabled THEN c.reload_threshold END AS reload_threshold
    FROM customers c
    WHERE c.customer_ref = ANY($1::text[])
    ORDER BY c.customer_ref
    FOR UPDATE
)
SELECT *, now() AS now FROM created
UNION ALL
SELECT *, now() AS now FROM existing;

-- name: load_open_grants
SELECT grant_id, customer_ref, reference, tokens, remaining, effective_at, expires_at,
       priority, cost_basis, status
FROM grants
WHERE customer_ref = ANY($1::text[])
  AND (status IN ('pending', 'active')
       OR (status = 'used' AND (customer_ref, reference) IN (
               SELECT * FROM unnest($2::text[], $3::text[]))))
ORDER BY grant_id;

-- name: update_balances
-- The grants' tokens left and status, and the customers' balances, in one round trip: the
-- CTE runs whether or not the outer statement reads it. Either array may be empty.
WITH grant_changes AS (
    UPDATE grants g SET remaining = u.remaining, status = u.status
    FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS u(grant_id, remaining, status)
    WHERE g.grant_id = u.grant_id
)
UPDATE customers c
SET balance = u.balance, overage = u.overage, ledger_seq = u.seq, updated_at = now()
FROM unnest($4::text[], $5::bigint[], $6::bigint[], $7::bigint[])
     AS u(customer_ref, balance, overage, seq)
WHERE c.customer_ref = u.customer_ref;

-- name: record_alerts
WITH input AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                $7::text[], $8::text[], $9::bigint[], $10::text[], $11::bytea[])
         WITH ORDINALITY
         AS t(alert_id, type, customer_ref, balance, previous_balance, threshold, cause_type,
              cause_reference, ledger_seq, detail, message, ord)
),
inserted AS (
    INSERT INTO alerts (alert_id, type, customer_ref, balance, previous_balance, threshold,
                        cause_type, cause_reference, ledger_seq, detail)
    SELECT alert_id, type, customer_ref, balance, previous_balance, threshold, cause_type,
           cause_reference, ledger_seq, detail::jsonb
    FROM input
    ORDER BY ord
    ON CONFLICT (alert_id) DO NOTHING
    RETURNING alert_id
)
-- Left for the webhook fan-out only while an endpoint exists: otherwise nothing would ever
-- read the flag, and the outbox's retention keeps flagged rows.
INSERT INTO outbox (kind, topic, record_key, record_value, webhooks_pending)
SELECT 'alert', $12::text, convert_to(i.customer_ref, 'UTF8'), i.message,
       EXISTS (SELECT 1 FROM webhook_endpoints WHERE removed_at IS NULL)
FROM input i JOIN inserted USING (alert_id)
ORDER BY i.ord;

-- name: due_customers
-- Customers with a grant whose expiry or effective time has come and not been applied.
SELECT customer_ref FROM (
    SELECT customer_ref FROM grants
    WHERE expires_at <= now() AND expires_at IS NOT NULL AND status IN ('pending', 'active')
    UNION
    SELECT customer_ref FROM grants WHERE status = 'pending' AND effective_at <= now()
) due
ORDER BY customer_ref
LIMIT $1;

-- name: request_reloads
-- One automatic reload per customer in flight: the partial unique index refuses a second.
INSERT INTO reload_requests (reload_id, customer_ref, kind, tokens, price, currency,
                             cause_reference)
SELECT gen_random_uuid(), c.customer_ref, 'auto', c.reload_tokens, c.reload_price,
       c.reload_currency, r.cause
FROM unnest($1::text[], $2::text[]) AS r(customer_ref, cause)
JOIN customers c USING (customer_ref)
WHERE c.auto_reload_enabled
  AND c.reload_tokens IS NOT NULL AND c.reload_price IS NOT NULL
  AND c.reload_currency IS NOT NULL AND c.stripe_customer_id IS NOT NULL
ORDER BY c.customer_ref
ON CONFLICT (customer_ref) WHERE kind = 'auto' AND status IN ('requested', 'charging')
DO NOTHING
RETURNING reload_id, customer_ref;
