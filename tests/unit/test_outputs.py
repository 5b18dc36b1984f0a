"""Output events: alerts, payouts and dead-letter headers serialize to the SPEC's shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from schemas.outputs import (
    ALERT_TYPES,
    DEAD_LETTER_REASONS,
    AlertCause,
    AlertEvent,
    DeadLetterHeaders,
    PayoutEvent,
)

# SPEC section 5, verbatim.
SPEC_ALERT = b"""{"type": "credit_balance_depleted", "alert_id": "...", "customer_ref": "user_123",
 "balance": -120, "previous_balance": 30, "cause": {"type": "usage", "reference": "req-abc"},
 "at": "2026-11-22T10:00:01.120Z"}"""


def depleted(**changes: Any) -> AlertEvent:
    fields: dict[str, Any] = {
        "type": "credit_balance_depleted",
        "alert_id": "...",
        "customer_ref": "user_123",
        "balance": -120,
        "previous_balance": 30,
        "cause": AlertCause(type="usage", reference="req-abc"),
        "at": datetime(2026, 11, 22, 10, 0, 1, 120000, tzinfo=UTC),
    }
    return AlertEvent(**{**fields, **changes})


def test_alert_serialises_like_the_spec_example() -> None:
    emitted = orjson.loads(depleted().model_dump_json())
    example = orjson.loads(SPEC_ALERT)
    assert {k: emitted[k] for k in example} == example
    # The two fields the example leaves out are always present, null when not applicable.
    assert set(emitted) - set(example) == {"threshold", "detail"}
    assert emitted["threshold"] is None
    assert emitted["detail"] is None


def test_spec_alert_example_reads_back() -> None:
    alert = AlertEvent.model_validate_json(SPEC_ALERT)
    assert alert == depleted()
    assert orjson.loads(alert.model_dump_json()) == orjson.loads(depleted().model_dump_json())


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (datetime(2026, 11, 22, 10, 0, 1, 120999, tzinfo=UTC), "2026-11-22T10:00:01.120Z"),
        (datetime(2026, 11, 22, 10, 0, 1, tzinfo=UTC), "2026-11-22T10:00:01.000Z"),
        (
            datetime(2026, 11, 22, 11, 0, 1, 5000, tzinfo=timezone(timedelta(hours=1))),
            "2026-11-22T10:00:01.005Z",
        ),
        (
            datetime(2026, 11, 21, 23, 30, tzinfo=timezone(timedelta(hours=-10, minutes=-30))),
            "2026-11-22T10:00:00.000Z",
        ),
    ],
)
def test_alert_time_is_utc_with_milliseconds(at: datetime, expected: str) -> None:
    assert orjson.loads(depleted(at=at).model_dump_json())["at"] == expected


def test_alert_python_dump_keeps_datetimes() -> None:
    at = datetime(2026, 11, 22, 10, tzinfo=UTC)
    assert depleted(at=at).model_dump()["at"] == at


@pytest.mark.parametrize("alert_type", ALERT_TYPES)
def test_every_alert_type(alert_type: str) -> None:
    alert = depleted(type=alert_type, threshold=1000, detail={"stripe_code": "card_declined"})
    emitted = orjson.loads(alert.model_dump_json())
    assert emitted["type"] == alert_type
    assert emitted["threshold"] == 1000
    assert emitted["detail"] == {"stripe_code": "card_declined"}


def test_alert_types_are_the_spec_list() -> None:
    assert set(ALERT_TYPES) == {
        "credit_balance_depleted",
        "credit_balance_recovered",
        "credit_balance_low",
        "auto_reload_succeeded",
        "auto_reload_failed",
        "auto_reload_disabled",
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"type": "balance_gone"},
        {"at": datetime(2026, 11, 22, 10)},
        {"balance": 1.5},
        {"surprise": 1},
    ],
)
def test_alert_refuses_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        depleted(**changes)


def payout(**changes: Any) -> PayoutEvent:
    fields: dict[str, Any] = {
        "payout_id": "po_1",
        "payee_ref": "default",
        "currency": "eur",
        "period_start": datetime(2026, 11, 22, 9, tzinfo=UTC),
        "period_end": datetime(2026, 11, 22, 10, tzinfo=UTC),
        "charge_count": 3,
        "amount": 300,
        "status": "pending",
        "created_at": datetime(2026, 11, 22, 10, 0, 0, 250000, tzinfo=UTC),
    }
    return PayoutEvent(**{**fields, **changes})


def test_payout_serialises() -> None:
    assert orjson.loads(payout().model_dump_json()) == {
        "type": "payout",
        "payout_id": "po_1",
        "payee_ref": "default",
        "currency": "EUR",
        "period_start": "2026-11-22T09:00:00.000Z",
        "period_end": "2026-11-22T10:00:00.000Z",
        "charge_count": 3,
        "amount": 300,
        "status": "pending",
        "created_at": "2026-11-22T10:00:00.250Z",
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"period_end": datetime(2026, 11, 22, 9, tzinfo=UTC)},
        {"currency": "XXX"},
        {"amount": -1},
        {"status": "paid"},
        {"type": "charge"},
    ],
)
def test_payout_refuses_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        payout(**changes)


def test_dead_letter_reasons() -> None:
    assert DEAD_LETTER_REASONS == (
        "invalid_json",
        "invalid_event",
        "unknown_flow",
        "flow_paused",
        "reference_conflict",
        "payload_too_large",
        "key_mismatch",
        "wrong_topic",
        "unknown_grant",
        "unprocessable",
    )


def test_dead_letter_headers() -> None:
    headers = DeadLetterHeaders(
        reason="invalid_event",
        detail="amount: Input should be a valid integer",
        source_topic="billing.charges",
        source_partition=3,
        source_offset=1234,
    )
    assert headers.to_kafka_headers() == [
        ("chargeline.reason", b"invalid_event"),
        ("chargeline.detail", b"amount: Input should be a valid integer"),
        ("chargeline.source.topic", b"billing.charges"),
        ("chargeline.source.partition", b"3"),
        ("chargeline.source.offset", b"1234"),
    ]
    foreign = [("traceparent", b"00-abc"), *headers.to_kafka_headers()]
    assert DeadLetterHeaders.from_kafka_headers(foreign) == headers


def test_dead_letter_detail_is_cut_to_one_short_line() -> None:
    headers = DeadLetterHeaders(
        reason="reference_conflict",
        detail="é" * 10_000,
        source_topic="billing.usage",
        source_partition=0,
        source_offset=0,
    )
    assert len(headers.detail) == 500
    assert headers.detail.endswith("\u2026")


@pytest.mark.parametrize(
    "changes",
    [
        {"reason": "no_reason"},
        {"source_partition": -1},
        {"source_offset": "12"},
    ],
)
def test_dead_letter_headers_refuse_bad_values(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "reason": "invalid_json",
        "source_topic": "billing.usage",
        "source_partition": 0,
        "source_offset": 0,
    }
    with pytest.raises(ValidationError):
        DeadLetterHeaders(**{**fields, **changes})


def test_dead_letter_headers_missing_on_read() -> None:
    with pytest.raises(ValidationError):
        DeadLetterHeaders.from_kafka_headers([("chargeline.reason", b"invalid_json")])
