"""Outbound webhooks: every alert, as published on billing.alerts, POSTed to the HTTP
endpoints that asked for its type, signed the Standard Webhooks way
(``workers.webhook_signing``), at least once, in commit order per endpoint and customer.

Each round of the ``webhooks`` worker:

1. **fan-out**: the alert rows of the outbox not yet fanned out (``webhooks_pending``),
   oldest first, become one delivery per live endpoint whose filter takes the alert's type,
   in one transaction under an advisory lock, so delivery ids follow commit order. The
   Kafka relay never waits for this, nor this for the relay.
2. **claim**: as many due deliveries as there are free request slots (never more: nothing
   queues in memory), under a lease, at most ``CHARGELINE_WEBHOOK_ENDPOINT_CONCURRENCY`` in
   flight per endpoint, and only a delivery with no earlier one of its endpoint and customer
   still pending.
3. **send**: each claimed delivery is POSTed in a task of its own, with a timeout; the loop
   does not wait for them, so a slow endpoint holds only its own slots.
4. **record**: finished attempts are written back in one statement as they come: 2xx
   succeeded; anything else (a timeout, a refused connection) is retried after the next
   delay of ``CHARGELINE_WEBHOOK_RETRY_SCHEDULE_S``, and failed once none is left.

A worker that dies mid-request leaves its lease to run out; the delivery is then sent
again, with the same ``webhook-id`` (the ``alert_id``), which receivers dedupe on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp

from workers import db, webhook_signing
from workers.db import Connection, Pool, Row, fetch_one
from workers.lifecycle import PeriodicWorker
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping
from workers.settings import Settings

log = get_logger("chargeline.webhooks")

_FAN_OUT_LOCK_ID = 0x7765626866616E  # "webhfan"
_CLAIM_LOCK_ID = 0x77656268636C6D  # "webhclm"
FAN_OUT_BATCH = 500
"""Outbox rows per fan-out transaction."""
STATS_EVERY_S = 5.0
SHUTDOWN_WAIT_S = 5.0
"""How long a stopping worker lets requests in flight finish before it cuts them short."""
MAX_ERROR_CHARS = 500
USER_AGENT = "chargeline-webhooks"


def lease_s(settings: Settings) -> float:
    """How long a claimed delivery is left to its worker: the request's own time, and as
    much again (and a second) to record its outcome."""
    return 2 * settings.webhook_timeout_s + 1


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of one request: ``ok`` for a 2xx."""

    delivery_id: int
    endpoint_id: int
    ok: bool
    http_status: int | None
    error: str | None


async def fan_out(conn: Connection, limit: int = FAN_OUT_BATCH) -> int:
    """Turn up to ``limit`` alert rows of the outbox into deliveries; the rows handled (0
    when another worker is fanning out right now)."""
    async with conn.transaction():
        if not await conn.fetchval(db.QUERIES["webhook_fan_out_lock"], _FAN_OUT_LOCK_ID):
            return 0
        row = await fetch_one(conn, db.QUERIES["webhook_fan_out"], limit)
    return int(row["rows"])


async def claim(conn: Connection, limit: int, per_endpoint: int, lease: float) -> list[Row]:
    """Up to ``limit`` due deliveries, leased for ``lease`` seconds, with their endpoint's
    URL and secret."""
    async with conn.transaction():
        await conn.execute(db.QUERIES["webhook_claim_lock"], _CLAIM_LOCK_ID)
        return await conn.fetch(db.QUERIES["webhook_claim"], limit, per_endpoint, lease)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout_s:g}s"
    text = str(exc)
    name = type(exc).__name__
    return (f"{name}: {text}" if text else name)[:MAX_ERROR_CHARS]


