"""``chargeline bench --profile DIR``: where the drain's time goes, in the worker and in Postgres.

Three sources cover the drain phase (and autovacuum the fixed-rate phase after it too):

- py-spy samples the worker process. Its collapsed stacks go to ``worker.folded`` (which
  speedscope and flamegraph.pl read), and the frames that take the most samples, by
  function, to the summary;
- pg_stat_statements times every statement Postgres ran for the bench's database. The
  statements that took the most time go to the summary, named by their ``-- name:`` in
  ``workers/sql`` where they are ours;
- pg_stat_user_tables counts what autovacuum did meanwhile, per table, with its time
  (Postgres 18 and later). Its workers spend CPU outside every statement.

The profilers cost CPU, so the figures of a profiled run are not comparable with those of
a run without ``--profile``. Each source is optional: where one cannot be read (py-spy
missing or not allowed to attach, pg_stat_statements not loaded, a Postgres older than
18), the summary says why and the bench goes on.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from workers.db import QUERIES

SAMPLE_RATE_HZ = 100
TOP_FRAMES = 20
TOP_STATEMENTS = 12
_QUERY_PREFIX = 160  # characters of a statement's text that identify it
_SHOWN = 60  # characters shown of a statement that is not ours

_CREATE_EXTENSION = "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
_TOP_STATEMENTS_SQL = """
SELECT query, calls, rows, total_exec_time AS exec_ms, total_plan_time AS plan_ms
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time + total_plan_time DESC
LIMIT $1
"""


def _py_spy() -> str | None:
    # The virtualenv's bin directory is not always on PATH (`.venv/bin/chargeline bench`).
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass
class DrainProfile:
    """The profilers of one drain: started before it, finished after it."""

    out_dir: Path
    dsn: str
    spy: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)
    statements: bool = False
    # Autovacuum's work per table at the start of the phase being profiled; None where the
    # server does not report it.
    maintenance_mark: dict[str, dict[str, float]] | None = None

    @property
    def folded_path(self) -> Path:
        return self.out_dir / "worker.folded"

    @classmethod
    async def start(cls, out_dir: Path, dsn: str, worker_pid: int) -> DrainProfile:
        await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
        profile = cls(out_dir, dsn)
        # An earlier run's stacks must not pass for this one's if py-spy cannot attach.
        await asyncio.to_thread(profile.folded_path.unlink, missing_ok=True)
        await profile._reset_statements()
        try:
            profile.maintenance_mark = await table_maintenance(dsn)
        except asyncpg.UndefinedColumnError:  # the time columns came with Postgres 18
            profile.notes.append("autovacuum times need Postgres 18 or later")
        profile._start_py_spy(worker_pid)
        return profile

    async def _reset_statements(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(_CREATE_EXTENSION)
            await conn.execute("SELECT pg_stat_statements_reset()")
            self.statements = True
        except asyncpg.PostgresError as exc:
            # Not loaded (shared_preload_libraries) or not ours to reset: no statement times.
            self.notes.append(f"pg_stat_statements unavailable: {exc}")
        finally:
            await conn.close()

    def _start_py_spy(self, pid: int) -> None:
        program = _py_spy()
        if program is None:
            self.notes.append("py-spy not found: no worker profile (pip install py-spy)")
            return
        self.spy = subprocess.Popen(  # noqa: S603 -- our own binary, arguments we build.
            [
                program, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE_HZ),
                "--format", "raw", "--output", str(self.folded_path), "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    async def autovacuum_since_mark(self) -> list[dict[str, Any]] | None:
        """What autovacuum did per table since the last call (or the start), which starts
        the next phase; None where the server does not report it."""
        if self.maintenance_mark is None:
            return None
        now = await table_maintenance(self.dsn)
        done = maintenance_between(self.maintenance_mark, now)
        self.maintenance_mark = now
        return done

    async def finish(self, events: int) -> dict[str, Any]:
        """Stop the profilers; the summary of what they saw, per drained event."""
        summary: dict[str, Any] = {"dir": str(self.out_dir)}
        worker = await asyncio.to_thread(self._stop_py_spy)  # waits for py-spy's file
        if worker is not None:
            summary["worker"] = worker
        if self.statements:
            summary["postgres_statements"] = await self._top_statements(events)
        autovacuum = await self.autovacuum_since_mark()
        if autovacuum is not None:
            summary["autovacuum"] = autovacuum
        summary["notes"] = self.notes
        return summary

    def _stop_py_spy(self) -> dict[str, Any] | None:
        if self.spy is None:
            return None
        self.spy.send_signal(signal.SIGINT)  # py-spy writes its samples out, then exits
        try:
            _, stderr = self.spy.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.spy.kill()
            _, stderr = self.spy.communicate()
        if self.folded_path.exists():
            return top_frames(self.folded_path.read_text())
        said = stderr.decode(errors="replace").strip().splitlines()
        self.notes.append(
            f"py-spy wrote no profile (exit {self.spy.returncode}): "
            + (said[-1] if said else "no message")
        )
        return None

    async def _top_statements(self, events: int) -> list[dict[str, Any]]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(_TOP_STATEMENTS_SQL, TOP_STATEMENTS)
        finally:
            await conn.close()
        return [
            {
                "statement": statement_name(row["query"]),
                "calls": row["calls"],
                "rows": row["rows"],
                "exec_ms": round(row["exec_ms"], 1),
                "plan_ms": round(row["plan_ms"], 1),
                "us_per_event": round((row["exec_ms"] + row["plan_ms"]) * 1000 / events, 2),
            }
            for row in rows
        ]


_MAINTENANCE = (
    "autovacuum_count", "autoanalyze_count", "total_autovacuum_time", "total_autoanalyze_time",
)  # fmt: skip
_MAINTENANCE_SQL = """
SELECT relname, autovacuum_count, autoanalyze_count,
       total_autovacuum_time, total_autoanalyze_time
