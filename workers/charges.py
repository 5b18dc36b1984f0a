"""Step 3 for the charges topic: record charges against their flows, set-wise.

Dedup key ``(flow_id, reference)``; a charge for an unknown flow is dead-lettered
``unknown_flow``, for a paused flow ``flow_paused`` (replayable once the flow resumes).
"""

from __future__ import annotations

from typing import Any

import orjson

from schemas.events import ChargeEvent
from workers.db import QUERIES
from workers.dedupe import RECORDED, Stored, Verdict
from workers.parse import Parsed


class ChargesHandler:
    """Applies charge events; one statement per batch on the hot path."""

    name = "charges"
    accepted_types = frozenset({"charge"})

    def __init__(self, topic: str) -> None:
        self.topic = topic

    async def apply(self, conn: Any, events: list[Parsed]) -> list[Verdict]:
        if not events:
            return []
        columns: list[list[Any]] = [[] for _ in range(11)]
        for parsed in events:
            charge = parsed.event
            assert isinstance(charge, ChargeEvent)
            row = (
                charge.flow_id,
                charge.reference,
                charge.customer_ref,
                charge.amount,
                charge.currency,
                None if charge.metadata is None else orjson.dumps(charge.metadata).decode(),
                parsed.occurred_at,
                parsed.fingerprint,
                parsed.payload.decode(),
                parsed.record.partition,
                parsed.record.offset,
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        rows = await conn.fetch(QUERIES["record_charges"], *columns, self.topic)
        verdicts: list[Verdict | None] = []
        raced: list[int] = []
        for index, row in enumerate(rows):
            if row["inserted"]:
                verdicts.append(RECORDED)
            elif row["stored_fingerprint"] is not None:
                verdicts.append(
                    Verdict(stored=Stored(row["stored_fingerprint"], row["stored_payload"]))
                )
            elif row["flow_status"] is None:
                flow_id = events[index].event.flow_id  # type: ignore[union-attr]
                verdicts.append(Verdict(rejection=("unknown_flow", f"no flow {flow_id!r}")))
            elif row["flow_status"] != "active":
                flow_id = events[index].event.flow_id  # type: ignore[union-attr]
                verdicts.append(Verdict(rejection=("flow_paused", f"flow {flow_id!r} is paused")))
            else:
                verdicts.append(None)
                raced.append(index)
        if raced:
            await self._resolve_races(conn, events, verdicts, raced)
        return [verdict for verdict in verdicts if verdict is not None]

    async def _resolve_races(
        self, conn: Any, events: list[Parsed], verdicts: list[Verdict | None], raced: list[int]
    ) -> None:
        """Keys a concurrent transaction committed after this statement's snapshot."""
        keys = [events[i].dedup_key for i in raced]
        rows = await conn.fetch(
            QUERIES["stored_charges"], [k[0] for k in keys], [k[1] for k in keys]
        )
        stored = {
            (r["flow_id"], r["reference"]): Stored(r["fingerprint"], r["payload"]) for r in rows
        }
        for index, key in zip(raced, keys, strict=True):
            found = stored.get(key)
            if found is None:
                raise RuntimeError(f"charge {key} neither inserted nor found")
            verdicts[index] = Verdict(stored=found)
