"""Back-off and retry (workers.retry): transient failures are retried with growing, jittered
pauses and counted; permanent ones propagate at once; a stop request while the work still
fails raises Stopping; ``max_attempts`` bounds the tries."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)

from workers import kafka
from workers.metrics import Metrics
from workers.retry import Stopping, retry_transient
from workers.settings import Settings

SETTINGS = Settings(retry_initial_ms=1, retry_max_ms=4)


class Flaky:
    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def transient(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError)


def retries(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("chargeline_retries_total", {"component": "x"}) or 0


async def test_transient_failures_are_retried_and_counted() -> None:
    metrics = Metrics()
    work = Flaky(3, ConnectionError("down"))
    result = await retry_transient(
        work, is_transient=transient, component="x", settings=SETTINGS, metrics=metrics
    )
    assert (result, work.calls, retries(metrics)) == ("done", 4, 3)


async def test_a_permanent_failure_propagates_at_once() -> None:
    metrics = Metrics()
    work = Flaky(1, ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        await retry_transient(
            work, is_transient=transient, component="x", settings=SETTINGS, metrics=metrics
        )
    assert (work.calls, retries(metrics)) == (1, 0)


async def test_max_attempts_bounds_the_tries() -> None:
    work = Flaky(10, ConnectionError("down"))
    with pytest.raises(ConnectionError):
        await retry_transient(
            work, is_transient=transient, component="x", settings=SETTINGS, metrics=Metrics(),
            max_attempts=3,
        )  # fmt: skip
    assert work.calls == 3


async def test_a_stop_request_during_an_outage_raises_stopping() -> None:
    stopping = asyncio.Event()
    stopping.set()
    work = Flaky(10, ConnectionError("down"))
    with pytest.raises(Stopping, match="x still failing at shutdown"):
        await retry_transient(
            work, is_transient=transient, component="x", settings=SETTINGS, metrics=Metrics(),
            stopping=stopping,
        )  # fmt: skip
    assert work.calls == 1


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        # No broker answered a metadata request (a broker frozen past the request timeout):
        # the lag monitor's topics() raised this and stopped the whole worker.
        (KafkaError("Unable to get cluster metadata over all known brokers"), True),
        (KafkaConnectionError("connection refused"), True),
        (RequestTimedOutError(), True),
        (CommitFailedError("the group moved on"), False),
        (TopicAuthorizationFailedError(), False),
    ],
)
def test_which_kafka_errors_are_an_outage(error: Exception, retried: bool) -> None:
    assert kafka.is_transient(error) is retried
