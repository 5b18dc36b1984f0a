"""BatchPipeline: lanes in order, side by side; batches finished in order; a failure stops
its lane and every later batch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from workers.ingest.pipeline import BatchPipeline, LaneBroken


@dataclass(frozen=True)
class Piece:
    lane: str
    name: str
    also: tuple[str, ...] = ()  # more lanes it stands for

    @property
    def covers(self) -> tuple[str, ...]:
        return (self.lane, *self.also)


class Recorder:
    """Applies pieces when the test releases them, and records what happened in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def apply(self, batch: str, piece: Piece) -> str:
        self.log.append(f"start {piece.name}")
        await self.gate(piece.name).wait()
        if piece.name in self.failing:
            self.log.append(f"fail {piece.name}")
            raise RuntimeError(f"{piece.name} failed")
        self.log.append(f"applied {piece.name}")
        return piece.name

    async def finish(self, batch: str, applied: list[str]) -> None:
        self.log.append(f"finished {batch}: {','.join(applied)}")


def pipeline(recorder: Recorder, max_batches: int = 2) -> BatchPipeline[str, Piece, str]:
    return BatchPipeline(apply=recorder.apply, finish=recorder.finish, max_batches=max_batches)


async def settle_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lane_waits_for_its_previous_part_and_not_for_other_lanes() -> None:
    rec = Recorder()
    pipe = pipeline(rec)
    await pipe.submit("b1", [Piece("a", "a1"), Piece("b", "b1")])
    await pipe.submit("b2", [Piece("a", "a2"), Piece("b", "b2")])
    await settle_loop()
    assert rec.log == ["start a1", "start b1"]

    rec.gate("b1").set()
    rec.gate("b2").set()
    await settle_loop()
    # Lane b moved on to batch 2 while lane a still holds batch 1; neither batch finished.
    assert rec.log == ["start a1", "start b1", "applied b1", "start b2", "applied b2"]

    rec.gate("a1").set()
    rec.gate("a2").set()
    await pipe.settle()
    later = rec.log[5:]
    assert later.index("applied a1") < later.index("start a2")
    assert [line for line in later if line.startswith("finished")] == [
        "finished b1: a1,b1",
        "finished b2: a2,b2",
    ]


async def test_a_part_covering_several_lanes_follows_each_and_each_follows_it() -> None:
    rec = Recorder()
    pipe = pipeline(rec, max_batches=3)
    await pipe.submit("b1", [Piece("a", "a1"), Piece("b", "b1"), Piece("c", "c1")])
    await pipe.submit("b2", [Piece("a", "ab2", also=("b",))])  # a small batch: one part
    await pipe.submit("b3", [Piece("a", "a3"), Piece("b", "b3"), Piece("c", "c3")])
    for name in ("a1", "c1", "c3"):
        rec.gate(name).set()
    await settle_loop()
    # Lane c, not covered, moved on; the covering part still waits for lane b.
    assert "start ab2" not in rec.log
    assert "applied c3" in rec.log

    rec.gate("b1").set()
    await settle_loop()
    assert rec.log.count("start ab2") == 1
    assert "start a3" not in rec.log and "start b3" not in rec.log

    for name in ("ab2", "a3", "b3"):
        rec.gate(name).set()
    await pipe.settle()
    log = rec.log
    for lane_part in ("a3", "b3"):
        assert log.index("applied ab2") < log.index(f"start {lane_part}")
    assert [line for line in log if line.startswith("finished")] == [
        "finished b1: a1,b1,c1",
        "finished b2: ab2",
        "finished b3: a3,b3,c3",
    ]


async def test_a_failed_part_covering_several_lanes_breaks_each() -> None:
    rec = Recorder()
    rec.failing.add("ab1")
    pipe = pipeline(rec, max_batches=3)
    await pipe.submit("b1", [Piece("a", "ab1", also=("b",)), Piece("c", "c1")])
    await pipe.submit("b2", [Piece("a", "a2"), Piece("b", "b2"), Piece("c", "c2")])
    for name in ("ab1", "c1", "a2", "b2", "c2"):
        rec.gate(name).set()
    with pytest.raises(RuntimeError, match="ab1 failed"):
        await pipe.settle()
    assert "start a2" not in rec.log and "start b2" not in rec.log
    assert "applied c2" in rec.log  # another lane: absorbed by dedup when redelivered
    with pytest.raises(RuntimeError, match="ab1 failed"):
        await pipe.settle()
    await pipe.abandon()


