"""``BatchHistogram`` exposes exactly what a ``prometheus_client.Histogram`` would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from workers.metrics import LAG_BUCKETS, BatchHistogram


def _exposition(registry: CollectorRegistry) -> list[str]:
    # _created is the creation time of each series: Histogram has it, BatchHistogram not.
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def test_batch_histogram_matches_histogram_sample_for_sample() -> None:
    rng = random.Random(1)
    # Bounds themselves (le is inclusive), zero, past the last bound, and values between.
    edges = [0.0, 0.005, 0.1, 1.0, 3600.0, 5000.0]
    observations = {
        topic: [rng.choice(edges) if rng.random() < 0.2 else rng.random() * 3 for _ in range(5000)]
        for topic in ("billing.usage", "billing.charges")
    }
    expected_registry, actual_registry = CollectorRegistry(), CollectorRegistry()
    expected = Histogram(
        "chargeline_event_lag_seconds", "Lag.", ["topic"], buckets=LAG_BUCKETS,
        registry=expected_registry,
    )  # fmt: skip
    actual = BatchHistogram(
        "chargeline_event_lag_seconds", "Lag.", "topic", LAG_BUCKETS, actual_registry
    )
    for topic, values in observations.items():
        for value in values:
            expected.labels(topic=topic).observe(value)
        actual.observe_many(topic, values[:1000])  # fed in several batches
        actual.observe_many(topic, values[1000:])

    got, want = _exposition(actual_registry), _exposition(expected_registry)
    # Sums are added up in another order (per batch): equal up to rounding.
    assert [line for line in got if "_sum" not in line] == [
        line for line in want if "_sum" not in line
    ]
    got_sums = [float(line.split()[-1]) for line in got if "_sum{" in line]
    want_sums = [float(line.split()[-1]) for line in want if "_sum{" in line]
    assert got_sums == pytest.approx(want_sums, rel=1e-12) and len(got_sums) == 2
    infinite = [line for line in got if 'le="+Inf"' in line]
    assert len(infinite) == 2 and all(line.endswith(" 5000.0") for line in infinite)
