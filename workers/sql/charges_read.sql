-- name: charge_list
SELECT charge_id, flow_id, customer_ref, reference, amount, currency, status,
       metadata::text AS metadata, occurred_at, recorded_at, payout_id
FROM charges
WHERE ($1::text IS NULL OR flow_id = $1)
  AND ($2::text IS NULL OR customer_ref = $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::timestamptz IS NULL OR recorded_at >= $4)
  AND ($5::timestamptz IS NULL OR recorded_at < $5)
ORDER BY recorded_at DESC, charge_id DESC
LIMIT $6;

-- name: charge_show
SELECT charge_id, flow_id, customer_ref, reference, amount, currency, status,
       metadata::text AS metadata, occurred_at, recorded_at, payout_id,
       source_topic, source_partition, source_offset
FROM charges
WHERE ($1::bigint IS NOT NULL AND charge_id = $1)
   OR ($2::text IS NOT NULL AND flow_id = $2 AND reference = $3)
   OR ($2::text IS NULL AND $1::bigint IS NULL AND reference = $3)
ORDER BY charge_id
LIMIT 2;
