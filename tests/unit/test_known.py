"""workers/ingest/known.py without servers: what a peek lets through to the digest lookup (only
records that could have been recorded as they are), and when a lane starts and stops
probing."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from workers.ingest.known import LaneModes, peek
from workers.ingest.parse import raw_digest

USAGE_TYPES = frozenset({"usage", "credit_grant", "credit_void"})


def rec(value: bytes | None, key: bytes | None = b"c1") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="billing.usage",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=(),
    )


def usage(**changes: object) -> bytes:
    body = {"type": "usage", "customer_ref": "c1", "reference": "u1", "tokens": 5, **changes}
    return orjson.dumps({k: v for k, v in body.items() if v is not ...})


def peeked(*records: ConsumerRecord[bytes, bytes]) -> list[tuple[int, str, tuple[str, str]]]:
    found = peek(records, accepted_types=USAGE_TYPES, max_event_bytes=1000)
    return [(p["i"], p["t"], (p["a"], p["b"])) for p in found]


def test_a_plausible_record_is_peeked_with_its_dedup_key_and_digest() -> None:
    value = usage()
    [found] = peek([rec(value)], accepted_types=USAGE_TYPES, max_event_bytes=1000)
    assert found == {"i": 0, "t": "usage", "a": "c1", "b": "u1", "d": raw_digest(value).hex()}
    assert len(found["d"]) == 32  # 16 bytes, in hex


def test_a_charge_is_keyed_by_flow_and_reference() -> None:
    value = orjson.dumps(
        {"type": "charge", "flow_id": "f1", "customer_ref": "c1", "reference": "r1"}
    )
    found = peek([rec(value)], accepted_types=frozenset({"charge"}), max_event_bytes=1000)
    assert [(p["a"], p["b"]) for p in found] == [("f1", "r1")]


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (None, b"c1"),  # a tombstone
        (b"{bad", b"c1"),
        (b"[1, 2]", b"c1"),  # JSON, not an object
        (usage(type="charge"), b"c1"),  # not accepted on this topic
        (usage(type=["usage"]), b"c1"),  # not even hashable
        (usage(reference=7), b"c1"),
        (usage(reference="u\x001"), b"c1"),  # NUL: Postgres text cannot hold it
        (usage(customer_ref="c\n1"), b"c\n1"),
        (usage(customer_ref=...), b"c1"),
        (usage(), b"c2"),  # the record key is not the customer_ref
        (usage(), None),
        (usage(padding="x" * 1000), b"c1"),  # over max_event_bytes
    ],
)
def test_what_the_full_path_would_refuse_is_not_peeked(value: bytes | None, key: bytes) -> None:
    assert peeked(rec(value, key)) == []


def test_positions_are_those_in_the_records_given() -> None:
    records = [rec(b"{bad"), rec(usage(reference="a")), rec(None), rec(usage(reference="b"))]
    assert [p[0] for p in peeked(*records)] == [1, 3]


def test_a_lane_probes_after_a_batch_of_mostly_duplicates_and_stops_when_little_is_known() -> None:
    modes = LaneModes()
    lane = ("billing.usage", 0)
    assert not modes.probing(lane)
    assert modes.observe(lane, probed=False, records=100, duplicates=49, known=0) is None
    assert modes.observe(lane, probed=False, records=100, duplicates=50, known=0) == "started"
    assert modes.probing(lane)
    assert not modes.probing(("billing.usage", 1))  # per lane
    assert modes.observe(lane, probed=True, records=100, duplicates=100, known=90) is None
    # Duplicates alone (rows stored without a digest) do not keep a lane probing.
    assert modes.observe(lane, probed=True, records=100, duplicates=100, known=10) == "stopped"
    for _ in range(LaneModes.COOLDOWN_BATCHES):
        assert modes.observe(lane, probed=False, records=100, duplicates=100, known=0) is None
    assert modes.observe(lane, probed=False, records=100, duplicates=100, known=0) == "started"


def test_a_batch_prepared_before_the_switch_counts_for_the_mode_it_was_prepared_in() -> None:
    modes = LaneModes()
    lane = ("billing.usage", 0)
    modes.observe(lane, probed=False, records=10, duplicates=10, known=0)
    # The next batch was parsed in full before the switch: its duplicates do not stop it.
    assert modes.observe(lane, probed=False, records=10, duplicates=10, known=0) is None
    assert modes.probing(lane)


def test_a_replay_probes_from_its_first_batch() -> None:
    modes = LaneModes(probe_first=True)
    lane = ("billing.usage", 0)
    assert modes.probing(lane)
    assert modes.observe(lane, probed=True, records=0, duplicates=0, known=0) is None
    assert modes.observe(lane, probed=True, records=4, duplicates=0, known=0) == "stopped"


def test_a_lane_expected_to_hold_known_records_probes_until_its_batches_say_otherwise() -> None:
    modes = LaneModes()
    modes.expect_known("fresh")
    assert modes.probing("fresh") and not modes.probing("other")
    assert modes.observe("fresh", probed=True, records=10, duplicates=0, known=0) == "stopped"
    modes.expect_known("fresh")  # reassigned: what its batches taught it stands
    assert not modes.probing("fresh")
