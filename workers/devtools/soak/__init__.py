"""``chargeline soak``: see "The soak" in ``workers/devtools/bench/README.md``."""

from workers.devtools.soak.run import run_soak

__all__ = ["run_soak"]
