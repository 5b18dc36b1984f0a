"""``chargeline publish``: validate a JSONL file of events, then publish it.

Two streaming passes over the file so memory stays flat for any size: first every line is
validated (a bad line is reported with its number and nothing is published), then every
line is published keyed by its ``customer_ref``, with acks from all replicas. At most
``SEND_WINDOW`` records are in flight, so a file of any length runs in bounded memory; an
optional rate limit paces the second pass for backfills that share the topics with live
traffic. A file that changes between the passes is refused.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from schemas.events import EventRejected, parse_event
from workers.errors import ChargelineError, UsageError
from workers.kafka import make_producer
from workers.settings import Settings

MAX_REPORTED_ERRORS = 20
SEND_WINDOW = 5000
PROGRESS_EVERY = 10_000  # lines between progress callbacks

# (phase "validate" or "publish", lines done, lines in all or None while unknown)
PublishProgress = Callable[[str, int, int | None], None]


class InvalidFile(ChargelineError):
    """The file has invalid events; nothing was published."""


@dataclass
class PublishReport:
    topic: str
    file: str
    lines: int = 0
    published: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class RateLimiter:
    """A token bucket: on average at most ``rate`` per second, bursts of a tenth of a second."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.capacity = max(1.0, rate / 10)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    async def take(self, n: int = 1) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= n
        if self.tokens < 0:
            # In debt: wait until the bucket is back at zero.
            await asyncio.sleep(-self.tokens / self.rate)


def accepted_types(settings: Settings, topic: str) -> frozenset[str]:
    if topic == settings.topic_charges:
        return frozenset({"charge"})
    if topic == settings.topic_usage:
        return frozenset({"usage", "credit_grant", "credit_void"})
    raise UsageError(
        f"{topic!r} is not an input topic; expected {settings.topic_charges!r} "
        f"or {settings.topic_usage!r}"
    )


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            # A byte order mark, as some editors write, is not JSON, nor data.
            stripped = (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line).strip()
            if stripped:
                yield number, stripped


def validate_file(
    path: Path,
    accepted: frozenset[str],
    topic: str,
    *,
    progress: PublishProgress | None = None,
) -> PublishReport:
    report = PublishReport(topic=topic, file=str(path))
    errors: list[str] = []
    error_count = 0
    for number, line in _lines(path):
        report.lines += 1
        if progress is not None and report.lines % PROGRESS_EVERY == 0:
            progress("validate", report.lines, None)
        try:
            event = parse_event(line)
        except EventRejected as exc:
            problem: str | None = f"{exc.reason}: {exc.detail}"
        else:
            problem = None
            if event.type not in accepted:
                problem = f"wrong_topic: {event.type} events do not go to {topic}"
        if problem is not None:
            error_count += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(f"{path}:{number}: {problem}")
            continue
        report.by_type[event.type] = report.by_type.get(event.type, 0) + 1
    if error_count:
        more = f" (and {error_count - len(errors)} more)" if error_count > len(errors) else ""
        raise InvalidFile(
            f"{error_count} invalid line(s) in {path}, nothing published{more}:\n"
            + "\n".join(errors)
        )
    return report


FileIdentity = tuple[int, int, int, int]


def _validate(
    settings: Settings, topic: str, path: Path, progress: PublishProgress | None
) -> tuple[PublishReport, FileIdentity]:
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    identity = _identity(path)
    return validate_file(path, accepted_types(settings, topic), topic, progress=progress), identity


def _identity(path: Path) -> FileIdentity:
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


async def publish_file(
    settings: Settings,
    topic: str,
    path: Path,
    *,
    rate: float | None = None,
    progress: PublishProgress | None = None,
) -> PublishReport:
    """Validate the whole file, then publish it; ``rate``: at most that many records/s."""
    started = time.monotonic()
    # The first pass reads the whole file: off the event loop.
    report, identity = await asyncio.to_thread(_validate, settings, topic, path, progress)
    if await asyncio.to_thread(_identity, path) != identity:
        raise InvalidFile(f"{path} changed while it was being validated; nothing published")
    limiter = RateLimiter(rate) if rate else None
    producer = make_producer(settings, client_id="chargeline-publish")
    try:
        await producer.start()  # in the try: a client that failed to start is stopped too
        pending: list[asyncio.Future[object]] = []
        for number, line in _lines(path):
            try:
                event = parse_event(line)
            except EventRejected as exc:
                # Valid a moment ago: the file is being written to. Stop at once.
                await asyncio.gather(*pending)
                report.published += len(pending)
                raise InvalidFile(
                    f"{path}:{number} changed after validation ({exc.reason}); "
                    f"stopped after publishing {report.published} of {report.lines} lines"
                ) from exc
            if limiter is not None:
                await limiter.take()
            pending.append(await producer.send(topic, value=line, key=event.customer_ref.encode()))
            if len(pending) >= SEND_WINDOW:
                await asyncio.gather(*pending)
                report.published += len(pending)
                pending.clear()
                if progress is not None:
                    progress("publish", report.published, report.lines)
        await asyncio.gather(*pending)
        report.published += len(pending)
        if progress is not None:
            progress("publish", report.published, report.lines)
    finally:
        await producer.stop()
    if await asyncio.to_thread(_identity, path) != identity:
        raise InvalidFile(
            f"{path} changed while it was being published: {report.published} valid lines "
            f"were published, {report.lines} had been validated"
        )
    report.seconds = time.monotonic() - started
    return report
