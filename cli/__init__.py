"""The ``mdsens`` command line (installed as ``mdsens.cli``).

Verbs are subcommands, one module each; importing a module registers its
commands on :data:`mdsens.cli.app.app`. Exit codes: 0 ok, 1 runtime error,
2 usage error, 3 the relaxation did not converge.
"""

from __future__ import annotations

import jax

from mdsens.cli.app import app
from mdsens.cli import run as _run  # noqa: F401  (registers `run`, `systems`)
from mdsens.cli import bench as _bench  # noqa: F401  (registers `bench`)
from mdsens.cli import check as _check  # noqa: F401  (registers `check`)
from mdsens.cli import export as _export  # noqa: F401  (registers `export`)
from mdsens.cli import plot as _plot  # noqa: F401  (registers `plot`)
from mdsens.cli import show as _show  # noqa: F401  (registers `show`)


def main() -> None:
    """Console-script entry point: float64 by default, then the Typer app.

    This is the one place (with tests/conftest.py) that changes JAX's global
    configuration; ``--precision float32`` switches it back per run.
    """
    jax.config.update("jax_enable_x64", True)
    app()


__all__ = ["app", "main"]
