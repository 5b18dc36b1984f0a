-- chargeline 0014: API keys of the HTTP API.
--
-- A key is shown once, when it is created; Postgres keeps its lookup part (to find the row
-- without the secret) and a SHA-256 digest of the whole key (compared in constant time).
CREATE TABLE api_keys (
    key_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    prefix       text NOT NULL,
    lookup       text NOT NULL,
    digest       bytea NOT NULL,
    scopes       text[] NOT NULL
                 CHECK (cardinality(scopes) > 0
                        AND scopes <@ ARRAY['ingest', 'read', 'billing', 'admin']),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    CONSTRAINT api_keys_lookup UNIQUE (lookup)
);
