"""The expiry worker: at a grant's ``expires_at`` its remainder expires (a ledger entry,
maybe a depleted alert); at a deferred grant's ``effective_at`` it is credited. Same ledger,
same locks and same alert path as the usage worker, so the two never disagree.

The usage worker also brings each customer it touches up to date before applying an event,
so this worker matters for customers with no traffic; several may run at once (customer
rows are locked in sorted order).
"""

from __future__ import annotations

from workers import db
from workers.db import Pool
from workers.ledger.store import load_ledger, write_ledger
from workers.lifecycle import PeriodicWorker
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings

log = get_logger("chargeline.expiry")


class ExpiryWorker(PeriodicWorker):
    name = "expiry"

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.pool = pool
        self.expired_entries = 0

    @property
    def interval_s(self) -> float:
        return self.settings.expiry_interval_s

    async def tick(self) -> bool:
        done = await self.retry(self.run_once)
        return done >= self.settings.expiry_batch_size  # a full round: more may be due

    async def run_once(self) -> int:
        """Bring due customers up to date, one transaction; return how many."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(db.QUERIES["due_customers"], self.settings.expiry_batch_size)
            refs = [row["customer_ref"] for row in rows]
            if not refs:
                return 0
            ledger = await load_ledger(conn, refs)
            for ref in refs:
                ledger.tick(ref)
            await write_ledger(conn, ledger, alerts_topic=self.settings.topic_alerts)
        for alert in ledger.changes.alerts:
            self.metrics.alerts.labels(type=alert.type).inc()
        entries = ledger.changes.entries
        self.expired_entries += len(entries)
        log.info(
            "grants_due_applied",
            customers=len(refs),
            entries=len(entries),
            alerts=len(ledger.changes.alerts),
        )
        return len(refs)
