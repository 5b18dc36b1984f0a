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

-- name: outbox_prune
-- One small batch of published rows past retention, oldest first, and the mark of how far
-- removal has gone, in one short transaction. Never a row not yet published, nor one the
-- webhook fan-out has not read (it copies what it needs into its deliveries).
WITH doomed AS (
    SELECT outbox_id FROM outbox
    WHERE published_at IS NOT NULL
      AND published_at < now() - make_interval(secs => $1::float8)
      AND NOT webhooks_pending
    ORDER BY outbox_id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM outbox o USING doomed d WHERE o.outbox_id = d.outbox_id
    RETURNING o.created_at
), marked AS (
    UPDATE outbox_retention
    SET pruned_through = greatest(pruned_through, (SELECT max(created_at) FROM gone))
    WHERE EXISTS (SELECT 1 FROM gone)
)
SELECT count(*) AS removed FROM gone;
