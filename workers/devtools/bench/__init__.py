"""``chargeline bench``: see README.md beside this file."""

from workers.devtools.bench.run import run_bench

__all__ = ["run_bench"]
