"""Kafka clients built from settings: consumers with manual offsets, producers with acks=all,
the topic list, and `topics ensure`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
    RebalanceInProgressError,
    TopicAlreadyExistsError,
)

from workers.settings import Settings


def is_transient(exc: BaseException) -> bool:
    """True when the broker is away or busy (retry); false when the partitions moved on (a
    commit refused after a rebalance: the new owner re-reads, dedup absorbs it) or the
    request is wrong."""
    if isinstance(exc, CommitFailedError | IllegalStateError | RebalanceInProgressError):
        return False
    if isinstance(exc, KafkaConnectionError | asyncio.TimeoutError):
        return True
    # The client raises KafkaError itself, no subclass, when no broker answers a metadata
    # request ("Unable to get cluster metadata over all known brokers"): the broker is away.
    return type(exc) is KafkaError or (
        isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))
    )


def client_options(settings: Settings) -> dict[str, Any]:
    """What every client shares: the servers, connection security (SASL/SCRAM, PLAIN,
    TLS) and how long a request may wait for the broker's answer."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_security_protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return options


def input_topics(settings: Settings) -> dict[str, str]:
    return {"charges": settings.topic_charges, "usage": settings.topic_usage}


def all_topics(settings: Settings) -> list[str]:
    return [
        settings.topic_charges,
        settings.topic_usage,
        settings.topic_alerts,
        settings.topic_payouts,
        settings.topic_dlq,
    ]


def make_consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None,
    max_records: int | None = None,
    client_id: str = "chargeline",
) -> AIOKafkaConsumer:
    """A consumer that never commits by itself: offsets move only after the database commit."""
    max_bytes = max(settings.max_event_bytes * 4, 1 << 20)
    return AIOKafkaConsumer(
        *topics,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=max_records or settings.batch_max_records,
        # A batch may have to wait out a Postgres outage before it commits; stay in the group.
        max_poll_interval_ms=600_000,
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(100, settings.kafka_session_timeout_ms // 4),
        fetch_max_bytes=max(52_428_800, max_bytes),
        max_partition_fetch_bytes=max_bytes,
        # aiokafka's default (500 ms) is the floor of the end-to-end latency whenever a
        # fetch covers a partition with nothing new: a quiet partition must not hold back a
        # busy one's batch for half a second.
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        **client_options(settings),
    )


def make_producer(
    settings: Settings, *, client_id: str = "chargeline", linger_ms: int = 5
) -> AIOKafkaProducer:
    """A producer whose records are acknowledged by all in-sync replicas. ``linger_ms``
    holds a batch open for more records; with 0 a batch goes as soon as the last request
    to its broker has been answered, and the records that came meanwhile go together."""
    return AIOKafkaProducer(
        client_id=client_id,
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=linger_ms,
        max_batch_size=1 << 20,
        max_request_size=max(settings.max_event_bytes * 2, 1 << 20),
        **client_options(settings),
    )


async def ensure_topics(
    settings: Settings, partitions: int | None = None, replication_factor: int | None = None
) -> list[str]:
    """Create the missing topics; return the names created."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()  # in the try: a client that failed to start is closed too
        existing = set(await admin.list_topics())
        wanted = [name for name in all_topics(settings) if name not in existing]
        if not wanted:
            return []
        new = [
            NewTopic(
                name,
                num_partitions=partitions or settings.topic_partitions,
                replication_factor=replication_factor or settings.topic_replication_factor,
            )
            for name in wanted
        ]
        with contextlib.suppress(TopicAlreadyExistsError):  # another process was quicker
            await admin.create_topics(new)
        return wanted
    finally:
        await admin.close()


async def partition_counts(settings: Settings, names: Sequence[str]) -> dict[str, int]:
    """How many partitions each of the topics ``names`` has (those that exist)."""
    if not names:
        return {}
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        described = await admin.describe_topics(list(names))
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["partitions"]}


def encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> str:
    """Kafka headers as JSON for jsonb columns; values base64, as they may be any bytes, or
    null (a header may have no value)."""
    return orjson.dumps(
        [
            [name, None if value is None else base64.b64encode(value).decode()]
            for name, value in headers
        ]
    ).decode()


def decode_headers(stored: Any) -> list[tuple[str, bytes]]:
    """The headers ``encode_headers`` stored; a header without a value comes back empty."""
    rows = orjson.loads(stored) if isinstance(stored, str | bytes) else stored
    return [(str(name), b"" if value is None else base64.b64decode(value)) for name, value in rows]
