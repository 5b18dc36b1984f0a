"""Queries are loaded by name from workers/sql/*.sql: every name the code uses exists, none
is defined twice, none is empty."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.db import QUERIES, QUERIES_DIR, load_queries

REPO = Path(__file__).resolve().parents[2]


def test_each_query_has_a_body() -> None:
    assert QUERIES
    assert all(
        (sql.strip() and not sql.startswith("--")) or "\n" in sql for sql in QUERIES.values()
    )


def test_every_query_the_code_names_exists() -> None:
    used = set()
    for path in REPO.glob("workers/**/*.py"):
        used |= set(re.findall(r'QUERIES\["([a-z_0-9]+)"\]', path.read_text()))
    assert used, "no query names found: the pattern is out of date"
    assert sorted(used - QUERIES.keys()) == []


def test_a_name_defined_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.sql").write_text("-- name: same\nSELECT 1;\n")
    (tmp_path / "b.sql").write_text("-- name: same\nSELECT 2;\n")
    with pytest.raises(ValueError, match="query 'same' defined twice"):
        load_queries(tmp_path)


def test_blocks_are_split_at_their_headers(tmp_path: Path) -> None:
    (tmp_path / "q.sql").write_text("-- name: one\nSELECT 1;\n\n-- name: two\n-- why\nSELECT 2;\n")
    assert load_queries(tmp_path) == {"one": "SELECT 1;", "two": "-- why\nSELECT 2;"}
    assert QUERIES_DIR.is_dir()
