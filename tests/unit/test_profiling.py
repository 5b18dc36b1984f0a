"""The bench's profile summary: py-spy's collapsed stacks, and our statements named."""

from __future__ import annotations

from workers.db import QUERIES
from workers.devtools.bench.profile import maintenance_between, statement_name, top_frames

FOLDED = """\
main (workers/cli/main.py:10);apply (workers/runtime.py:5);validate_json (pydantic/type_adapter.py:1) 6
main (workers/cli/main.py:10);apply (workers/runtime.py:7);execute (asyncpg/connection.py:2) 3
main (workers/cli/main.py:10);select (selectors.py:4) 1
"""


def test_top_frames_merges_lines_and_counts_each_function_once_per_sample() -> None:
    summary = top_frames(FOLDED)
    assert summary["samples"] == 10
    assert summary["self"] == [
        ("validate_json (pydantic/type_adapter.py)", 60.0),
        ("execute (asyncpg/connection.py)", 30.0),
        ("select (selectors.py)", 10.0),
    ]
    # apply's two lines are one function; library frames and the entry point are left out
    # of our code's share.
    assert summary["ours_inclusive"] == [("apply (workers/runtime.py)", 90.0)]


def test_top_frames_of_nothing() -> None:
    assert top_frames("") == {"samples": 0, "self": [], "ours_inclusive": []}


def test_our_statements_are_named_whatever_their_comments_and_layout() -> None:
    shown = "\n".join(
        line for line in QUERIES["record_usage"].splitlines() if not line.startswith("--")
    )
    assert statement_name("   " + shown.replace("\n", "\n    ")) == "record_usage"
    # pg_stat_statements turns constants into parameters numbered after ours.
    claim = QUERIES["claim_reloads"].replace("'charging'", "$3").replace("+ 1", "+ $4")
    assert statement_name(claim) == "claim_reloads"
    assert statement_name('COPY "ledger_entries"("seq") FROM STDIN') == "COPY ledger_entries"
    assert statement_name("SELECT  1\n  FROM t") == "SELECT 1 FROM t"
    long = statement_name("SELECT " + "x, " * 40 + "y")
    assert len(long) == 60 and long.startswith("SELECT x, x,") and long.endswith("...")


def test_maintenance_between_lists_what_autovacuum_did_most_time_first() -> None:
    def runs(vacuums: int, vacuum_ms: float, analyzes: int, analyze_ms: float) -> dict[str, float]:
        return {
            "autovacuum_count": vacuums, "total_autovacuum_time": vacuum_ms,
            "autoanalyze_count": analyzes, "total_autoanalyze_time": analyze_ms,
        }  # fmt: skip

    before = {"grants": runs(1, 10, 0, 0), "customers": runs(2, 5, 1, 1), "flows": runs(0, 0, 1, 2)}
    after = {
        "grants": runs(3, 40, 1, 5),
        "customers": runs(3, 9, 1, 1),
        "flows": runs(0, 0, 1, 2),  # left alone: not listed
        "ledger_entries": runs(0, 0, 2, 300),  # new since the first reading
    }
    assert maintenance_between(before, after) == [
        {"table": "ledger_entries", "vacuums": 0, "vacuum_ms": 0, "analyzes": 2, "analyze_ms": 300},
        {"table": "grants", "vacuums": 2, "vacuum_ms": 30, "analyzes": 1, "analyze_ms": 5},
        {"table": "customers", "vacuums": 1, "vacuum_ms": 4, "analyzes": 0, "analyze_ms": 0},
    ]