async def deliver(session: aiohttp.ClientSession, row: Row, timeout_s: float) -> Attempt:
    """POST one claimed delivery; never raises (but when cancelled)."""
    delivery_id, endpoint_id = int(row["delivery_id"]), int(row["endpoint_id"])
    body = bytes(row["payload"])
    headers = webhook_signing.headers(row["secret"], str(row["alert_id"]), int(time.time()), body)
    try:
        async with session.post(
            row["url"],
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            status = response.status
    except Exception as exc:  # whatever went wrong, the attempt failed
        return Attempt(delivery_id, endpoint_id, False, None, _describe(exc, timeout_s))
    ok = 200 <= status < 300
    return Attempt(delivery_id, endpoint_id, ok, status, None if ok else f"HTTP {status}")


class WebhookWorker(PeriodicWorker):
    """Fans alerts out to endpoints and delivers them; see the module's docstring."""

    name = "webhooks"

    def __init__(self, settings: Settings, pool: Pool, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        self.pool = pool
        self.delays = list(settings.webhook_retry_delays)
        self.lease = lease_s(settings)
        self.in_flight: dict[asyncio.Task[Attempt], int] = {}
        self.finished: list[Attempt] = []
        self.wake = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.stats_at = float("-inf")
        self.delivered = 0

    @property
    def interval_s(self) -> float:
        return self.settings.webhook_poll_interval_s

    async def run(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.settings.webhook_concurrency),
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        self.started.set()
        try:
            while not self.stopping.is_set():
                try:
                    more = await self.tick()
                except Stopping:
                    break
                if not more:
                    await self._idle()
        finally:
            await self.close()

    async def tick(self) -> bool:
        await self._record_finished()
        fanned = await self.retry(self._fan_out)
        free = self.settings.webhook_concurrency - len(self.in_flight)
        claimed = 0
        if free > 0:
            rows = await self.retry(lambda: self._claim(free))
            for row in rows:
                self._start(row)
            claimed = len(rows)
        if time.monotonic() - self.stats_at >= STATS_EVERY_S:
            await self.retry(self._refresh_stats)
        return fanned >= FAN_OUT_BATCH or (free > 0 and claimed == free) or bool(self.finished)

    async def _idle(self) -> None:
        """Until the poll interval has passed, a request has finished, or a stop request."""
        if self.finished or self.stopping.is_set():
            return
        self.wake.clear()
        waits = {
            asyncio.ensure_future(self.wake.wait()),
            asyncio.ensure_future(self.stopping.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    # --- the steps ----------------------------------------------------------------------

    async def _fan_out(self) -> int:
        async with self.pool.acquire() as conn:
            return await fan_out(conn)

    async def _claim(self, free: int) -> list[Row]:
        async with self.pool.acquire() as conn:
            return await claim(conn, free, self.settings.webhook_endpoint_concurrency, self.lease)

    def _start(self, row: Row) -> None:
        assert self.session is not None
        task = asyncio.create_task(
            deliver(self.session, row, self.settings.webhook_timeout_s),
            name=f"webhook-delivery-{row['delivery_id']}",
        )
        self.in_flight[task] = int(row["delivery_id"])
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Attempt]) -> None:
        self.in_flight.pop(task, None)
        if task.cancelled():
            return
        if task.exception() is not None:  # deliver() catches everything: a bug
            log.error("webhook_delivery_crashed", error=repr(task.exception()))
            return
        self.finished.append(task.result())
        self.wake.set()

    async def _record_finished(self) -> None:
        if not self.finished:
            return
        batch, self.finished = self.finished, []
        try:
            rows = await self.retry(lambda: self._record(batch))
        except Stopping:
            self.finished = batch + self.finished  # close() tries once more
            raise
        self._count(rows)

    async def _record(self, batch: list[Attempt]) -> list[Row]:
        async with self.pool.acquire() as conn:
            return await conn.fetch(
                db.QUERIES["webhook_record"],
                [a.delivery_id for a in batch],
                [a.ok for a in batch],
                [a.http_status for a in batch],
                [a.error for a in batch],
                self.delays,
            )

    def _count(self, rows: list[Row]) -> None:
        now = time.time()
        for row in rows:
            endpoint = str(row["endpoint_id"])
            status = row["status"]
            if status == "succeeded":
                self.delivered += 1
                self.metrics.webhook_deliveries.labels(endpoint=endpoint, result="succeeded").inc()
                self.metrics.webhook_delivery_lag.observe(max(0.0, row["lag_s"]))
                self.metrics.webhook_last_success.labels(endpoint=endpoint).set(now)
            elif status == "failed":
                self.metrics.webhook_deliveries.labels(endpoint=endpoint, result="failed").inc()
                log.warning(
                    "webhook_delivery_failed",
                    delivery_id=row["delivery_id"],
                    endpoint_id=row["endpoint_id"],
                )
            else:
                self.metrics.webhook_deliveries.labels(endpoint=endpoint, result="retried").inc()
                log.info(
                    "webhook_delivery_retried",
                    delivery_id=row["delivery_id"],
                    endpoint_id=row["endpoint_id"],
                )

    async def _refresh_stats(self) -> None:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(db.QUERIES["webhook_pending_by_endpoint"])
        self.metrics.webhook_pending.set(sum(row["pending"] for row in rows))
        oldest = self.metrics.webhook_oldest_pending
        oldest.clear()  # an endpoint with nothing pending has no oldest delivery
        for row in rows:
            oldest.labels(endpoint=str(row["endpoint_id"])).set(row["oldest_s"])
        self.stats_at = time.monotonic()

    async def close(self) -> None:
        """Let requests in flight finish for a moment, cut the rest short (their leases are
        released, so the next worker sends them at once), record what finished."""
        if self.in_flight:
            await asyncio.wait(
                list(self.in_flight), timeout=min(self.settings.webhook_timeout_s, SHUTDOWN_WAIT_S)
            )
        cut = list(self.in_flight.values())
        tasks = list(self.in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(SHUTDOWN_WAIT_S):
                if self.finished:
                    batch, self.finished = self.finished, []
                    self._count(await self._record(batch))
                if cut:
                    async with self.pool.acquire() as conn:
                        await conn.execute(db.QUERIES["webhook_release"], cut)
        except Exception as exc:  # the leases run out by themselves
            log.warning("webhooks_close_incomplete", error=_describe(exc, SHUTDOWN_WAIT_S))
        if self.session is not None:
            with contextlib.suppress(Exception):
                await self.session.close()
        log.info("webhooks_stopped", delivered=self.delivered, cut_short=len(cut))
