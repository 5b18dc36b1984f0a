"""JSON Schema of every event, for producers and consumers not written in Python.

``python -m schemas.export [DIR]`` writes them (default: ``schemas/json/`` in this package);
``tests/unit/test_jsonschema_current.py`` fails when the files lag behind the models.

Input schemas are in validation mode (what chargeline accepts), output schemas in
serialization mode (what it emits). A few rules JSON Schema cannot state (printable
identifiers, the 8 KiB size of ``metadata``, ``occurred_at`` at most 5 minutes ahead,
``expires_at`` after ``effective_at``) are written into the ``description`` fields.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.events import INPUT_EVENT, ChargeEvent, CreditGrantEvent, CreditVoidEvent, UsageEvent
from schemas.outputs import AlertEvent, PayoutEvent

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_DIR = Path(__file__).resolve().parent / "json"

_INPUTS: dict[str, type[BaseModel] | TypeAdapter[Any]] = {
    "charge.schema.json": ChargeEvent,
    "usage.schema.json": UsageEvent,
    "credit_grant.schema.json": CreditGrantEvent,
    "credit_void.schema.json": CreditVoidEvent,
    "input_event.schema.json": INPUT_EVENT,
}
_OUTPUTS: dict[str, type[BaseModel]] = {
    "alert.schema.json": AlertEvent,
    "payout.schema.json": PayoutEvent,
}
_TITLES = {
    "input_event.schema.json": "InputEvent",
}
_INPUT_EVENT_DESCRIPTION = (
    "Any event accepted on billing.charges (charge) or billing.usage (usage, credit_grant, "
    "credit_void), told apart by its type."
)


def export_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of every input and output event."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, source in _INPUTS.items():
        if isinstance(source, TypeAdapter):
            schema = source.json_schema(mode="validation")
            schema.setdefault("description", _INPUT_EVENT_DESCRIPTION)
        else:
            schema = source.model_json_schema(mode="validation")
        schemas[name] = _identify(name, schema)
    for name, model in _OUTPUTS.items():
        schemas[name] = _identify(name, model.model_json_schema(mode="serialization"))
    return schemas


def _identify(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    title = _TITLES.get(name) or schema.get("title") or name
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": name, **schema, "title": title}


def render(schema: dict[str, Any]) -> str:
    """The file content of one schema: indented, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in export_schemas().items():
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        print("usage: python -m schemas.export [DIR]", file=sys.stderr)
        return 2
    for path in write_schemas(Path(args[0]) if args else SCHEMA_DIR):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
