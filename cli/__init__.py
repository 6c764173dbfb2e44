"""The ``mdsens`` command line (installed as ``mdsens.cli``).

Verbs are subcommands, one module each; importing a module registers its
commands on :data:`mdsens.cli.app.app`. Exit codes: 0 ok, 1 runtime error,
2 usage error, 3 the relaxation did not converge, 130 / 143 interrupted by
SIGINT (Ctrl-C) / SIGTERM (one line on stderr, no traceback).
"""

from __future__ import annotations

import sys

import jax

from mdsens.cli.app import Interrupted, app, handle_signals
from mdsens.cli import run as _run  # noqa: F401  (registers `run`, `systems`)
from mdsens.cli import bench as _bench  # noqa: F401  (registers `bench`)
from mdsens.cli import check as _check  # noqa: F401  (registers `check`)
from mdsens.cli import design as _design  # noqa: F401  (registers `design`)
from mdsens.cli import export as _export  # noqa: F401  (registers `export`)
from mdsens.cli import plot as _plot  # noqa: F401  (registers `plot`)
from mdsens.cli import show as _show  # noqa: F401  (registers `show`)
from mdsens.cli import ensemble as _ensemble  # noqa: F401  (registers `ensemble`)


def main() -> None:
    """Console-script entry point: float64 by default, then the Typer app.

    This is the one place (with tests/conftest.py) that changes JAX's global
    configuration; ``--precision float32`` switches it back per run.
    SIGINT and SIGTERM raise :class:`mdsens.cli.app.Interrupted`; a verb that
    owns an output reports it itself (``mdsens run``: no file written), and one
    that arrives anywhere else ends here, in one line.
    """
    handle_signals()
    try:
        jax.config.update("jax_enable_x64", True)
        app()
    except Interrupted as exc:
        print(exc.message(), file=sys.stderr)
        sys.exit(exc.exit_code)


__all__ = ["app", "main"]
