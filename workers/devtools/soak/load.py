"""The soak's load: the bench's fixed-rate mix, with the exact duplicates and malformed
records of its drained load, planned ten seconds at a time."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from workers.devtools.bench.load import DEPLETING_EVERY, PARTITIONS, Planned, plan_fixed_rate

CHUNK_S = 10.0  # the load is planned and sent 10 s at a time
# What is due is sent in coarser ticks than the bench's short phases use (a producer's
# linger): the embedded broker's memory storage reads through every record batch a
# partition holds on each fetch, so its CPU grows with the batches sent, and over a long
# run finer ticks make its fetches, not chargeline, set the latency (the bench's README,
# "The embedded broker over a long run"). Records are stamped when sent, so the linger is
# not part of the latency measured.
SEND_TICK_S = 0.5
DUPLICATE_EVERY = 20  # 5% exact duplicates, as in the bench's drained load
MALFORMED_EVERY = 1_000  # 0.1% malformed (invalid JSON: dead-lettered)
PIECE = 10_000  # records planned at once; a multiple of a depletion's 4 x DEPLETING_EVERY


def soak_chunk(records: int, customers: int, run: str, topics: dict[str, str]) -> list[Planned]:
    """``records`` of the soak's load, planned and partitioned before they are sent: the
    bench's fixed-rate mix (``plan_fixed_rate``, in pieces whose references start with
    ``run`` and the piece's number, so that each chunk's are new), one record in
    ``DUPLICATE_EVERY`` an exact copy of an earlier one and one in ``MALFORMED_EVERY``
    invalid JSON. The depletions' steps are left alone, so that each depletion still raises
    its alert."""
    planned: list[Planned] = []
    for piece, start in enumerate(range(0, records, PIECE)):
        # orjson's bytes keep the buffer it wrote them in (4 KiB for a 200-byte record):
        # copied to their size, and planned a piece at a time, a chunk of 100,000 records
        # takes 30 MiB in the process that sends it, not 400.
        planned += (
            p._replace(value=bytes(memoryview(p.value)))
            for p in plan_fixed_rate(
                min(PIECE, records - start), customers, f"{run}{piece}-", topics
            )
        )
    key = b"cust-00001"
    partition = DefaultPartitioner()(key, list(range(PARTITIONS)), list(range(PARTITIONS)))
    for n in range(1, len(planned)):
        if planned[n].depleting is not None or n % DEPLETING_EVERY == 0:
            continue
        if n % MALFORMED_EVERY == MALFORMED_EVERY // 2 + 1:
            value = b'{"type": "usage", "tokens": 1.5, "ref' + f"{run}{n}".encode()
            planned[n] = Planned(topics["usage"], key, value, partition, None)
        elif n % DUPLICATE_EVERY == 1:
            planned[n] = planned[n // 2]
    return planned
