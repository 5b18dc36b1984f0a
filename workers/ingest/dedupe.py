"""Step 2: deduplicate by reference, inside the batch and against what Postgres holds.

A handler applies only the *first* occurrence of each dedup key in a batch and tells, for
each, what Postgres now holds for that key (``Verdict``). Every later occurrence in the
batch is then judged against the same stored payload, so within a batch and across batches
the rule is one: same key and same payload is a duplicate, same key and another payload a
conflict, and the first stored payload always wins.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from workers.db import Connection, Row
from workers.ingest.parse import Conflict, Parsed, Rejected


class Outcome(StrEnum):
    """What happened to one input event (the ``outcome`` label of chargeline_events)."""

    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    INVALID = "invalid"  # malformed: could not become an event
    REJECTED = "rejected"  # a valid event the pipeline refuses (unknown or paused flow)


# Stored and Verdict are NamedTuples: immutable like frozen dataclasses, but built in C
# (a frozen dataclass sets each field through object.__setattr__), once per event.
class Stored(NamedTuple):
    """What Postgres already holds for a dedup key."""

    fingerprint: bytes
    payload: str | bytes  # JSON, kept beside a conflict (bytes: an event's canonical JSON)

    def payload_text(self) -> str:
        return self.payload if isinstance(self.payload, str) else self.payload.decode()


class Verdict(NamedTuple):
    """A handler's answer for the first occurrence of a key.

    ``recorded``: this event was applied now. Otherwise ``stored`` is what Postgres already
    held for the key, or ``rejection`` (reason, detail) says why it was not applied.
    """

    recorded: bool = False
    stored: Stored | None = None
    rejection: tuple[str, str] | None = None


RECORDED = Verdict(recorded=True)


def first_occurrences(events: list[Parsed]) -> tuple[list[Parsed], list[tuple[Parsed, int]]]:
    """Split events into the first of each dedup key (in order) and the repeats, each with
    the index of its first occurrence in the returned list."""
    firsts: list[Parsed] = []
    repeats: list[tuple[Parsed, int]] = []
    index_of: dict[tuple[str, str, str], int] = {}
    for parsed in events:
        # The event type is part of the key: a usage and a grant may share a reference.
        key = (parsed.event_type, *parsed.dedup_key)
        first = index_of.get(key)
        if first is None:
            index_of[key] = len(firsts)
            firsts.append(parsed)
        else:
            repeats.append((parsed, first))
    return firsts, repeats


@dataclass(slots=True)
class Judgement:
    """Outcome counts and the events to dead-letter, for one batch."""

    counts: Counter[tuple[str, str, str]]  # (topic, type, outcome) -> events
    dead: list[Rejected]


def judge(
    firsts: list[Parsed], verdicts: list[Verdict], repeats: list[tuple[Parsed, int]]
) -> Judgement:
    """Turn the handler's verdicts into an outcome for every event of the batch."""
    if len(verdicts) != len(firsts):
        raise ValueError(f"{len(verdicts)} verdicts for {len(firsts)} events")
    # One (topic, type, outcome) key per event, counted once at the end: Counter.update on a
    # list counts in C, where a += per event was a fifth of judging a batch of duplicates.
    outcomes: list[tuple[str, str, str]] = []
    dead: list[Rejected] = []
    # What Postgres holds for each first occurrence after this batch (None: nothing stored).
    held: list[Stored | None] = []
    for parsed, verdict in zip(firsts, verdicts, strict=True):
        if verdict.recorded:
            held.append(Stored(parsed.fingerprint, parsed.payload))
            outcomes.append((parsed.record.topic, parsed.event_type, _RECORDED))
        elif verdict.stored is not None:
            held.append(verdict.stored)
            outcomes.append(_same_or_conflict(parsed, verdict.stored, dead))
        else:
            held.append(None)
            assert verdict.rejection is not None, "a verdict must record, hold or reject"
            reason, detail = verdict.rejection
            dead.append(Rejected(parsed.record, reason, detail, parsed.event_type))
            outcomes.append((parsed.record.topic, parsed.event_type, _REJECTED))
    for parsed, first in repeats:
        stored = held[first]
        if stored is not None:
            outcomes.append(_same_or_conflict(parsed, stored, dead))
        else:
            # The first was refused (an unknown flow, say); so is every copy of it.
            rejection = verdicts[first].rejection
            assert rejection is not None
            dead.append(Rejected(parsed.record, *rejection, parsed.event_type))
            outcomes.append((parsed.record.topic, parsed.event_type, _REJECTED))
    return Judgement(Counter(outcomes), dead)


_RECORDED = Outcome.RECORDED.value
_DUPLICATE = Outcome.DUPLICATE.value
_CONFLICT = Outcome.CONFLICT.value
_REJECTED = Outcome.REJECTED.value


def _same_or_conflict(parsed: Parsed, stored: Stored, dead: list[Rejected]) -> tuple[str, str, str]:
    """The outcome key of an event whose key Postgres holds: duplicate, or a conflict (then
    dead-lettered with both payloads)."""
    if parsed.fingerprint == stored.fingerprint:
        return (parsed.record.topic, parsed.event_type, _DUPLICATE)
    key = "/".join(parsed.dedup_key)
    dead.append(
        Rejected(
            parsed.record,
            "reference_conflict",
            f"{parsed.event_type} {key} was first recorded with another payload",
            parsed.event_type,
            conflict=Conflict(parsed.dedup_key, stored.payload_text(), parsed.payload.decode()),
        )
    )
    return (parsed.record.topic, parsed.event_type, _CONFLICT)


def verdicts_from_report(
    report: Row, events: list[Parsed]
) -> tuple[list[Verdict | None], list[int]]:
    """Verdicts from the report of a ``record_*`` statement (one row of arrays in event
    order: ``new_ids``, ``stored_fingerprints``, ``stored_payloads``), and the indexes that
    raced: keys another transaction committed after the statement's snapshot, to be looked
    up once more.

    The statements send the stored payload only when it differs from the event's: for a
    duplicate (equal fingerprints) the event's own payload is the stored one."""
    verdicts: list[Verdict | None] = []
    raced: list[int] = []
    columns = (report["new_ids"], report["stored_fingerprints"], report["stored_payloads"])
    for index, (new_id, fingerprint, stored_payload) in enumerate(zip(*columns, strict=True)):
        if new_id is not None:
            verdicts.append(RECORDED)
        elif fingerprint is not None:
            payload = events[index].payload if stored_payload is None else stored_payload
            verdicts.append(Verdict(stored=Stored(fingerprint, payload)))
        else:
            verdicts.append(None)
            raced.append(index)
    return verdicts, raced


async def resolve_races(
    conn: Connection,
    query: str,
    keys: list[tuple[str, str]],
    verdicts: list[Verdict | None],
    raced: list[int],
) -> None:
    """Fill the raced verdicts from ``query`` (key columns, ``fingerprint``, ``payload``)."""
    wanted = [keys[i] for i in raced]
    rows = await conn.fetch(query, [k[0] for k in wanted], [k[1] for k in wanted])
    stored = {(r[0], r[1]): Stored(r["fingerprint"], r["payload"]) for r in rows}
    for index, key in zip(raced, wanted, strict=True):
        found = stored.get(key)
        if found is None:
            raise RuntimeError(f"{key} was neither inserted nor found")
        verdicts[index] = Verdict(stored=found)
