"""Judging duplicates (step 2), on pure values: the first occurrence of a key in a batch is
what the handler applied or found stored; every later one is a duplicate when its payload is
the same, a conflict (dead-lettered with both payloads) when not, and refused with the first
when the first was refused."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from workers.ingest.dedupe import RECORDED, Stored, Verdict, first_occurrences, judge
from workers.ingest.parse import BareRecord, Parsed, parse_records

TOPIC = "billing.charges"


def parsed(*events: dict[str, Any]) -> list[Parsed]:
    records = [
        BareRecord(TOPIC, 0, offset, event["customer_ref"].encode(), orjson.dumps(event), 1)
        for offset, event in enumerate(events)
    ]
    result, rejected = parse_records(
        records, accepted_types=frozenset({"charge"}), max_event_bytes=65536
    )
    assert rejected == []
    return result


def charge(reference: str, amount: int = 100) -> dict[str, Any]:
    return {"type": "charge", "flow_id": "f", "customer_ref": "c", "reference": reference,
            "amount": amount, "currency": "EUR"}  # fmt: skip


def test_first_occurrences_keep_order_and_point_repeats_at_their_first() -> None:
    events = parsed(charge("a"), charge("b"), charge("a", 5), charge("a"))
    firsts, repeats = first_occurrences(events)
    assert [p.event.reference for p in firsts] == ["a", "b"]
    assert [(p.record.offset, first) for p, first in repeats] == [(2, 0), (3, 0)]


def test_repeats_of_a_recorded_event_are_duplicates_or_conflicts() -> None:
    events = parsed(charge("a"), charge("a"), charge("a", 7))
    firsts, repeats = first_occurrences(events)
    judgement = judge(firsts, [RECORDED], repeats)
    assert judgement.counts == {
        (TOPIC, "charge", "recorded"): 1,
        (TOPIC, "charge", "duplicate"): 1,
        (TOPIC, "charge", "conflict"): 1,
    }
    [conflict] = judgement.dead
    assert (conflict.reason, conflict.record.offset) == ("reference_conflict", 2)
    assert conflict.conflict is not None
    assert '"amount":100' in conflict.conflict.original_payload
    assert '"amount":7' in conflict.conflict.conflicting_payload


def test_an_event_stored_before_is_judged_against_what_is_stored() -> None:
    [same, other] = parsed(charge("a"), charge("b"))
    stored_same = Stored(same.fingerprint, same.payload)
    stored_other = Stored(hashlib.sha256(b"x").digest(), '{"amount": 1}')
    judgement = judge(
        [same, other], [Verdict(stored=stored_same), Verdict(stored=stored_other)], []
    )
    assert judgement.counts == {
        (TOPIC, "charge", "duplicate"): 1,
        (TOPIC, "charge", "conflict"): 1,
    }
    assert [d.conflict.original_payload for d in judgement.dead if d.conflict] == ['{"amount": 1}']


def test_copies_of_a_refused_event_are_refused_with_it() -> None:
    events = parsed(charge("a"), charge("a"), charge("a", 9))
    firsts, repeats = first_occurrences(events)
    refused = Verdict(rejection=("unknown_flow", "no flow 'f'"))
    judgement = judge(firsts, [refused], repeats)
    assert judgement.counts == {(TOPIC, "charge", "rejected"): 3}
    assert [(d.reason, d.record.offset) for d in judgement.dead] == [
        ("unknown_flow", 0),
        ("unknown_flow", 1),
        ("unknown_flow", 2),
    ]


def test_a_verdict_per_first_occurrence_is_required() -> None:
    events = parsed(charge("a"))
    with pytest.raises(ValueError, match="0 verdicts for 1 events"):
        judge(events, [], [])
