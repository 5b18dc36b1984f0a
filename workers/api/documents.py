"""Rows as the API shows them: JSON columns decoded."""

from __future__ import annotations

from typing import Any

import orjson

CHARGE_COLUMNS = (
    "charge_id", "flow_id", "customer_ref", "reference", "amount", "currency", "status",
    "metadata", "occurred_at", "recorded_at", "payout_id",
)  # fmt: skip
"""A charge's fields as the API shows them, in order."""


def charge_document(row: Any, columns: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The charge in ``row``: all its columns, or only ``columns`` of a wider row."""
    charge = dict(row.items()) if columns is None else {name: row[name] for name in columns}
    if charge.get("metadata") is not None:
        charge["metadata"] = orjson.loads(charge["metadata"])
    return charge


def flow_document(row: Any) -> dict[str, Any]:
    flow = dict(row.items())
    if isinstance(flow.get("amounts"), str):
        flow["amounts"] = orjson.loads(flow["amounts"])
    return flow
