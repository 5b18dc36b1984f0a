-- chargeline 0009: the digest of each event's record value, as it arrived.
--
-- A replay re-reads records Postgres already holds, byte for byte. To tell them from new
-- ones the worker parsed and validated every record (pydantic, the canonical form, its
-- fingerprint): over half of its cost per event, spent to learn "duplicate" again. With the
-- digest (blake2b, 16 bytes) of the record value stored beside each dedup row, a lane that
-- sees mostly duplicates looks its records up by dedup key and digest first, and parses only
-- those Postgres does not hold byte for byte (workers/ingest/known.py).
--
-- Rows written before this migration have none: their re-reads take the full path, judged by
-- fingerprint as before. The digest decides nothing the fingerprint does not: equal bytes
-- are the same event, and any other record of a stored key is parsed and judged as always.
ALTER TABLE charges ADD COLUMN IF NOT EXISTS raw_digest bytea;
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS raw_digest bytea;
ALTER TABLE grants ADD COLUMN IF NOT EXISTS raw_digest bytea;
ALTER TABLE credit_voids ADD COLUMN IF NOT EXISTS raw_digest bytea;
