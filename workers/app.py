"""Process composition: ``main`` only composes. Settings, logger, pool, consumer, workers,
metrics server and signal handling are built here and shut down in reverse order."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers import db
from workers.errors import ConfigurationError
from workers.http import start_http
from workers.ingest.charges import ChargesHandler
from workers.ingest.consumer import ConsumerLoop, tune_gc_for_batches
from workers.ingest.processor import BatchProcessor, Handler
from workers.ingest.usage import UsageHandler
from workers.jobs.expiry import ExpiryWorker
from workers.jobs.monitor import LagMonitor
from workers.jobs.outbox import OutboxRelay
from workers.jobs.payouts import PayoutWorker
from workers.jobs.reloads import ReloadWorker
from workers.jobs.verify import VerifyWorker
from workers.jobs.webhooks import WebhookWorker
from workers.kafka import make_consumer, make_producer
from workers.kinds import INGEST_KINDS, PERIODIC_KINDS, WORKER_KINDS
from workers.lifecycle import WorkerLoop
from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings

log = get_logger("chargeline.app")

# `all` runs every kind in one process: ingest handlers share one consumer (one group
# member); the relay and the periodic workers run beside it, each on its own pooled
# connection, so none of them blocks ingestion.
PERIODIC_WORKERS: dict[str, Callable[[Settings, Any, Metrics], Any]] = {
    "expiry": ExpiryWorker,
    "reloads": ReloadWorker,
    "payouts": PayoutWorker,
    "webhooks": WebhookWorker,
    "monitor": LagMonitor,
    "verify": VerifyWorker,
}
assert tuple(PERIODIC_WORKERS) == PERIODIC_KINDS


def build_handlers(settings: Settings, kinds: Sequence[str]) -> list[Handler]:
    handlers: list[Handler] = []
    if "charges" in kinds:
        handlers.append(ChargesHandler(settings.topic_charges))
    if "usage" in kinds:
        handlers.append(UsageHandler(settings.topic_usage, settings.topic_alerts))
    return handlers


@dataclass
class WorkerProcess:
    """The running parts of one worker process."""

    settings: Settings
    kinds: tuple[str, ...]
    metrics: Metrics = field(default_factory=Metrics)
    loops: list[WorkerLoop] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        """Drain and stop; also valid before the loops exist (they then stop at once)."""
        self.stopped.set()
        for loop in self.loops:
            loop.stop()

    @property
    def ingest(self) -> ConsumerLoop | None:
        """The loop consuming the input topics, once started (None without one)."""
        return next((loop for loop in self.loops if isinstance(loop, ConsumerLoop)), None)

    def is_ready(self) -> bool:
        return bool(self.loops) and all(loop.ready for loop in self.loops)

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        settings = self.settings
        # `all` is everything but verify: a full check of every invariant is for one
        # dedicated process (or `chargeline verify`), not for every worker replica.
        kinds = (
            set(WORKER_KINDS) - {"all", "verify"} | set(self.kinds) - {"all"}
            if "all" in self.kinds
            else set(self.kinds)
        )
        # A connection for each lane of each ingest topic, one for each other loop (the relay
        # keeps one for its leader lock) and a spare, so a periodic worker never makes the
        # ingest loop wait for a connection.
        ingest = kinds & set(INGEST_KINDS)
        connections = len(ingest) * settings.batch_lanes + len(kinds - ingest) + 1
        pool = await db.create_pool(settings.dsn, min_size=1, max_size=connections)
        try:
            handlers = build_handlers(settings, sorted(ingest))
            if handlers:
                tune_gc_for_batches()
                processor = BatchProcessor(settings, handlers, self.metrics)
                consumer = make_consumer(
                    settings, group_id=settings.consumer_group, client_id="chargeline-ingest"
                )
                self.loops.append(
                    ConsumerLoop(
                        settings,
                        pool,
                        processor,
                        self.metrics,
                        consumer,
                        name="+".join(handler.name for handler in handlers),
                    )
                )
            if "outbox" in kinds:
                producer = make_producer(settings, client_id="chargeline-outbox")
                self.loops.append(OutboxRelay(settings, pool, producer, self.metrics))
            for kind, worker in PERIODIC_WORKERS.items():
                if kind in kinds:
                    self.loops.append(worker(settings, pool, self.metrics))
            runner = None
            if settings.metrics_port:
                try:
                    runner = await start_http(
                        self.metrics,
                        host=settings.metrics_host,
                        port=settings.metrics_port,
                        is_ready=self.is_ready,
                    )
                except OSError as exc:  # not Postgres's: say whose address it is
                    raise ConfigurationError(
                        f"cannot serve /metrics on {settings.metrics_host}:"
                        f"{settings.metrics_port} (CHARGELINE_METRICS_PORT): {exc.strerror or exc}"
                    ) from None
                log.info("metrics_listening", port=settings.metrics_port)
            if install_signal_handlers:
                running = asyncio.get_running_loop()
                for signum in (signal.SIGTERM, signal.SIGINT):
                    running.add_signal_handler(signum, self._on_signal, signum)
            try:
                await self._run_loops()
            finally:
                if runner is not None:
                    await runner.cleanup()
        finally:
            await pool.close()

    def _on_signal(self, signum: int) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        self.stop()

    async def _run_loops(self) -> None:
        if self.stopped.is_set():
            self.stop()
        tasks = [asyncio.create_task(loop.run(), name=loop.name) for loop in self.loops]
        stop_requested = asyncio.create_task(self.stopped.wait())
        try:
            # Until a stop is requested or a loop dies: a loop that dies takes the process
            # down (a half-running worker is worse than a restarted one, and the orchestrator
            # restarts it).
            running: set[asyncio.Task[Any]] = set(tasks)
            while running and not self.stopped.is_set():
                done, running = await asyncio.wait(
                    running | {stop_requested}, return_when=asyncio.FIRST_COMPLETED
                )
                running.discard(stop_requested)
                if any(t in tasks and not t.cancelled() and t.exception() for t in done):
                    break
        finally:
            stop_requested.cancel()
            self.stop()
            # The deadline runs from the stop request, whatever the loops are waiting for.
            try:
                await asyncio.wait_for(
                    asyncio.gather(*tasks, return_exceptions=True),
                    timeout=self.settings.shutdown_timeout_s,
                )
            except TimeoutError:
                log.error(  # noqa: TRY400 -- no exception here, a deadline passed
                    "shutdown_timeout", timeout_s=self.settings.shutdown_timeout_s
                )
                for task in tasks:
                    task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
