"""Rows as the API shows them: JSON columns decoded."""

from __future__ import annotations

from typing import Any

import orjson


def charge_document(row: Any) -> dict[str, Any]:
    charge = dict(row.items())
    if charge.get("metadata") is not None:
        charge["metadata"] = orjson.loads(charge["metadata"])
    return charge


def flow_document(row: Any) -> dict[str, Any]:
    flow = dict(row.items())
    if isinstance(flow.get("amounts"), str):
        flow["amounts"] = orjson.loads(flow["amounts"])
    return flow