async def test_batches_finish_in_order_even_when_a_later_one_is_applied_first() -> None:
    rec = Recorder()
    pipe = pipeline(rec)
    await pipe.submit("b1", [Piece("a", "a1")])
    await pipe.submit("b2", [Piece("b", "b2")])
    rec.gate("b2").set()
    await settle_loop()
    assert "applied b2" in rec.log
    assert not any(line.startswith("finished") for line in rec.log)
    rec.gate("a1").set()
    await pipe.settle()
    assert [line for line in rec.log if line.startswith("finished")] == [
        "finished b1: a1",
        "finished b2: b2",
    ]


async def test_submit_waits_while_max_batches_are_in_flight() -> None:
    rec = Recorder()
    pipe = pipeline(rec, max_batches=2)
    await pipe.submit("b1", [Piece("a", "a1")])
    await pipe.submit("b2", [Piece("a", "a2")])
    third = asyncio.create_task(pipe.submit("b3", [Piece("a", "a3")]))
    await settle_loop()
    assert not third.done()
    assert len(pipe) == 2
    rec.gate("a1").set()
    await third
    assert len(pipe) == 2  # b2 and b3
    rec.gate("a2").set()
    rec.gate("a3").set()
    await pipe.settle()
    assert len(pipe) == 0


async def test_a_failure_stops_its_lane_and_every_later_batch() -> None:
    rec = Recorder()
    rec.failing.add("a1")
    pipe = pipeline(rec)
    await pipe.submit("b1", [Piece("a", "a1"), Piece("b", "b1")])
    await pipe.submit("b2", [Piece("a", "a2"), Piece("b", "b2")])
    for name in ("a1", "b1", "a2", "b2"):
        rec.gate(name).set()
    with pytest.raises(RuntimeError, match="a1 failed"):
        await pipe.settle()
    assert "start a2" not in rec.log  # it would have overtaken a1's records
    assert "applied b2" in rec.log  # another lane: absorbed by dedup when redelivered
    assert not any(line.startswith("finished") for line in rec.log)  # no offsets moved
    # The second batch fails too, and for the same reason.
    with pytest.raises(RuntimeError, match="a1 failed"):
        await pipe.settle()
    await pipe.abandon()


async def test_a_lane_broken_by_a_failure_says_so() -> None:
    rec = Recorder()
    rec.failing.add("a1")
    pipe = pipeline(rec, max_batches=3)
    await pipe.submit("b1", [Piece("a", "a1")])
    await pipe.submit("b2", [Piece("a", "a2")])
    rec.gate("a1").set()
    await pipe.quiesce()
    assert rec.log == ["start a1", "fail a1"]
    broken = pipe._in_flight[-1].tasks[0]  # the lane's second part
    assert isinstance(broken.exception(), LaneBroken)
    await pipe.abandon()


async def test_abandon_cancels_running_parts() -> None:
    rec = Recorder()
    pipe = pipeline(rec)
    await pipe.submit("b1", [Piece("a", "a1")])
    await settle_loop()
    await pipe.abandon()
    assert len(pipe) == 0
    assert rec.log == ["start a1"]
    rec.gate("a1").set()
    await settle_loop()
    assert rec.log == ["start a1"]


async def test_a_failure_is_reported_when_it_happens_once_and_unfinished_parts_are_listed() -> None:
    rec = Recorder()
    reported: list[BaseException] = []
    pipe: BatchPipeline[str, Piece, str] = BatchPipeline(
        apply=rec.apply, finish=rec.finish, max_batches=2, on_failure=reported.append
    )
    rec.failing.add("a1")
    await pipe.submit("b1", [Piece("a", "a1"), Piece("b", "b1")])
    await pipe.submit("b2", [Piece("a", "a2"), Piece("b", "b2")])
    await settle_loop()
    assert [(batch, piece.name) for batch, piece in pipe.unfinished()] == [
        ("b1", "a1"),
        ("b1", "b1"),
        ("b2", "a2"),
        ("b2", "b2"),
    ]
    rec.gate("a1").set()
    await settle_loop()
    # Reported before anything waits for the batch, and only the first failure: the lane's
    # next part and the later batches fail because of it.
    assert [str(exc) for exc in reported] == ["a1 failed"]
    assert pipe.failure is reported[0]
    for name in ("b1", "b2"):
        rec.gate(name).set()
    await settle_loop()
    assert [str(exc) for exc in reported] == ["a1 failed"]
    assert pipe.unfinished() == []
    with pytest.raises(RuntimeError, match="a1 failed"):
        await pipe.settle()
