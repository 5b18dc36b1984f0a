-- name: record_dead_letters
-- One row per source position, ever: a redelivered record finds its row already there and
-- adds nothing, neither in dead_letters nor in the outbox that feeds billing.dlq.
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::bytea[], $5::bytea[], $6::text[],
                $7::timestamptz[], $8::text[], $9::text[], $10::bytea[], $11::text[])
         WITH ORDINALITY
         AS t(topic, partition, "offset", record_key, record_value, record_headers,
              record_timestamp, reason, detail, dlq_value, dlq_headers, ord)
),
inserted AS (
    INSERT INTO dead_letters (topic, partition, "offset", record_key, record_value,
                              record_headers, record_timestamp, reason, detail)
    SELECT topic, partition, "offset", record_key, record_value, record_headers::jsonb,
           record_timestamp, reason, detail
    FROM input
    ORDER BY ord
    ON CONFLICT ON CONSTRAINT dead_letters_source_position DO NOTHING
    RETURNING topic, partition, "offset", reason
),
emitted AS (
    INSERT INTO outbox (kind, topic, record_key, record_value, headers)
    SELECT 'dead_letter', $12::text, i.record_key, i.dlq_value, i.dlq_headers::jsonb
    FROM input i
    JOIN inserted USING (topic, partition, "offset")
    ORDER BY i.ord
)
SELECT reason, count(*)::integer AS recorded FROM inserted GROUP BY reason;

-- name: dead_lettered_positions
-- Which of these positions of one topic already hold a dead letter.
SELECT d.partition, d."offset"
FROM dead_letters d
JOIN unnest($2::integer[], $3::bigint[]) AS p(partition, "offset")
  ON d.topic = $1::text AND d.partition = p.partition AND d."offset" = p."offset";

-- name: record_conflicts
INSERT INTO conflicts (event_type, dedup_key, original_payload, conflicting_payload,
                       topic, partition, "offset")
SELECT event_type, string_to_array(dedup_key, E'\x1f'), original::jsonb, conflicting::jsonb,
       topic, partition, "offset"
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::integer[],
            $7::bigint[])
     AS t(event_type, dedup_key, original, conflicting, topic, partition, "offset")
ON CONFLICT ON CONSTRAINT conflicts_source_position DO NOTHING;

-- name: dead_letter_list
-- $4: true = replayed only, false = not yet replayed only, NULL = both.
SELECT dead_letter_id AS id, reason, topic, partition, "offset", detail, created_at,
       replayed_at, record_key
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1)
  AND ($2::timestamptz IS NULL OR created_at >= $2)
  AND ($4::boolean IS NULL OR (replayed_at IS NOT NULL) = $4)
ORDER BY dead_letter_id DESC
LIMIT $3;

-- name: dead_letters_to_replay
-- One page of dead letters not yet replayed, oldest first, locked until the page's
-- transaction ends: two `dlq replay` runs at once take disjoint pages (SKIP LOCKED), and
-- `replayed_at IS NULL` keeps a later run from taking them again. $1 is the last id of
-- the previous page (keyset paging: rows left unreplayed are not read again).
SELECT dead_letter_id AS id, reason, topic, partition, "offset", record_key, record_value,
       record_headers::text AS record_headers, created_at
FROM dead_letters
WHERE replayed_at IS NULL
  AND dead_letter_id > $1
  AND ($2::text[] IS NULL OR reason = ANY($2))
  AND ($3::bigint[] IS NULL OR dead_letter_id = ANY($3))
  AND ($4::timestamptz IS NULL OR created_at >= $4)
ORDER BY dead_letter_id
LIMIT $5
FOR UPDATE SKIP LOCKED;

-- name: dead_letters_mark_replayed
UPDATE dead_letters SET replayed_at = now()
WHERE dead_letter_id = ANY($1::bigint[]) AND replayed_at IS NULL;

-- name: dead_letters_by_id
-- For `dlq replay --ids`: which of the ids exist, and which were replayed already.
SELECT dead_letter_id AS id, replayed_at
FROM dead_letters
WHERE dead_letter_id = ANY($1::bigint[]);

-- name: flow_statuses
SELECT flow_id, status FROM flows WHERE flow_id = ANY($1::text[]);

-- name: voidable_grants
-- Which of the (customer_ref, grant reference) pairs name a grant a void can still apply to.
SELECT g.customer_ref, g.reference
FROM grants g
JOIN unnest($1::text[], $2::text[]) AS w(customer_ref, reference)
  ON g.customer_ref = w.customer_ref AND g.reference = w.reference
WHERE g.status IN ('pending', 'active', 'used');
