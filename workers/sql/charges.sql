-- name: record_charges
-- One statement per batch: check flows, insert what is new, and report for every input
-- row what Postgres held before. The final SELECT reads the statement's snapshot, so
-- `existing` holds only rows committed before this batch: the rows just inserted are
-- told apart through `inserted`.
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                $7::timestamptz[], $8::bytea[], $9::text[], $10::integer[], $11::bigint[],
                $12::bytea[])
         WITH ORDINALITY
         AS t(flow_id, reference, customer_ref, amount, currency, metadata, occurred_at,
              fingerprint, payload, source_partition, source_offset, raw_digest, ord)
),
flow AS (
    -- FOR SHARE: a concurrent `flows pause` waits for this batch instead of racing it.
    SELECT flow_id, status FROM flows
    WHERE flow_id IN (SELECT flow_id FROM input)
    FOR SHARE
),
inserted AS (
    INSERT INTO charges (flow_id, reference, customer_ref, amount, currency, metadata,
                         occurred_at, fingerprint, payload, source_topic, source_partition,
                         source_offset, raw_digest)
    SELECT i.flow_id, i.reference, i.customer_ref, i.amount, i.currency, i.metadata::json,
           i.occurred_at, i.fingerprint, i.payload::jsonb, $13::text, i.source_partition,
           i.source_offset, i.raw_digest
    FROM input i
    JOIN flow f ON f.flow_id = i.flow_id AND f.status = 'active'
    ORDER BY i.ord
    ON CONFLICT ON CONSTRAINT charges_dedup_key DO NOTHING
    RETURNING charge_id AS new_id, flow_id, reference
)
SELECT i.ord,
       f.status AS flow_status,
       ins.new_id,
       existing.fingerprint AS stored_fingerprint,
       -- The stored payload only where it differs (a conflict): a duplicate's is its own.
       CASE WHEN existing.fingerprint <> i.fingerprint THEN existing.payload::text END
           AS stored_payload
FROM input i
LEFT JOIN flow f ON f.flow_id = i.flow_id
LEFT JOIN inserted ins ON ins.flow_id = i.flow_id AND ins.reference = i.reference
-- An index probe for each row not inserted, to tell a duplicate from a conflict (the
-- condition on ins is a one-time filter: new rows skip the probe). LIMIT 1 keeps the
-- planner from hashing the whole table.
LEFT JOIN LATERAL (
    SELECT * FROM charges e
    WHERE ins.new_id IS NULL
      AND e.flow_id = i.flow_id AND e.reference = i.reference
    LIMIT 1
) existing ON true
ORDER BY i.ord;

-- name: stored_charges
-- The rare second look: keys another transaction inserted while this batch was running.
SELECT c.flow_id, c.reference, c.fingerprint, c.payload::text AS payload
FROM charges c
JOIN unnest($1::text[], $2::text[]) AS k(flow_id, reference)
  ON c.flow_id = k.flow_id AND c.reference = k.reference;
