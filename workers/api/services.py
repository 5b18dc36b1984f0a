"""What the API's routes use: a Postgres pool, a Kafka producer (acks from all in-sync
replicas), the flow cache, the key store and the verdict waiter. Started once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from workers import db, kafka
from workers.api import keys
from workers.api.documents import CHARGE_COLUMNS, charge_document
from workers.api.envelope import ApiError
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings
from workers.stripe_gateway import StripeGateway

log = get_logger("chargeline.api")

FLOW_CACHE_S = 1.0  # a pause is seen within this long
KEY_USE_FLUSH_S = 5.0  # last_used_at is written at most this often
PUBLISH_TIMEOUT_S = 10.0  # the broker's acknowledgement, or 503
# A statement's answer, or 503: a Postgres that has stopped answering (frozen, a network
# partition) must not hold a request for the workers' two minutes.
STATEMENT_TIMEOUT_S = 10.0
WAIT_POLL_S = 0.05  # how often the waiter asks Postgres, for all waiting requests at once
UNAVAILABLE = {"Retry-After": "5"}
READY_TIMEOUT_S = 2.0


def unavailable(what: str) -> ApiError:
    return ApiError(
        503, "service_unavailable", f"{what} is unavailable; try again", headers=UNAVAILABLE
    )


@dataclass
class Key:
    key_id: int
    scopes: frozenset[str]


class Services:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool: db.Pool | None = None
        self.stripe = StripeGateway(settings, metrics)
        self.producer: Any = None
        self.producer_ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.flows: dict[str, tuple[float, str | None]] = {}
        self.keys: dict[bytes, tuple[float, Key]] = {}
        self.key_uses: dict[int, datetime] = {}
        self.waiter = VerdictWaiter(self)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def ready(self) -> bool:
        return self.pool is not None and self.producer_ready.is_set()

    async def dependencies_answer(self) -> dict[str, bool]:
        """Whether Postgres and the broker each answer a request within READY_TIMEOUT_S:
        what /readyz reports, so that a load balancer stops sending requests that would be
        503s."""
        if not self.ready:
            return {"postgres": False, "kafka": False}

        async def postgres() -> bool:
            assert self.pool is not None
            async with asyncio.timeout(READY_TIMEOUT_S), self.pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
            return True

        async def kafka() -> bool:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self.producer.client.fetch_all_metadata()
            return True

        pg, broker = await asyncio.gather(postgres(), kafka(), return_exceptions=True)
        return {"postgres": pg is True, "kafka": broker is True}

    async def start(self) -> None:
        self.pool = await db.create_pool(
            self.settings.dsn, min_size=1, max_size=8, command_timeout=STATEMENT_TIMEOUT_S
        )
        # No linger: a request waits for its acknowledgement, and concurrent requests share
        # a batch anyway while the one before is in flight.
        self.producer = kafka.make_producer(self.settings, client_id="chargeline-api", linger_ms=0)
        self._tasks = [
            asyncio.create_task(self._start_producer(), name="api-producer"),
            asyncio.create_task(self._flush_key_uses(), name="api-key-uses"),
            asyncio.create_task(self.waiter.run(), name="api-waiter"),
        ]

    async def stop(self) -> None:
        self.stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._write_key_uses()
        if self.producer_ready.is_set():
            await self.producer.stop()
        if self.pool is not None:
            await self.pool.close()
        await self.stripe.close()

    async def _start_producer(self) -> None:
        with contextlib.suppress(Stopping):
            await retry_transient(
                self.producer.start,
                is_transient=kafka.is_transient,
                component="kafka",
                settings=self.settings,
                metrics=self.metrics,
                stopping=self.stopping,
            )
            self.producer_ready.set()
            log.info("api_producer_started")

    # --- keys ---

    async def authenticate(self, presented: str) -> Key | None:
        """The key, or None for an unknown, wrong or revoked one. Its use is noted.

        A key found good is trusted for keys.CACHE_S without asking Postgres again (the hot
        path makes no query for it); ``api-keys revoke`` waits that long before it returns,
        so a revoked key is refused everywhere once the command is done. Unknown keys are
        never cached: a key created a moment ago works at once."""
        digest = keys.digest(presented)
        now = time.monotonic()
        cached = self.keys.get(digest)
        if cached is not None and now - cached[0] < keys.CACHE_S:
            key = cached[1]
        else:
            found = await self._key_from_database(presented)
            if found is None:
                self.keys.pop(digest, None)
                return None
            if len(self.keys) > 10_000:
                self.keys.clear()
            self.keys[digest] = (now, found)
            key = found
        self.key_uses[key.key_id] = datetime.now(UTC)
        return key

    async def _key_from_database(self, presented: str) -> Key | None:
        lookup = keys.lookup_of(presented)
        if lookup is None:
            return None
        row = await self.fetchrow(db.QUERIES["api_key_lookup"], lookup)
        if row is None or row["revoked"] or not keys.matches(presented, row["digest"]):
            return None
        return Key(row["key_id"], frozenset(row["scopes"]))

    async def _flush_key_uses(self) -> None:
        while True:
            await asyncio.sleep(KEY_USE_FLUSH_S)
            with contextlib.suppress(Exception):  # an outage: kept for the next flush
                await self._write_key_uses()

    async def _write_key_uses(self) -> None:
        if not self.key_uses or self.pool is None:
            return
        uses, self.key_uses = self.key_uses, {}
        try:
            async with self.pool.acquire() as conn:
                await conn.execute(db.QUERIES["api_keys_used"], list(uses), list(uses.values()))
        except Exception:
            for key_id, at in uses.items():
                self.key_uses.setdefault(key_id, at)
            raise

    # --- flows ---

    async def flow_status(self, flow_id: str) -> str | None:
        """``active``, ``paused`` or None (no such flow), at most FLOW_CACHE_S old."""
        now = time.monotonic()
        cached = self.flows.get(flow_id)
        if cached is not None and now - cached[0] < FLOW_CACHE_S:
            return cached[1]
        status = await self.fetchval(db.QUERIES["api_flow_status"], flow_id)
        if len(self.flows) > 10_000:
            self.flows.clear()
        self.flows[flow_id] = (now, status)
        return None if status is None else str(status)

    # --- Postgres, with outages answered 503 ---

    async def fetchrow(self, query: str, *args: Any) -> db.Row | None:
        row: db.Row | None = await self._call(lambda conn: conn.fetchrow(query, *args))
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._call(lambda conn: conn.fetchval(query, *args))

    async def fetch(self, query: str, *args: Any) -> list[db.Row]:
        return await self._call(lambda conn: conn.fetch(query, *args))  # type: ignore[no-any-return]

    async def _call(self, operation: Any) -> Any:
        if self.pool is None:
            raise unavailable("Postgres")
        try:
            async with self.pool.acquire(timeout=5) as conn:
                return await operation(conn)
        except Exception as exc:
            if db.is_transient(exc):
                raise unavailable("Postgres") from exc
            if _is_data_exception(exc):
                # A parameter Postgres cannot take (a NUL in text, a number out of range):
                # the request's fault, whatever route it came by.
                raise ApiError(
                    422, "invalid_request", "a parameter holds a value that cannot be used"
                ) from exc
            raise

    # --- Kafka ---

    async def publish(self, topic: str, key: bytes, value: bytes) -> Any:
        """Send one record; its metadata once the broker has acknowledged it."""
        return (await self.publish_many([(topic, key, value)]))[0]

    async def publish_many(self, records: list[tuple[str, bytes, bytes]]) -> list[Any]:
        """Send ``(topic, key, value)`` records; their metadata once the broker has
        acknowledged every one, or 503 when it has not within PUBLISH_TIMEOUT_S. One
        deadline for all: no timer or task per record."""
        if not self.producer_ready.is_set():
            raise unavailable("Kafka")
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                acks = [
                    await self.producer.send(topic, value=value, key=key)
                    for topic, key, value in records
                ]
                return list(await asyncio.gather(*acks))
        except Exception as exc:
            if kafka.is_transient(exc) or isinstance(exc, TimeoutError):
                raise unavailable("Kafka") from exc
            raise


def _is_data_exception(exc: BaseException) -> bool:
    import asyncpg

    sqlstate = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and sqlstate.startswith("22")


@dataclass
class _Waiting:
    flow_id: str
    reference: str
    partition: int
    offset: int
    done: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class VerdictWaiter:
    """Waits for the worker's verdict on charges the API published (``Prefer: wait``).

    One loop asks Postgres about every waiting charge at once, WAIT_POLL_S apart and only
    while someone waits: the charge recorded under its key, or a dead letter at its record's
    position. A request is answered as soon as either exists.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.waiting: list[_Waiting] = []
        self.wake = asyncio.Event()

    async def wait(
        self, flow_id: str, reference: str, partition: int, offset: int, seconds: float
    ) -> dict[str, Any] | None:
        entry = _Waiting(flow_id, reference, partition, offset)
        self.waiting.append(entry)
        self.wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(entry.done), seconds)
        except TimeoutError:
            return None
        finally:
            if entry in self.waiting:
                self.waiting.remove(entry)

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            if not self.waiting:
                self.wake.clear()
                continue
            with contextlib.suppress(Exception):  # an outage: the requests time out, 202
                await self._poll()
            await asyncio.sleep(WAIT_POLL_S)

    async def _poll(self) -> None:
        batch = list(self.waiting)
        rows = await self.services.fetch(
            db.QUERIES["api_charge_verdicts"],
            [w.flow_id for w in batch],
            [w.reference for w in batch],
            [w.partition for w in batch],
            [w.offset for w in batch],
            self.services.settings.topic_charges,
        )
        for row in rows:
            entry = batch[row["ord"] - 1]
            if entry.done.done():
                continue
            if row["reason"] is not None:
                entry.done.set_result({"dead_letter": row["reason"]})
            elif row["charge_id"] is not None:
                entry.done.set_result(
                    {
                        "charge": charge_document(row, CHARGE_COLUMNS),
                        "fingerprint": bytes(row["fingerprint"]),
                        "position": (
                            row["source_topic"],
                            row["source_partition"],
                            row["source_offset"],
                        ),
                    }
                )
