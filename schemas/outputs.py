"""Output events: what chargeline publishes on ``billing.alerts``, ``billing.payouts`` and
``billing.dlq``.

The models serialize with ``model_dump_json()``; timestamps come out as RFC 3339 in UTC with
milliseconds (``2026-11-22T10:00:01.120Z``). Every field is always present (``null`` where
it does not apply), so consumers see one fixed shape per topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from schemas.common import (
    DEAD_LETTER_REASONS,
    MAX_TEXT_LENGTH,
    DeadLetterReason,
    UtcMillis,
    truncate,
)
from schemas.currency import CurrencyCode


class _Output(BaseModel):
    # Every field is always emitted, so the serialization schema lists them all as required.
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, json_schema_serialization_defaults_required=True
    )


AlertType = Literal[
    "credit_balance_depleted",
    "credit_balance_recovered",
    "credit_balance_low",
    "auto_reload_succeeded",
    "auto_reload_failed",
    "auto_reload_disabled",
]
ALERT_TYPES: tuple[AlertType, ...] = get_args(AlertType)

__all__ = [
    "ALERT_TYPES",
    "DEAD_LETTER_REASONS",
    "AlertCause",
    "AlertEvent",
    "AlertType",
    "DeadLetterHeaders",
    "DeadLetterReason",
    "PayoutEvent",
    "PayoutStatus",
]


class AlertCause(_Output):
    """What made the balance move: an input event (``usage``, ``credit_grant``,
    ``credit_void``, with its reference) or chargeline itself (``expiry``, ``auto_reload``,
    with the grant or reload reference where there is one)."""

    type: str
    reference: str | None = None


class AlertEvent(_Output):
    """A balance crossing or an auto-reload outcome for one customer (topic
    ``billing.alerts``, key ``customer_ref``). Edge-triggered: one alert per crossing.
    ``alert_id`` is stable across re-publication, so consumers can drop duplicates."""

    type: AlertType
    alert_id: str = Field(description="Stable id of this alert; deduplicate on it.")
    customer_ref: str
    balance: int = Field(description="Token balance after the change (negative in overage).")
    previous_balance: int | None = Field(
        default=None, description="Token balance before the change, where there was one."
    )
    threshold: int | None = Field(
        default=None,
        description="The threshold crossed (credit_balance_low, auto-reload), else null.",
    )
    cause: AlertCause
    at: UtcMillis = Field(description="When the balance changed (UTC, milliseconds).")
    detail: dict[str, Any] | None = Field(
        default=None,
        description='Extra facts, e.g. {"stripe_code": "card_declined"} for auto_reload_failed.',
    )


PayoutStatus = Literal["pending", "sent", "failed", "recorded", "cancelled"]

# The Kafka header of every billing.payouts record: the payout's revision, in ASCII digits.
# 1 for the record of the cut that closed it, + 1 for each status change after it, so
# (payout_id, revision) identifies a record; the status alone repeats when a retried payout
# fails again.
HEADER_PAYOUT_REVISION = "chargeline.payout.revision"


class PayoutEvent(_Output):
    """A closed payout: every recorded charge of one payee and currency not yet paid out,
    recorded before ``period_end`` (topic ``billing.payouts``, key ``payee_ref``). Published
    when a cut closes it and again at each change of its ``status``, with its new status."""

    type: Literal["payout"] = "payout"
    payout_id: str
    payee_ref: str
    currency: CurrencyCode
    period_start: UtcMillis
    period_end: UtcMillis
    charge_count: int = Field(ge=0)
    amount: int = Field(ge=0, description="Sum of the charges, in the currency's minor units.")
    status: PayoutStatus = Field(
        description=(
            "recorded (paid outside chargeline), or for a Stripe payee pending, sent or failed;"
            " cancelled: given up by an operator, its charges released to the next payout"
            " (charge_count and amount say what it held)."
        )
    )
    created_at: UtcMillis

    @model_validator(mode="after")
    def _period_in_order(self) -> PayoutEvent:
        if self.period_end <= self.period_start:
            raise ValueError("period_end should be after period_start")
        return self


HEADER_REASON = "chargeline.reason"
HEADER_DETAIL = "chargeline.detail"
HEADER_SOURCE_TOPIC = "chargeline.source.topic"
HEADER_SOURCE_PARTITION = "chargeline.source.partition"
HEADER_SOURCE_OFFSET = "chargeline.source.offset"


def _short_detail(text: str) -> str:
    return truncate(text, MAX_TEXT_LENGTH)


class DeadLetterHeaders(_Output):
    """The headers of a ``billing.dlq`` record. Its key and value are the original record's
    bytes; these headers say why it was refused and where it came from."""

    reason: DeadLetterReason
    detail: Annotated[str, AfterValidator(_short_detail)] = Field(
        default="", description="One readable line, at most 500 characters."
    )
    source_topic: str
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)

    def to_kafka_headers(self) -> list[tuple[str, bytes]]:
        """The headers as aiokafka takes them: ``[(name, UTF-8 bytes), ...]``."""
        return [
            (HEADER_REASON, self.reason.encode()),
            (HEADER_DETAIL, self.detail.encode()),
            (HEADER_SOURCE_TOPIC, self.source_topic.encode()),
            (HEADER_SOURCE_PARTITION, str(self.source_partition).encode()),
            (HEADER_SOURCE_OFFSET, str(self.source_offset).encode()),
        ]

    @classmethod
    def from_kafka_headers(cls, headers: Iterable[tuple[str, bytes]]) -> DeadLetterHeaders:
        """Read the headers back from a ``billing.dlq`` record (other headers are ignored);
        raises ``pydantic.ValidationError`` when one is missing or malformed."""
        found = {name: value for name, value in headers if name.startswith("chargeline.")}

        def text(name: str) -> str | None:
            value = found.get(name)
            return None if value is None else value.decode("utf-8", "replace")

        def number(name: str) -> int | str | None:
            value = text(name)
            return int(value) if value is not None and value.isdecimal() else value

        return cls.model_validate(
            {
                "reason": text(HEADER_REASON),
                "detail": text(HEADER_DETAIL) or "",
                "source_topic": text(HEADER_SOURCE_TOPIC),
                "source_partition": number(HEADER_SOURCE_PARTITION),
                "source_offset": number(HEADER_SOURCE_OFFSET),
            }
        )