FROM pg_stat_user_tables
"""


async def table_maintenance(dsn: str) -> dict[str, dict[str, float]]:
    """Autovacuum and autoanalyze runs so far, and their time (ms), per table."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(_MAINTENANCE_SQL)
    finally:
        await conn.close()
    return {row["relname"]: {key: float(row[key]) for key in _MAINTENANCE} for row in rows}


def maintenance_between(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """What autovacuum did to each table in between, most time first (tables it left
    alone left out). Its workers are processes of their own, outside every statement."""
    done: list[dict[str, Any]] = []
    for table, now in after.items():
        was = before.get(table, {})
        change = {key: value - was.get(key, 0.0) for key, value in now.items()}
        if change["autovacuum_count"] or change["autoanalyze_count"]:
            done.append(
                {
                    "table": table,
                    "vacuums": int(change["autovacuum_count"]),
                    "vacuum_ms": round(change["total_autovacuum_time"], 1),
                    "analyzes": int(change["autoanalyze_count"]),
                    "analyze_ms": round(change["total_autoanalyze_time"], 1),
                }
            )
    return sorted(done, key=lambda row: -(row["vacuum_ms"] + row["analyze_ms"]))


_LITERAL = re.compile(r"'(?:[^']|'')*'|\$\d+|\b\d+\b")
_COPY = re.compile(r'^COPY "?(\w+)"?')


def _normalized(sql: str) -> str:
    # As pg_stat_statements shows a statement: comment lines gone, whitespace collapsed,
    # constants turned into parameters (here, constants and parameters alike into "?").
    lines = (line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return _LITERAL.sub("?", " ".join(" ".join(lines).split())).rstrip(";")


_NAMES_BY_TEXT = {_normalized(sql)[:_QUERY_PREFIX]: name for name, sql in QUERIES.items()}


def statement_name(query: str) -> str:
    """The ``-- name:`` of one of our statements, else a short form of its text."""
    text = _normalized(query)
    name = _NAMES_BY_TEXT.get(text[:_QUERY_PREFIX])
    if name is not None:
        return name
    copy = _COPY.match(text)  # asyncpg's copy_records_to_table
    shown = f"COPY {copy.group(1)}" if copy else " ".join(query.split())
    return shown if len(shown) <= _SHOWN else shown[: _SHOWN - 3] + "..."


_LINE_NUMBER = re.compile(r":\d+\)$")
_OURS = ("(workers/", "(schemas/")
_ENTRY = "(workers/cli/"  # on every stack: the process's entry point, not a step


def top_frames(folded: str, limit: int = TOP_FRAMES) -> dict[str, Any]:
    """The functions that took the most samples, from py-spy's collapsed stacks.

    Each line is ``frame;frame;...;frame count``, outermost first, a frame being
    ``function (file:line)``; the lines of a function are merged. ``self`` lists the
    functions the samples were running in, any code's; ``ours_inclusive`` chargeline's
    functions by the samples they were on the stack for (once per sample, however deep they
    recursed), which shows the share of each step (the command-line entry point, on every
    stack, left out). Both are percentages of all samples.
    """
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            if any(mark in frame for mark in _OURS) and _ENTRY not in frame:
                ours[frame] += samples
    if not total:
        return {"samples": 0, "self": [], "ours_inclusive": []}

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(limit)]

    return {"samples": total, "self": shares(own), "ours_inclusive": shares(ours)}
