"""A stop request cuts short the waits a worker loop has no deadline for."""

from __future__ import annotations

import asyncio

from workers.lifecycle import WorkerLoop
from workers.metrics import Metrics
from workers.settings import Settings


class _Loop(WorkerLoop):
    name = "test"


async def test_unless_stopped_returns_the_result_when_no_stop_comes() -> None:
    loop = _Loop(Settings(), Metrics())

    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert await loop.unless_stopped(answer()) == 42


async def test_a_stop_request_cancels_a_wait_with_no_deadline() -> None:
    loop = _Loop(Settings(), Metrics())
    cancelled = asyncio.Event()

    async def join_that_never_completes() -> int:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 1

    asyncio.get_running_loop().call_later(0.05, loop.stop)
    assert await asyncio.wait_for(loop.unless_stopped(join_that_never_completes()), 5) is None
    assert cancelled.is_set()


async def test_pause_returns_early_on_stop() -> None:
    loop = _Loop(Settings(), Metrics())
    assert await loop.pause(0.01) is False
    loop.stop()
    assert await asyncio.wait_for(loop.pause(60), 5) is True
