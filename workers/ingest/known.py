"""Step 0, on a lane that sees mostly duplicates: records Postgres holds byte for byte.

A replay, or a new consumer group reading a topic from the start, delivers records whose
events were recorded long ago. Parsing and validating each (pydantic, the canonical form,
its fingerprint) only to learn "duplicate" again was most of the worker's cost per event.
Every dedup row carries the digest of the record value it came from (migration 0009), so
such a lane first *peeks* at its records (the JSON's type and dedup key, nothing
validated) and asks Postgres, in one statement, which of them it holds under the same key
with the same digest. Those are duplicates, counted so and never parsed; the rest take
the full path, parse, dedupe and apply, in their order.

Equal bytes are the same event, so a known record is a duplicate by the SPEC's rule as
much as by its fingerprint. Anything else (another payload under a stored key, a record
whose key or topic does not fit, rows stored before 0009) is simply not known, and is
judged as always.

``LaneModes`` decides per lane: a lane probes once most events of its last batch were
duplicates, and stops once most of a probed batch was not known. Live traffic (a few per
cent duplicates) never pays for the peek.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypedDict

import orjson

from schemas.events import EVENT_MODELS
from workers.db import QUERIES, Connection
from workers.ingest.parse import Record, raw_digest

DEDUP_FIELDS = {kind: model.dedup_fields for kind, model in EVENT_MODELS.items()}


class Peeked(TypedDict):
    """A record that Postgres may hold, as a row of the lookup's JSON input: built once, in
    the form it is sent, since a replay is bound by the worker's CPU and every per-record
    object counts."""

    i: int  # position in the records peeked at
    t: str  # event type
    a: str  # the dedup key's first field (customer_ref, or flow_id for a charge)
    b: str  # the dedup key's second field (the reference)
    d: str  # raw_digest of the record value, in hex


def peek(
    records: Sequence[Record], *, accepted_types: frozenset[str], max_event_bytes: int
) -> list[Peeked]:
    """The records that could have been recorded as they are: a JSON object of a type the
    topic accepts, its dedup key fields printable strings, the record key its customer_ref,
    within the size limit. Checks the full path would fail a record on stop it here, so
    that it is parsed, and refused, there."""
    peeked: list[Peeked] = []
    for index, record in enumerate(records):
        value: bytes | None = record.value
        if value is None or len(value) > max_event_bytes:
            continue
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            continue
        if type(doc) is not dict:
            continue
        event_type = doc.get("type")
        if type(event_type) is not str or event_type not in accepted_types:
            continue
        first_field, second_field = DEDUP_FIELDS[event_type]
        first, second = doc.get(first_field), doc.get(second_field)
        customer_ref = doc.get("customer_ref")
        if not (
            type(first) is str
            and type(second) is str
            and type(customer_ref) is str
            and first.isprintable()  # what a stored key is; excludes NUL, which text cannot hold
            and second.isprintable()
            and customer_ref.isprintable()
            and record.key == customer_ref.encode()
        ):
            continue
        peeked.append(
            {"i": index, "t": event_type, "a": first, "b": second, "d": raw_digest(value).hex()}
        )
    return peeked


async def known_records(conn: Connection, peeked: list[Peeked]) -> set[int]:
    """The positions (``Peeked["i"]``) of the records Postgres holds under their dedup key
    with the same digest."""
    if not peeked:
        return set()
    # One JSON document, not four arrays: asyncpg encodes an array element by element in
    # Python, orjson the whole batch in C, and a replay is bound by the worker's CPU.
    # Postgres parses JSON for a little more than arrays, so the live statements, which
    # Postgres's load bounds, keep their arrays.
    batch = orjson.dumps(peeked)
    rows = await conn.fetch(QUERIES["known_records"], batch.decode())
    return {row[0] for row in rows}


class LaneModes:
    """Which lanes look their records up by digest before parsing them.

    A lane starts probing after a batch in which at least ``PROBE_SHARE`` of the records
    were duplicates, and stops after a probed batch in which fewer than that were known. It
    then waits ``COOLDOWN_BATCHES`` before it may probe again: duplicates of rows stored
    before 0009 (no digest) would otherwise make it switch on every other batch.
    """

    PROBE_SHARE = 0.5
    COOLDOWN_BATCHES = 16

    def __init__(self, *, probe_first: bool = False) -> None:
        self.probe_first = probe_first
        self._probing: dict[Hashable, bool] = {}
        self._cooldown: dict[Hashable, int] = {}

    def probing(self, lane: Hashable) -> bool:
        return self._probing.get(lane, self.probe_first)

    def expect_known(self, lane: Hashable) -> None:
        """Probe the lane's next batch, unless its batches already set its mode: it reads a
        partition from the start for a consumer group new to it (a backfill by a new group,
        or a first deployment, whose first probe finds nothing and stops)."""
        self._probing.setdefault(lane, True)

    def observe(
        self, lane: Hashable, *, probed: bool, records: int, duplicates: int, known: int
    ) -> str | None:
        """Record a lane's batch, prepared probing or not (``known`` counts among its
        ``duplicates``); returns ``"started"`` or ``"stopped"`` when the lane's mode
        changes, else None."""
        if records == 0:
            return None
        was = self.probing(lane)
        if probed:
            if known < self.PROBE_SHARE * records:
                self._probing[lane] = False
                self._cooldown[lane] = self.COOLDOWN_BATCHES
        elif cooldown := self._cooldown.get(lane, 0):
            self._cooldown[lane] = cooldown - 1
        elif duplicates >= self.PROBE_SHARE * records:
            self._probing[lane] = True
        now = self.probing(lane)
        if now == was:
            return None
        return "started" if now else "stopped"
