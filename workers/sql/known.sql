-- name: known_records
-- The ordinal of every input record Postgres holds under its dedup key with the same raw
-- digest (workers/known.py): one index probe each, in the table of its type.
SELECT k.ord
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) WITH ORDINALITY
     AS k(type, key_1, key_2, digest, ord)
WHERE CASE k.type
    WHEN 'usage' THEN EXISTS (
        SELECT FROM usage_events e
        WHERE e.customer_ref = k.key_1 AND e.reference = k.key_2 AND e.raw_digest = k.digest)
    WHEN 'charge' THEN EXISTS (
        SELECT FROM charges e
        WHERE e.flow_id = k.key_1 AND e.reference = k.key_2 AND e.raw_digest = k.digest)
    WHEN 'credit_grant' THEN EXISTS (
        SELECT FROM grants e
        WHERE e.customer_ref = k.key_1 AND e.reference = k.key_2 AND e.raw_digest = k.digest)
    WHEN 'credit_void' THEN EXISTS (
        SELECT FROM credit_voids e
        WHERE e.customer_ref = k.key_1 AND e.reference = k.key_2 AND e.raw_digest = k.digest)
    ELSE false
END;
