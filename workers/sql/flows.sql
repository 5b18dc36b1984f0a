-- name: flow_create
INSERT INTO flows (flow_id, name, payee_ref) VALUES ($1, $2, $3)
ON CONFLICT (flow_id) DO NOTHING
RETURNING flow_id;

-- name: flow_set_status
UPDATE flows SET status = $2, updated_at = now() WHERE flow_id = $1 RETURNING flow_id;

-- name: flow_list
SELECT f.flow_id, f.name, f.payee_ref, f.status, f.created_at, s.*
FROM flows f CROSS JOIN LATERAL flow_charge_summary(f.flow_id) s
WHERE ($1::text IS NULL OR f.flow_id = $1)
ORDER BY f.flow_id;

-- name: api_flow_page
-- The API's page of flows, newest first: created before the cursor's ($1, $2), $3 rows.
SELECT f.flow_id, f.name, f.payee_ref, f.status, f.created_at, s.*
FROM (
    SELECT * FROM flows
    WHERE $1::timestamptz IS NULL OR (created_at, flow_id) < ($1::timestamptz, $2::text)
    ORDER BY created_at DESC, flow_id DESC
    LIMIT $3
) f
CROSS JOIN LATERAL flow_charge_summary(f.flow_id) s
ORDER BY f.created_at DESC, f.flow_id DESC;
