"""How a batch is split into parts: one per lane, or a small batch's topic as one part that
keeps the order of every lane it stands for."""

from __future__ import annotations

import orjson

from workers.app import build_handlers
from workers.ingest.parse import BareRecord
from workers.ingest.processor import (
    MERGED_LANE,
    SMALL_PART_RECORDS,
    BatchProcessor,
    offset_ranges,
)
from workers.metrics import Metrics
from workers.settings import Settings

SETTINGS = Settings(batch_lanes=3)
USAGE, CHARGES = SETTINGS.topic_usage, SETTINGS.topic_charges


def processor() -> BatchProcessor:
    return BatchProcessor(SETTINGS, build_handlers(SETTINGS, ["charges", "usage"]), Metrics())


def records(topic: str, count: int, partitions: int = 6) -> list[BareRecord]:
    out = []
    for n in range(count):
        customer = f"c{n % 7}"
        value = orjson.dumps(
            {"type": "usage", "customer_ref": customer, "reference": f"u{n}", "tokens": 1}
        )
        out.append(
            BareRecord(topic, n % partitions, n, customer.encode(), value, 1_700_000_000_000)
        )
    return out


def test_a_small_batch_of_a_topic_is_one_part_covering_every_lane_in_fetch_order() -> None:
    batch = records(USAGE, 10)
    [part] = processor().prepare(batch)
    assert part.lane == (USAGE, MERGED_LANE)
    assert part.covers == ((USAGE, 0), (USAGE, 1), (USAGE, 2))
    assert [p.record for p in part.parsed] == batch


def test_a_large_batch_is_one_part_per_lane() -> None:
    batch = records(USAGE, SMALL_PART_RECORDS * 3)
    parts = processor().prepare(batch)
    assert sorted(part.lane for part in parts) == [(USAGE, 0), (USAGE, 1), (USAGE, 2)]
    for part in parts:
        assert part.covers == (part.lane,)
        assert all(p.record.partition % 3 == part.lane[1] for p in part.parsed)


def test_each_topic_is_judged_on_its_own_share_of_the_batch() -> None:
    parts = processor().prepare(records(USAGE, SMALL_PART_RECORDS * 3) + records(CHARGES, 5))
    lanes = sorted(part.lane for part in parts)
    assert lanes == [(CHARGES, MERGED_LANE), (USAGE, 0), (USAGE, 1), (USAGE, 2)]


def test_a_topic_with_a_lane_probing_for_known_records_keeps_its_lanes() -> None:
    split = processor()
    split.lane_modes.expect_known((USAGE, 1))  # a partition read from its start by this group
    parts = split.prepare(records(USAGE, 10))
    assert sorted(part.lane for part in parts) == [(USAGE, 0), (USAGE, 1), (USAGE, 2)]
    assert [part.probed for part in sorted(parts, key=lambda p: p.lane)] == [False, True, False]


def test_one_lane_is_never_merged() -> None:
    one = BatchProcessor(Settings(batch_lanes=1), build_handlers(SETTINGS, ["usage"]), Metrics())
    [part] = one.prepare(records(USAGE, 10))
    assert part.lane == (USAGE, 0)


def test_offset_ranges_name_each_partition_a_part_read() -> None:
    read = [BareRecord("billing.usage", p, o, None, b"{}", 0) for p, o in [(3, 9), (1, 4), (3, 7)]]
    assert offset_ranges(read) == {"billing.usage/1": "4-4", "billing.usage/3": "7-9"}
