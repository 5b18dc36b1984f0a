-- name: webhook_fan_out_lock
-- One fan-out at a time (held to the end of its transaction), so that delivery ids follow
-- outbox order across workers; a worker that does not get it leaves the round to the other.
SELECT pg_try_advisory_xact_lock($1::bigint);

-- name: webhook_fan_out
-- The next alert rows of the outbox, oldest first, marked done, and one delivery for each
-- live endpoint whose filter takes the alert's type. Rows no endpoint wants are just
-- marked. Deliveries are inserted in outbox order, so per endpoint and customer a lower
-- delivery_id is an earlier commit.
WITH picked AS (
    SELECT outbox_id FROM outbox
    WHERE webhooks_pending
    ORDER BY outbox_id
    LIMIT $1
),
marked AS (
    UPDATE outbox o SET webhooks_pending = false
    FROM picked p
    WHERE o.outbox_id = p.outbox_id AND o.webhooks_pending
    RETURNING o.outbox_id, o.record_value, o.created_at
),
alerts AS (
    SELECT outbox_id, record_value, created_at,
           convert_from(record_value, 'UTF8')::jsonb AS doc
    FROM marked
),
inserted AS (
    INSERT INTO webhook_deliveries (endpoint_id, alert_id, customer_ref, event_type, payload,
                                    alert_created_at)
    SELECT e.endpoint_id, (a.doc ->> 'alert_id')::uuid, a.doc ->> 'customer_ref',
           a.doc ->> 'type', a.record_value, a.created_at
    FROM alerts a
    JOIN webhook_endpoints e
      ON e.removed_at IS NULL AND (e.events IS NULL OR (a.doc ->> 'type') = ANY (e.events))
    ORDER BY a.outbox_id, e.endpoint_id
    ON CONFLICT ON CONSTRAINT webhook_deliveries_once DO NOTHING
    RETURNING delivery_id
)
SELECT (SELECT count(*) FROM marked)::int AS rows,
       (SELECT count(*) FROM inserted)::int AS deliveries;

-- name: webhook_claim_lock
-- Claims are serialized (a short transaction each), so that the per-endpoint cap counts
-- the leases of every worker.
SELECT pg_advisory_xact_lock($1::bigint);

