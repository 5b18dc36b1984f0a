"""Imports flow one way between the folders of ``workers/`` and ``schemas/``.

``schemas`` (the contract) imports nothing of ``workers``. The kernel (the modules directly
in ``workers/``: settings, errors, logs, metrics, db, kafka, the Stripe gateway, http, retry,
lifecycle, kinds) imports only itself and ``schemas``. Above it: ``ledger`` (the rules and
their store), ``ingest`` (the consumer and its batches), ``jobs`` (the outbox relay and the
periodic workers), ``app`` (the process that composes them), ``ops`` (operator actions),
``api`` (the HTTP API), ``devtools`` (the embedded servers, the demo, the bench) and ``cli``,
each importing only what is below it. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AREAS = ("ledger", "ingest", "jobs", "ops", "api", "devtools", "cli")
BELOW = {
    "schemas": {"schemas"},
    "kernel": {"schemas", "kernel"},
    "ledger": {"schemas", "kernel", "ledger"},
    "ingest": {"schemas", "kernel", "ledger", "ingest"},
    "jobs": {"schemas", "kernel", "ledger", "jobs"},
    "app": {"schemas", "kernel", "ledger", "ingest", "jobs", "app"},
    "ops": {"schemas", "kernel", "ledger", "ingest", "jobs", "app", "ops"},
    "api": {"schemas", "kernel", "ledger", "ops", "api"},
    "devtools": {"schemas", "kernel", "ledger", "ingest", "jobs", "app", "ops", "api", "devtools"},
    "cli": {"schemas", "kernel", "ledger", "ingest", "jobs", "app", "ops", "api", "devtools", "cli"},
}  # fmt: skip


def area(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "schemas":
        return "schemas"
    if len(parts) > 1 and parts[1] in AREAS:
        return parts[1]
    return "app" if module == "workers.app" else "kernel"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(source: str, module: str) -> set[str]:
    """Every module of ours that ``source`` (of ``module``) imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")[: -node.level]
                base = ".".join([*package, node.module] if node.module else package)
            else:
                base = node.module or ""
            found.add(base)
    return {name for name in found if name.split(".")[0] in ("workers", "schemas")}


def violations(root: Path = REPO) -> list[str]:
    wrong = []
    for path in sorted([*root.glob("workers/**/*.py"), *root.glob("schemas/**/*.py")]):
        module = module_name(path)
        for target in sorted(imported(path.read_text(), module)):
            if area(target) not in BELOW[area(module)]:
                wrong.append(f"{module} ({area(module)}) imports {target} ({area(target)})")
    return wrong


def test_imports_flow_one_way() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("module", "source", "crossing"),
    [
        ("schemas.events", "from workers.settings import Settings", True),
        ("workers.db", "from workers.ingest.parse import Parsed", True),
        ("workers.ledger.rules", "def f():\n    from workers.jobs.outbox import OutboxRelay", True),
        ("workers.jobs.expiry", "import workers.ingest.usage", True),
        ("workers.ingest.usage", "from workers.ledger.store import load_ledger", False),
        ("workers.cli.flows", "from workers.devtools.bench import run_bench", False),
    ],
)
def test_a_crossing_import_is_found(module: str, source: str, crossing: bool) -> None:
    found = [t for t in imported(source, module) if area(t) not in BELOW[area(module)]]
    assert bool(found) is crossing
