-- name: api_key_create
INSERT INTO api_keys (name, prefix, lookup, digest, scopes)
VALUES ($1, $2, $3, $4, $5::text[])
RETURNING key_id, name, prefix, scopes, created_at;

-- name: api_key_list
SELECT key_id AS id, name, prefix, scopes, created_at, last_used_at, revoked_at
FROM api_keys
ORDER BY key_id;

-- name: api_key_revoke
UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
WHERE key_id = $1
RETURNING key_id AS id, name, prefix, scopes, created_at, last_used_at, revoked_at;

-- name: api_key_lookup
SELECT key_id, digest, scopes, revoked_at IS NOT NULL AS revoked
FROM api_keys
WHERE lookup = $1;

-- name: api_keys_used
-- The keys used since the last flush, each with the last time it was seen: one statement
-- for all of them, not a write per request.
UPDATE api_keys k SET last_used_at = greatest(k.last_used_at, u.at)
FROM unnest($1::bigint[], $2::timestamptz[]) AS u(key_id, at)
WHERE k.key_id = u.key_id;

-- name: api_flow_status
SELECT status FROM flows WHERE flow_id = $1;

-- name: api_charge_verdicts
-- What Postgres holds for the charges requests are waiting on: the charge recorded under
-- each key (if any) with the fields the answer shows, and the dead letter at each
-- record's position (if any).
SELECT w.ord, c.charge_id, c.flow_id, c.customer_ref, c.reference, c.amount, c.currency,
       c.status, c.metadata, c.occurred_at, c.recorded_at, c.payout_id,
       c.fingerprint, c.source_topic, c.source_partition, c.source_offset, d.reason
FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[]) WITH ORDINALITY
     AS w(flow_id, reference, partition, "offset", ord)
LEFT JOIN charges c ON c.flow_id = w.flow_id AND c.reference = w.reference
LEFT JOIN dead_letters d
  ON d.topic = $5::text AND d.partition = w.partition AND d."offset" = w."offset";

-- name: api_charge
SELECT c.charge_id, c.flow_id, c.customer_ref, c.reference, c.amount, c.currency, c.status,
       c.metadata, c.occurred_at, c.recorded_at, c.payout_id
FROM charges c
WHERE c.charge_id = $1;
