-- name: known_records
-- The position of every input record ($1: a JSON array of {i: position, t: type, a and b:
-- the dedup key, d: the raw digest in hex}) that Postgres holds under its dedup key with
-- the same raw digest (workers/ingest/known.py): one index probe each, in the table of its type.
SELECT k.i
FROM json_to_recordset($1::json) AS k(i integer, t text, a text, b text, d text)
WHERE CASE k.t
    WHEN 'usage' THEN EXISTS (
        SELECT FROM usage_events e
        WHERE e.customer_ref = k.a AND e.reference = k.b AND e.raw_digest = decode(k.d, 'hex'))
    WHEN 'charge' THEN EXISTS (
        SELECT FROM charges e
        WHERE e.flow_id = k.a AND e.reference = k.b AND e.raw_digest = decode(k.d, 'hex'))
    WHEN 'credit_grant' THEN EXISTS (
        SELECT FROM grants e
        WHERE e.customer_ref = k.a AND e.reference = k.b AND e.raw_digest = decode(k.d, 'hex'))
    WHEN 'credit_void' THEN EXISTS (
        SELECT FROM credit_voids e
        WHERE e.customer_ref = k.a AND e.reference = k.b AND e.raw_digest = decode(k.d, 'hex'))
    ELSE false
END;
