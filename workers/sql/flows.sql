-- name: flow_create
INSERT INTO flows (flow_id, name, payee_ref) VALUES ($1, $2, $3)
ON CONFLICT (flow_id) DO NOTHING
RETURNING flow_id;

-- name: flow_set_status
UPDATE flows SET status = $2, updated_at = now() WHERE flow_id = $1 RETURNING flow_id;

-- name: flow_list
-- Counts and last charge time are computed on read rather than kept in a counter row:
-- a hot per-flow row would serialise every worker's batch on the ingest path.
SELECT f.flow_id, f.name, f.payee_ref, f.status, f.created_at,
       s.last_charge_at, coalesce(s.charge_count, 0) AS charge_count,
       coalesce(s.amounts, '{}'::jsonb) AS amounts
FROM flows f
LEFT JOIN LATERAL (
    SELECT max(c.recorded_at) AS last_charge_at,
           count(*) AS charge_count,
           (SELECT jsonb_object_agg(currency, total) FROM (
                SELECT currency, sum(amount) AS total FROM charges
                WHERE flow_id = f.flow_id GROUP BY currency) t) AS amounts
    FROM charges c WHERE c.flow_id = f.flow_id
) s ON true
WHERE ($1::text IS NULL OR f.flow_id = $1)
ORDER BY f.flow_id;

-- name: api_flow_page
-- The API's page of flows, newest first: created before the cursor's ($1, $2), $3 rows.
SELECT f.flow_id, f.name, f.payee_ref, f.status, f.created_at,
       s.last_charge_at, coalesce(s.charge_count, 0) AS charge_count,
       coalesce(s.amounts, '{}'::jsonb) AS amounts
FROM (
    SELECT * FROM flows
    WHERE $1::timestamptz IS NULL OR (created_at, flow_id) < ($1::timestamptz, $2::text)
    ORDER BY created_at DESC, flow_id DESC
    LIMIT $3
) f
LEFT JOIN LATERAL (
    SELECT max(c.recorded_at) AS last_charge_at,
           count(*) AS charge_count,
           (SELECT jsonb_object_agg(currency, total) FROM (
                SELECT currency, sum(amount) AS total FROM charges
                WHERE flow_id = f.flow_id GROUP BY currency) t) AS amounts
    FROM charges c WHERE c.flow_id = f.flow_id
) s ON true
ORDER BY f.created_at DESC, f.flow_id DESC;
