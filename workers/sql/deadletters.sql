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
SELECT dead_letter_id AS id, reason, topic, partition, "offset", detail, created_at,
       replayed_at, record_key
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1)
  AND ($2::timestamptz IS NULL OR created_at >= $2)
ORDER BY dead_letter_id DESC
LIMIT $3;
