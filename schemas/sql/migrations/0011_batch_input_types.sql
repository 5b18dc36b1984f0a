-- chargeline 0011: one row type per event table, for the batch statements' input.
--
-- The record_* statements took a batch as one array per column (ten to fifteen arrays).
-- asyncpg encodes an array element by element and asks, for each one, whether it is itself
-- a sub-array (three isinstance checks against collections.abc) for every field of every
-- event, more than a third of the worker's time in the usage statement. An array of rows of
-- these types is checked once per row, and Postgres unnests one array instead of ten.
--
-- The fields are the columns of the statement's input, in the order the handlers build each
-- row (workers/ingest/usage.py, workers/ingest/charges.py). Changing one means a new type under a new name
-- and the statements moved to it, so that workers of the previous release keep working
-- during a rolling upgrade.
CREATE TYPE usage_input AS (
    customer_ref text,
    reference text,
    tokens bigint,
    feature text,
    metadata text,
    occurred_at timestamptz,
    fingerprint bytea,
    source_partition integer,
    source_offset bigint,
    raw_digest bytea
);

CREATE TYPE grant_input AS (
    customer_ref text,
    reference text,
    tokens bigint,
    cost_basis numeric,
    currency text,
    effective_at timestamptz,
    expires_at timestamptz,
    priority integer,
    source text,
    description text,
    fingerprint bytea,
    payload text,
    source_partition integer,
    source_offset bigint,
    raw_digest bytea
);

CREATE TYPE void_input AS (
    customer_ref text,
    reference text,
    grant_reference text,
    reason text,
    fingerprint bytea,
    payload text,
    source_partition integer,
    source_offset bigint,
    raw_digest bytea
);

CREATE TYPE charge_input AS (
    flow_id text,
    reference text,
    customer_ref text,
    amount bigint,
    currency text,
    metadata text,
    occurred_at timestamptz,
    fingerprint bytea,
    payload text,
    source_partition integer,
    source_offset bigint,
    raw_digest bytea
);
