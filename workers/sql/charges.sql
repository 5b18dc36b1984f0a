-- name: record_charges
-- One statement per batch: check flows, insert what is new, and report for every input
-- row what Postgres held before. The final SELECT reads the statement's snapshot, so
-- `existing` holds only rows committed before this batch: the rows just inserted are
-- told apart through `inserted`. The report is one row of arrays in input order: asyncpg
-- decodes an array in C, where a row per event cost a Record and its lookups in Python.
WITH input AS (
    SELECT *
    FROM unnest($1::charge_input[]) WITH ORDINALITY
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
           i.occurred_at, i.fingerprint, i.payload::jsonb, $2::text, i.source_partition,
           i.source_offset, i.raw_digest
    FROM input i
    JOIN flow f ON f.flow_id = i.flow_id AND f.status = 'active'
    ORDER BY i.ord
    ON CONFLICT ON CONSTRAINT charges_dedup_key DO NOTHING
    RETURNING charge_id AS new_id, flow_id, reference
)
SELECT array_agg(f.status ORDER BY i.ord) AS flow_statuses,
       array_agg(ins.new_id ORDER BY i.ord) AS new_ids,
       array_agg(existing.fingerprint ORDER BY i.ord) AS stored_fingerprints,
       -- The stored payload only where it differs (a conflict): a duplicate's is its own.
       array_agg(CASE WHEN existing.fingerprint <> i.fingerprint THEN existing.payload::text END
                 ORDER BY i.ord) AS stored_payloads
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
) existing ON true;

-- name: stored_charges
-- The rare second look: keys another transaction inserted while this batch was running.
SELECT c.flow_id, c.reference, c.fingerprint, c.payload::text AS payload
FROM charges c
JOIN unnest($1::text[], $2::text[]) AS k(flow_id, reference)
  ON c.flow_id = k.flow_id AND c.reference = k.reference;
