"""``chargeline publish``: validate a JSONL file of events, then publish it.

Two streaming passes over the file so memory stays flat for any size: first every line is
validated (a bad line is reported with its number and nothing is published), then every
line is published keyed by its ``customer_ref``, with acks from all replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from schemas.events import EventRejected, parse_event
from workers.errors import ChargelineError, UsageError
from workers.kafka import make_producer
from workers.settings import Settings

MAX_REPORTED_ERRORS = 20
SEND_WINDOW = 5000


class InvalidFile(ChargelineError):
    """The file has invalid events; nothing was published."""


@dataclass
class PublishReport:
    topic: str
    file: str
    lines: int = 0
    published: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


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
            stripped = line.strip()
            if stripped:
                yield number, stripped


def validate_file(path: Path, accepted: frozenset[str], topic: str) -> PublishReport:
    report = PublishReport(topic=topic, file=str(path))
    errors: list[str] = []
    error_count = 0
    for number, line in _lines(path):
        report.lines += 1
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


def _validate(settings: Settings, topic: str, path: Path) -> PublishReport:
    if not path.is_file():
        raise UsageError(f"no such file: {path}")
    return validate_file(path, accepted_types(settings, topic), topic)


async def publish_file(settings: Settings, topic: str, path: Path) -> PublishReport:
    # The first pass reads the whole file: off the event loop.
    report = await asyncio.to_thread(_validate, settings, topic, path)
    producer = make_producer(settings, client_id="chargeline-publish")
    await producer.start()
    try:
        pending: list[asyncio.Future[object]] = []
        for _, line in _lines(path):
            event = parse_event(line)
            pending.append(await producer.send(topic, value=line, key=event.customer_ref.encode()))
            if len(pending) >= SEND_WINDOW:
                await asyncio.gather(*pending)
                report.published += len(pending)
                pending.clear()
        await asyncio.gather(*pending)
        report.published += len(pending)
    finally:
        await producer.stop()
    return report
