"""What every loop of a worker process shares: a stop request, readiness, sleeps that a
stop request cuts short, and retries that give up when the process is stopping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from workers import db
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings

T = TypeVar("T")


class WorkerLoop:
    """Base of the ingest loop, the outbox relay and the periodic workers.

    ``WorkerProcess`` starts ``run()`` as a task, asks it to ``stop()`` on SIGTERM, and
    reports the process ready while every loop is ``ready``.
    """

    name: str

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()

    async def run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()

    @property
    def ready(self) -> bool:
        return self.started.is_set() and not self.stopping.is_set()

    async def unless_stopped(self, operation: Awaitable[T]) -> T | None:
        """``operation``'s result, or None when a stop is requested first (``operation`` is
        then cancelled). For waits with no deadline of their own, such as a group join."""
        task = asyncio.ensure_future(operation)
        stop_requested = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stop_requested.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    async def pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was requested (at once if it was)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        return self.stopping.is_set()

    async def retry(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        is_transient: Callable[[BaseException], bool] = db.is_transient,
        component: str = "postgres",
        max_attempts: int | None = None,
    ) -> T:
        """``operation`` retried through outages; ``Stopping`` once a stop is requested."""
        return await retry_transient(
            operation,
            is_transient=is_transient,
            component=component,
            settings=self.settings,
            metrics=self.metrics,
            stopping=self.stopping,
            max_attempts=max_attempts,
        )


class PeriodicWorker(WorkerLoop):
    """A loop of rounds: ``tick`` does one, then the loop waits ``interval_s``, or starts
    the next at once when ``tick`` says more work is waiting. A tick retries outages itself
    (``self.retry``); a stop request ends the loop between rounds or during a retry, and
    ``close`` then releases what the worker holds."""

    @property
    def interval_s(self) -> float:
        raise NotImplementedError

    async def run(self) -> None:
        self.started.set()
        try:
            while not self.stopping.is_set():
                try:
                    more = await self.tick()
                except Stopping:
                    break
                if not more:
                    await self.pause(self.interval_s)
        finally:
            await self.close()

    async def tick(self) -> bool:
        """One round; True when more work is waiting, to run again at once."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the worker holds (clients, connections); called once, at the end."""
