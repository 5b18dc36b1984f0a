"""Step 4, emit: the relay that publishes outbox rows to Kafka at least once.

Rows were written in the same transaction as the change they report; the relay reads them
oldest first, publishes them with acks=all, waits for every acknowledgement, and only then
marks them published. A crash in between publishes some rows twice, never zero times;
consumers dedupe on the stable ids inside (``alert_id``, ``payout_id``, source position).

One relay publishes at a time (a Postgres advisory lock held by its session), so per-key
order on the output topics is the commit order. Other relays wait as hot standbys.

The leading relay also keeps the table small: published rows older than
``CHARGELINE_OUTBOX_RETENTION_S`` are removed a thousand at a time between publishing
rounds (never an unpublished row, nor one the webhook fan-out has yet to read), and the
newest removed row's time is kept as the mark from which ``verify`` compares the outbox.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from workers import db, kafka
from workers.db import Connection, Pool, fetch_one
from workers.kafka import decode_headers
from workers.lifecycle import WorkerLoop
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping
from workers.settings import Settings

log = get_logger("chargeline.outbox")
_LEADER_LOCK_ID = 0x6F7574626F78  # "outbox"
PRUNE_BATCH = 1000  # rows a removal statement takes: short locks, short transactions
PRUNE_INTERVAL_S = 60.0


def _transient(exc: BaseException) -> bool:
    return db.is_transient(exc) or kafka.is_transient(exc)


class OutboxRelay(WorkerLoop):
    """Publishes outbox rows; never on the ingest path (its own connection and task)."""

    name = "outbox"

    def __init__(self, settings: Settings, pool: Pool, producer: Any, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.pool = pool
        self.producer = producer
        self.published = 0

    async def run(self) -> None:
        await self.retry(self.producer.start, is_transient=kafka.is_transient, component="kafka")
        self.started.set()
        try:
            while not self.stopping.is_set():
                try:
                    await self.retry(
                        self._lead_and_publish, is_transient=_transient, component="outbox"
                    )
                except Stopping:
                    break
        finally:
            await self.producer.stop()
            log.info("outbox_relay_stopped", published=self.published)

    async def _lead_and_publish(self) -> None:
        """Hold the leader lock on one connection and publish until stopped."""
        async with self.pool.acquire() as conn:
            while not await conn.fetchval(db.QUERIES["outbox_try_lead"], _LEADER_LOCK_ID):
                if await self.pause(1.0):
                    return
            log.info("outbox_relay_leading")
            next_prune = time.monotonic()
            try:
                while not self.stopping.is_set():
                    published = await self.publish_once(conn)
                    await self._refresh_stats(conn)
                    if time.monotonic() >= next_prune:
                        # One small batch a round; the next round at once while a batch
                        # comes back full, else after a minute (or the retention, if less).
                        removed = await self.prune_once(conn)
                        if removed < PRUNE_BATCH:
                            next_prune = time.monotonic() + min(
                                PRUNE_INTERVAL_S, self.settings.outbox_retention_s
                            )
                    if published < self.settings.outbox_batch_size and await self.pause(
                        self.settings.outbox_poll_ms / 1000
                    ):
                        return
            finally:
                if not conn.is_closed():
                    await conn.execute("SELECT pg_advisory_unlock($1::bigint)", _LEADER_LOCK_ID)

    async def publish_once(self, conn: Connection) -> int:
        """Publish one page of unpublished rows; return how many."""
        rows = await conn.fetch(db.QUERIES["outbox_next"], self.settings.outbox_batch_size)
        if not rows:
            return 0
        sends = [
            await self.producer.send(
                row["topic"],
                value=row["record_value"],
                key=row["record_key"],
                headers=decode_headers(row["headers"]),
            )
            for row in rows
        ]
        await asyncio.gather(*sends)
        await conn.execute(db.QUERIES["outbox_mark_published"], [row["outbox_id"] for row in rows])
        kinds = Counter(row["kind"] for row in rows)
        for kind, n in kinds.items():
            self.metrics.outbox_published.labels(kind=kind).inc(n)
        self.published += len(rows)
        log.debug(
            "outbox_published",
            rows=len(rows),
            first_id=rows[0]["outbox_id"],
            last_id=rows[-1]["outbox_id"],
            kinds=dict(kinds),
        )
        return len(rows)

    async def prune_once(self, conn: Connection) -> int:
        """Remove one batch of published rows past retention; how many went."""
        removed: int = await conn.fetchval(
            db.QUERIES["outbox_prune"], self.settings.outbox_retention_s, PRUNE_BATCH
        )
        if removed:
            self.metrics.outbox_pruned.inc(removed)
            log.debug("outbox_pruned", rows=removed)
        return removed

    async def _refresh_stats(self, conn: Connection) -> None:
        stats = await fetch_one(conn, db.QUERIES["outbox_stats"])
        self.metrics.outbox_depth.set(stats["depth"])
        self.metrics.outbox_oldest_age.set(stats["oldest_age_s"])
