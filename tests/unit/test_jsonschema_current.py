"""The exported JSON Schema files match the models: a model change without a re-export fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.export import SCHEMA_DIR, export_schemas, render, write_schemas

STALE = "schemas/json is out of date with the models: run `python -m schemas.export`"
EXPECTED_FILES = {
    "charge.schema.json",
    "usage.schema.json",
    "credit_grant.schema.json",
    "credit_void.schema.json",
    "input_event.schema.json",
    "alert.schema.json",
    "payout.schema.json",
}


def test_every_schema_is_exported() -> None:
    assert set(export_schemas()) == EXPECTED_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_schema_file_is_current(name: str) -> None:
    path = SCHEMA_DIR / name
    assert path.is_file(), f"{path} is missing; {STALE}"
    assert path.read_text(encoding="utf-8") == render(export_schemas()[name]), f"{name}: {STALE}"


def test_no_stale_schema_files() -> None:
    present = {path.name for path in SCHEMA_DIR.glob("*.json")}
    assert present == EXPECTED_FILES, f"unexpected files {present - EXPECTED_FILES}; {STALE}"


def test_schemas_identify_themselves() -> None:
    for name, schema in export_schemas().items():
        assert schema["$id"] == name
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["title"]


def test_rules_json_schema_cannot_state_are_described() -> None:
    usage = export_schemas()["usage.schema.json"]["properties"]
    assert "printable" in usage["reference"]["description"]
    assert "printable" in usage["customer_ref"]["description"]
    assert "5 minutes in the future" in json.dumps(usage["occurred_at"])
    assert "8192 bytes" in json.dumps(usage["metadata"])
    grant = export_schemas()["credit_grant.schema.json"]["properties"]
    assert "after effective_at" in grant["expires_at"]["description"]


def test_export_writes_the_files(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    assert {path.name for path in written} == EXPECTED_FILES
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("}\n")
        assert json.loads(text) == export_schemas()[path.name]
