-- chargeline 0013: a grant may become effective at the instant it expires.
--
-- A grant sent without effective_at is effective from when it occurred. When its expiry has
-- already passed by then (an old purchase sent by a backfill), the contract credits it and
-- expires it at once; its effective time is then its expiry, which the strict CHECK of 0002
-- refused, failing the whole batch. Grants that name both times are still held to
-- expires_at > effective_at by the event model. The new CHECK is weaker than the old one, so
-- every existing row satisfies it.
ALTER TABLE grants
    DROP CONSTRAINT IF EXISTS grants_expire_after_effective,
    ADD CONSTRAINT grants_expire_after_effective
        CHECK (expires_at IS NULL OR expires_at >= effective_at);
