"""JSON Schema of every event, for producers and consumers not written in Python.

``python -m schemas.export [DIR]`` writes them (default: ``schemas/json/`` in this package);
``tests/unit/test_jsonschema_current.py`` fails when the files lag behind the models.

Input schemas are in validation mode (what chargeline accepts), output schemas in
serialization mode (what it emits). Every rule JSON Schema can state is in them, with the
worker's own character sets and grammars (printable identifiers, currency codes, RFC 3339
timestamps, decimal strings); the few it cannot state (the 8 KiB size and storable content
of ``metadata``, ``occurred_at`` at most 5 minutes ahead, ``expires_at`` after
``effective_at``, an instant within years 1-9999 in UTC, integers written without a
fraction) are written into the ``description`` fields.

The long patterns (printable text, some 700 code point ranges; the currency codes) are
written once per file, under ``$defs``, and referenced where used. The files are ASCII:
every other character is a JSON escape (``\\u200b``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas import printable
from schemas.currency import CURRENCY_JSON_SCHEMA_PATTERN
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
# Patterns written once per file, under $defs: name, and the definition holding the pattern.
_SHARED_PATTERNS: dict[str, tuple[str, dict[str, Any]]] = {
    printable.JSON_SCHEMA_PATTERN: (
        "PrintableText",
        {
            "type": "string",
            "description": "Printable characters only: none of the Unicode "
            f"{printable.UNICODE_VERSION} general categories Cc, Cf, Cs, Co, Cn, Zl, Zp and "
            "Zs but the ASCII space (what Python 3.11's str.isprintable accepts). The "
            "pattern is a code point class: read it with the u flag in ECMA 262.",
        },
    ),
    CURRENCY_JSON_SCHEMA_PATTERN: (
        "ActiveCurrencyCode",
        {
            "type": "string",
            "description": "An active ISO 4217 alphabetic code, each ASCII letter in either case.",
        },
    ),
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
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": name, **_share_patterns(schema), "title": title}


def _share_patterns(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with each long pattern moved into ``$defs`` and referenced where used
    (a ``$ref`` beside other keywords applies both, from draft 2019-09 on)."""
    shared: dict[str, dict[str, Any]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            pattern = node.get("pattern")
            if isinstance(pattern, str) and pattern in _SHARED_PATTERNS:
                name, definition = _SHARED_PATTERNS[pattern]
                shared[name] = {**definition, "pattern": pattern}
                del node["pattern"]
                node["$ref"] = f"#/$defs/{name}"
            for value in node.values():
                visit(value)

    visit(schema)
    if shared:
        schema["$defs"] = {**schema.get("$defs", {}), **shared}
    return schema


def render(schema: dict[str, Any]) -> str:
    """The file content of one schema: ASCII, indented, sorted keys, trailing newline.

    Every character beyond ASCII is a JSON escape (``\\u00a0``), DEL too: the long
    patterns hold invisible, combining and right-to-left characters that would make the file
    unreadable, or unsafe to edit, as they are.
    """
    text = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=True)
    return text.replace("\x7f", "\\u007f") + "\n"


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
