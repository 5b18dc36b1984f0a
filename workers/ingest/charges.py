"""Step 3 for the charges topic: record charges against their flows, set-wise.

Dedup key ``(flow_id, reference)``; a charge for an unknown flow is dead-lettered
``unknown_flow``, for a paused flow ``flow_paused`` (replayable once the flow resumes).
"""

from __future__ import annotations

from collections import Counter

import orjson

from schemas.events import ChargeEvent
from workers.db import QUERIES, Connection, fetch_one
from workers.ingest.dedupe import Verdict, resolve_races, verdicts_from_report
from workers.ingest.parse import Parsed


class ChargesHandler:
    """Applies charge events; one statement per batch on the hot path."""

    name = "charges"
    accepted_types = frozenset({"charge"})

    def __init__(self, topic: str) -> None:
        self.topic = topic

    async def apply(
        self, conn: Connection, events: list[Parsed], alerts: Counter[str]
    ) -> list[Verdict]:
        if not events:
            return []
        inputs = []
        for parsed in events:
            charge = parsed.event
            assert isinstance(charge, ChargeEvent)
            inputs.append(
                (
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
                    parsed.raw_digest,
                )
            )
        # One tuple per charge, in the field order of the charge_input row type.
        report = await fetch_one(conn, QUERIES["record_charges"], inputs, self.topic)
        verdicts, raced = verdicts_from_report(report, events)
        flow_statuses = report["flow_statuses"]
        # Neither recorded nor stored before: the flow refused it, or another transaction
        # committed the same key while this statement ran.
        lost_race = []
        for index in raced:
            flow_id = events[index].event.flow_id  # type: ignore[union-attr]
            status = flow_statuses[index]
            if status is None:
                verdicts[index] = Verdict(rejection=("unknown_flow", f"no flow {flow_id!r}"))
            elif status != "active":
                verdicts[index] = Verdict(rejection=("flow_paused", f"flow {flow_id!r} is paused"))
            else:
                lost_race.append(index)
        if lost_race:
            keys = [parsed.dedup_key for parsed in events]
            await resolve_races(conn, QUERIES["stored_charges"], keys, verdicts, lost_race)
        return [verdict for verdict in verdicts if verdict is not None]
