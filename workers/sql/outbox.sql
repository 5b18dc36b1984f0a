-- name: outbox_next
-- Oldest first: per key, Kafka receives records in the order they were committed here.
SELECT outbox_id, kind, topic, record_key, record_value, headers::text AS headers
FROM outbox
WHERE published_at IS NULL
ORDER BY outbox_id
LIMIT $1;

-- name: outbox_mark_published
UPDATE outbox SET published_at = now() WHERE outbox_id = ANY($1::bigint[]);

-- name: outbox_stats
SELECT count(*)::bigint AS depth,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_age_s
FROM outbox
WHERE published_at IS NULL;

-- name: outbox_try_lead
SELECT pg_try_advisory_lock($1::bigint) AS leader;
