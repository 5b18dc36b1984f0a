"""Back-off and retry for infrastructure faults: the loop stops advancing, waits with
exponential back-off and full jitter, and tries the same work again."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from workers.logs import get_logger
from workers.metrics import Metrics
from workers.settings import Settings

T = TypeVar("T")
log = get_logger("chargeline.retry")


class Stopping(Exception):
    """The process is shutting down while the work was still failing; nothing was applied."""


async def retry_transient(
    operation: Callable[[], Awaitable[T]],
    *,
    is_transient: Callable[[BaseException], bool],
    component: str,
    settings: Settings,
    metrics: Metrics,
    stopping: asyncio.Event | None = None,
    max_attempts: int | None = None,
) -> T:
    """Run ``operation`` until it succeeds; retry transient failures with back-off.

    Permanent failures propagate at once. When ``stopping`` is set while the operation still
    fails, ``Stopping`` is raised so the caller can exit without committing anything.
    """
    delay = settings.retry_initial_ms / 1000
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if max_attempts is not None and attempt >= max_attempts:
                raise
            metrics.retries.labels(component=component).inc()
            if stopping is not None and stopping.is_set():
                raise Stopping(f"{component} still failing at shutdown: {exc!r}") from exc
            sleep_for = random.uniform(0, delay)  # noqa: S311 -- jitter, not cryptography.
            log.warning(
                "retrying",
                component=component,
                attempt=attempt,
                error=f"{type(exc).__name__}: {exc}",
                sleep_s=round(sleep_for, 3),
            )
            if stopping is None:
                await asyncio.sleep(sleep_for)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=sleep_for)
            delay = min(delay * 2, settings.retry_max_ms / 1000)
