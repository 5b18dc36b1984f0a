"""Batches in flight: how the ingest loop keeps Postgres and its own CPU busy at once.

A batch is split into parts, one per *lane* (a topic's partitions modulo ``batch_lanes``),
each applied in a transaction of its own; a part may also stand for several lanes at once
(``covers``: a small batch's topic in one transaction). The rules:

1. a lane's transactions run one at a time, in fetch order, so the records of a partition
   are applied in order; a part covering several lanes waits for each of them, and each
   of them waits for it;
2. different lanes run side by side, and a lane starts its part of the next batch as soon
   as its part of this one is done, without waiting for the batch's slowest lane;
3. a batch is *finished* (its offsets committed) only once all its parts are applied and
   the batch before it is finished: offsets move in fetch order;
4. once a part fails, the later parts of its lane are not applied (they would overtake the
   failed records) and every later batch fails with it: all are redelivered, and what was
   applied meanwhile on other lanes is absorbed by dedup on redelivery;
5. at most ``max_batches`` are in flight; ``submit`` waits for the oldest to finish;
6. a failure is reported the moment it happens (``on_failure``), not when the failed batch
   is next waited for: a lane that failed must never sit unnoticed while the loop fetches.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar


class Laned(Protocol):
    @property
    def covers(self) -> tuple[Hashable, ...]:
        """The lanes whose order the part keeps: its own, or several."""
        ...


B = TypeVar("B")  # what the caller needs to finish a batch (its records)
P = TypeVar("P", bound=Laned)  # a part of a batch
R = TypeVar("R")  # what applying a part returns


class LaneBroken(Exception):
    """A part not applied because an earlier part of its lane failed."""


class _InFlight(NamedTuple):
    batch: Any
    parts: list[Any]
    tasks: list[asyncio.Task[Any]]
    finished: asyncio.Task[None]


class BatchPipeline(Generic[B, P, R]):
    def __init__(
        self,
        *,
        apply: Callable[[B, P], Awaitable[R]],
        finish: Callable[[B, list[R]], Awaitable[None]],
        max_batches: int = 2,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._apply = apply
        self._finish = finish
        self.max_batches = max_batches
        self._on_failure = on_failure
        self.failure: BaseException | None = None  # the first failure reported
        self._in_flight: deque[_InFlight] = deque()  # oldest first
        self._lane_tails: dict[Hashable, asyncio.Task[R]] = {}

    def __len__(self) -> int:
        return len(self._in_flight)

    async def submit(self, batch: B, parts: list[P]) -> None:
        """Start applying ``parts``; returns once fewer than ``max_batches`` are in flight
        (raising what stopped the oldest, if it failed)."""
        while len(self._in_flight) >= self.max_batches:
            await self._retire_oldest()
        tasks: list[asyncio.Task[R]] = []
        for part in parts:
            previous = {self._lane_tails[lane] for lane in part.covers if lane in self._lane_tails}
            task = asyncio.create_task(self._apply_after(batch, part, previous))
            task.add_done_callback(self._report_failure)
            for lane in part.covers:
                self._lane_tails[lane] = task
            tasks.append(task)
        before = self._in_flight[-1].finished if self._in_flight else None
        finished = asyncio.create_task(self._finish_after(batch, tasks, before))
        finished.add_done_callback(self._report_failure)
        self._in_flight.append(_InFlight(batch, list(parts), list(tasks), finished))

    def unfinished(self) -> list[tuple[B, P]]:
        """Every part not yet applied, with its batch, oldest batch first."""
        return [
            (flight.batch, part)
            for flight in self._in_flight
            for part, task in zip(flight.parts, flight.tasks, strict=True)
            if not task.done()
        ]

    def _report_failure(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self._on_failure is None:
            return
        exc = task.exception()
        # Only the first: the later parts of its lane (LaneBroken) and every later batch
        # fail because of it.
        if exc is None or self.failure is not None:
            return
        self.failure = exc
        self._on_failure(exc)

    async def settle(self) -> None:
        """Wait until every batch is finished (or raise what stopped one)."""
        while self._in_flight:
            await self._retire_oldest()

    async def _retire_oldest(self) -> None:
        # Counted as in flight until finished, then raising what stopped it, if anything.
        finished = self._in_flight[0].finished
        await asyncio.wait({finished})
        self._in_flight.popleft()
        finished.result()

    async def quiesce(self) -> None:
        """Wait until no part is running, leaving any failure for ``settle`` to raise."""
        if self._in_flight:
            # The newest batch finishes only after every part of it and of earlier batches.
            await asyncio.wait({self._in_flight[-1].finished})

    async def abandon(self) -> None:
        """Cancel whatever is in flight and wait until it has stopped."""
        tasks = [task for batch in self._in_flight for task in (*batch.tasks, batch.finished)]
        self._in_flight.clear()
        self._lane_tails.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _apply_after(self, batch: B, part: P, previous: set[asyncio.Task[R]]) -> R:
        if previous:
            await asyncio.wait(previous)
            if any(task.cancelled() or task.exception() is not None for task in previous):
                raise LaneBroken(f"an earlier part of lanes {part.covers} was not applied")
        return await self._apply(batch, part)

    async def _finish_after(
        self, batch: B, parts: list[asyncio.Task[R]], previous: asyncio.Task[None] | None
    ) -> None:
        # Every part ends before the batch does, so that a failed batch leaves none running.
        if parts:
            await asyncio.wait(parts)
            for part in parts:
                if not part.cancelled():
                    part.exception()  # retrieved here even when an earlier batch failed first
        if previous is not None:
            await previous
        await self._finish(batch, [part.result() for part in parts])