-- name: webhook_claim
-- Up to $1 due deliveries, each under a lease of $3 seconds: per live endpoint, at most
-- $2 in flight (leased) at once, oldest first, and only a delivery with no earlier one of
-- the same endpoint and customer still pending (a receiver sees a customer's alerts in
-- commit order; one that ended failed no longer holds the later ones back).
WITH busy AS (
    SELECT e.endpoint_id,
           $2::int - (SELECT count(*) FROM webhook_deliveries f
                      WHERE f.endpoint_id = e.endpoint_id AND f.status = 'pending'
                        AND f.claimed_until >= now())::int AS free
    FROM webhook_endpoints e
    WHERE e.removed_at IS NULL
),
candidates AS (
    SELECT c.delivery_id
    FROM busy b
    CROSS JOIN LATERAL (
        SELECT d.delivery_id
        FROM webhook_deliveries d
        WHERE d.endpoint_id = b.endpoint_id
          AND d.status = 'pending'
          AND d.next_attempt_at <= now()
          AND (d.claimed_until IS NULL OR d.claimed_until < now())
          AND NOT EXISTS (
              SELECT FROM webhook_deliveries earlier
              WHERE earlier.endpoint_id = d.endpoint_id
                AND earlier.customer_ref = d.customer_ref
                AND earlier.status = 'pending'
                AND earlier.delivery_id < d.delivery_id
          )
        ORDER BY d.delivery_id
        LIMIT greatest(b.free, 0)
    ) c
    WHERE b.free > 0
),
picked AS (
    SELECT d.delivery_id
    FROM webhook_deliveries d
    WHERE d.delivery_id IN (SELECT delivery_id FROM candidates)
      AND d.status = 'pending'
      AND (d.claimed_until IS NULL OR d.claimed_until < now())
    ORDER BY d.delivery_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d
SET claimed_until = now() + make_interval(secs => $3::float8)
FROM picked p, webhook_endpoints e
WHERE d.delivery_id = p.delivery_id AND e.endpoint_id = d.endpoint_id
RETURNING d.delivery_id, d.endpoint_id, d.alert_id, d.customer_ref, d.event_type, d.payload,
          d.attempts, e.url, e.secret;

-- name: webhook_record
-- The outcomes of finished attempts: 2xx succeeded; otherwise the next attempt after
-- $5[attempts] seconds, or failed once the schedule is used up. Only a pending delivery
-- changes: one removed with its endpoint, or already recorded by another worker after its
-- lease ran out, stays as it is.
UPDATE webhook_deliveries d
SET attempts = d.attempts + 1,
    status = CASE
        WHEN r.ok THEN 'succeeded'
        WHEN d.attempts + 1 > cardinality($5::float8[]) THEN 'failed'
        ELSE 'pending'
    END,
    next_attempt_at = CASE
        WHEN r.ok OR d.attempts + 1 > cardinality($5::float8[]) THEN NULL
        ELSE now() + make_interval(secs => ($5::float8[])[d.attempts + 1])
    END,
    delivered_at = CASE WHEN r.ok THEN now() ELSE d.delivered_at END,
    claimed_until = NULL,
    last_status = r.http_status,
    last_error = r.error
FROM unnest($1::bigint[], $2::bool[], $3::int[], $4::text[])
     AS r(delivery_id, ok, http_status, error)
WHERE d.delivery_id = r.delivery_id AND d.status = 'pending'
RETURNING d.delivery_id, d.endpoint_id, d.status,
          extract(epoch FROM now() - d.alert_created_at)::float8 AS lag_s;

-- name: webhook_release
-- Leases of attempts cut short by a shutdown: due again at once, for the next worker.
UPDATE webhook_deliveries SET claimed_until = NULL
WHERE delivery_id = ANY ($1::bigint[]) AND status = 'pending';

-- name: webhook_pending_by_endpoint
-- Per endpoint with anything pending: how many, and how long the oldest has waited (from
-- its alert's commit). An endpoint that has been failing keeps an old delivery pending.
SELECT endpoint_id, count(*)::bigint AS pending,
       extract(epoch FROM now() - min(alert_created_at))::float8 AS oldest_s
FROM webhook_deliveries
WHERE status = 'pending'
GROUP BY endpoint_id;

-- name: webhook_endpoint_create
INSERT INTO webhook_endpoints (url, secret, events)
VALUES ($1, $2, $3::text[])
RETURNING endpoint_id AS id, url, events, created_at;

-- name: webhook_endpoint_list
-- Live endpoints with their deliveries' counts by status; never the secret.
SELECT e.endpoint_id AS id, e.url, e.events, e.created_at,
       count(d.delivery_id) FILTER (WHERE d.status = 'pending')::bigint AS pending,
       count(d.delivery_id) FILTER (WHERE d.status = 'failed')::bigint AS failed,
       max(d.delivered_at) AS last_delivered_at
FROM webhook_endpoints e
LEFT JOIN webhook_deliveries d USING (endpoint_id)
WHERE e.removed_at IS NULL
GROUP BY e.endpoint_id
ORDER BY e.endpoint_id;

-- name: webhook_endpoint_page
-- The API's page of live endpoints, newest first, after the cursor's endpoint_id ($1).
SELECT e.endpoint_id AS id, e.url, e.events, e.created_at,
       count(d.delivery_id) FILTER (WHERE d.status = 'pending')::bigint AS pending,
       count(d.delivery_id) FILTER (WHERE d.status = 'failed')::bigint AS failed,
       max(d.delivered_at) AS last_delivered_at
FROM (
    SELECT * FROM webhook_endpoints
    WHERE removed_at IS NULL AND ($1::bigint IS NULL OR endpoint_id < $1::bigint)
    ORDER BY endpoint_id DESC
    LIMIT $2
) e
LEFT JOIN webhook_deliveries d USING (endpoint_id)
GROUP BY e.endpoint_id, e.url, e.events, e.created_at
ORDER BY e.endpoint_id DESC;

-- name: webhook_endpoint_remove
-- The endpoint stops receiving: its pending deliveries end failed ("endpoint removed").
WITH removed AS (
    UPDATE webhook_endpoints SET removed_at = now()
    WHERE endpoint_id = $1 AND removed_at IS NULL
    RETURNING endpoint_id, url, events, created_at, removed_at
),
dropped AS (
    UPDATE webhook_deliveries d
    SET status = 'failed', next_attempt_at = NULL, claimed_until = NULL,
        last_error = 'endpoint removed'
    FROM removed r
    WHERE d.endpoint_id = r.endpoint_id AND d.status = 'pending'
)
SELECT endpoint_id AS id, url, events, created_at, removed_at FROM removed;

-- name: webhook_delivery_page
-- Deliveries newest first, after the cursor's delivery_id ($3), optionally of one endpoint
-- and in one status.
SELECT delivery_id AS id, endpoint_id, alert_id, customer_ref, event_type, status, attempts,
       next_attempt_at, last_status, last_error, created_at, delivered_at
FROM webhook_deliveries
WHERE ($1::bigint IS NULL OR endpoint_id = $1::bigint)
  AND ($2::text IS NULL OR status = $2::text)
  AND ($3::bigint IS NULL OR delivery_id < $3::bigint)
ORDER BY delivery_id DESC
LIMIT $4;

-- name: webhook_delivery_resend
-- Due again now, with the whole retry schedule ahead (a pending one keeps its count and
-- its lease, if an attempt is in flight). Not for a removed endpoint's deliveries.
UPDATE webhook_deliveries d
SET status = 'pending',
    attempts = CASE WHEN d.status = 'pending' THEN d.attempts ELSE 0 END,
    next_attempt_at = now(),
    delivered_at = NULL
FROM webhook_endpoints e
WHERE d.delivery_id = $1 AND e.endpoint_id = d.endpoint_id AND e.removed_at IS NULL
RETURNING d.delivery_id AS id, d.endpoint_id, d.alert_id, d.customer_ref, d.event_type,
          d.status, d.attempts, d.next_attempt_at, d.last_status, d.last_error, d.created_at,
          d.delivered_at;

-- name: webhook_delivery_endpoint_removed
-- Why a resend found nothing: NULL no such delivery, true its endpoint was removed.
SELECT e.removed_at IS NOT NULL AS endpoint_removed
FROM webhook_deliveries d JOIN webhook_endpoints e USING (endpoint_id)
WHERE d.delivery_id = $1;
