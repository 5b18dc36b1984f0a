"""The docs hold what the code has and link only inside the repository.

The contract (schemas/README.md) names every metric, every command noun, every dead-letter
reason and every event type; every relative link in the Markdown files resolves in a
clone; nothing points outside the repository but web addresses; the README stays a front
door (under 300 lines).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from schemas.common import DEAD_LETTER_REASONS
from schemas.events import EVENT_MODELS
from workers.cli.nouns import NOUNS
from workers.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
CONTRACT = (REPO / "schemas" / "README.md").read_text()
DOCS = sorted(
    path
    for path in REPO.rglob("*.md")
    if not any(part.startswith(".") or part in ("build", "node_modules") for part in path.parts)
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _metric_names() -> set[str]:
    names = set()
    for collector in Metrics(CollectorRegistry()).registry.collect():
        suffix = "_total" if collector.type == "counter" else ""
        names.add(collector.name + suffix)
    return names


@pytest.mark.parametrize("metric", sorted(_metric_names()))
def test_the_contract_names_every_metric(metric: str) -> None:
    assert f"`{metric}`" in CONTRACT


@pytest.mark.parametrize("noun", sorted(NOUNS))
def test_the_contract_names_every_command(noun: str) -> None:
    assert f"chargeline {noun}" in CONTRACT or f"`{noun}" in CONTRACT


@pytest.mark.parametrize("name", [*DEAD_LETTER_REASONS, *EVENT_MODELS])
def test_the_contract_names_every_reason_and_event(name: str) -> None:
    assert f"`{name}`" in CONTRACT


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text and "SPEC.md" not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{doc.name}: {target} leaves the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"


def test_the_readme_is_a_front_door() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) < 300


def test_the_readmes_webhook_receiver_accepts_ours_and_nothing_else() -> None:
    """The ten lines a receiver copies from the README, run against chargeline's signer."""
    import time

    from workers import webhook_signing

    readme = (REPO / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "def verified" in block]  # fmt: skip
    namespace: dict[str, object] = {}
    exec(code, namespace)  # noqa: S102 -- the README's own example
    verified = namespace["verified"]
    assert callable(verified)
    secret, body = webhook_signing.new_secret(), b'{"alert_id": "a1"}'
    headers = webhook_signing.headers(secret, "a1", int(time.time()), body)
    assert verified(secret, headers, body)
    assert not verified(secret, headers, body + b" ")
    assert not verified(webhook_signing.new_secret(), headers, body)
    stale = webhook_signing.headers(secret, "a1", int(time.time()) - 600, body)
    assert not verified(secret, stale, body)
