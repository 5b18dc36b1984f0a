-- chargeline 0021: a flow's charge statistics, in one place. The CLI lists flows by id, the
-- API pages them newest first; both join each flow they return to this function, after
-- their filter and LIMIT, so a page of ten flows computes ten summaries (a view would
-- compute every flow's before sorting them). Counts and the last charge time are computed on
-- read rather than kept in a counter row: a hot per-flow row would serialise every
-- worker's batch on the ingest path.
CREATE FUNCTION flow_charge_summary(flow text)
RETURNS TABLE (last_charge_at timestamptz, charge_count bigint, amounts jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT max(c.recorded_at),
           count(*),
           coalesce((SELECT jsonb_object_agg(currency, total) FROM (
                SELECT currency, sum(amount) AS total FROM charges
                WHERE flow_id = flow GROUP BY currency) t), '{}'::jsonb)
    FROM charges c WHERE c.flow_id = flow
$$;
