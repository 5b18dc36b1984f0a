-- chargeline 0019: outbox retention. The relay removes published rows older than
-- CHARGELINE_OUTBOX_RETENTION_S in small batches (never an unpublished one, nor one the
-- webhook fan-out has not read yet), and records here how far it has gone: the newest
-- created_at among the rows it removed. `verify` compares alerts and dead letters with the
-- outbox only after that point, where the outbox still holds every row, so its cost follows
-- the outbox's (bounded) size rather than all history.
CREATE TABLE outbox_retention (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO outbox_retention DEFAULT VALUES;

-- verify reads the alerts and dead letters of the retained window by time.
CREATE INDEX alerts_created_at ON alerts (created_at);
CREATE INDEX dead_letters_created_at ON dead_letters (created_at);
