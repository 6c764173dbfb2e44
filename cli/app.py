"""The Typer application and the error handling shared by every verb."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import typer

app = typer.Typer(
    name="mdsens",
    help="Exact sensitivities of particle packings at mechanical equilibrium: relax with FIRE, "
    "then differentiate the minimum implicitly (H · dx*/dθ = −∂θ∇E).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_CONVERGED = 0, 1, 2, 3


def log(message: str, quiet: bool = False) -> None:
    """Human-facing log line on stderr (stdout is reserved for results/JSON)."""
    if not quiet:
        print(message, file=sys.stderr)


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def errors() -> Iterator[None]:
    """Turn known failures into one-line messages and exit codes."""
    from mdsens.io import FormatError
    from mdsens.systems import UsageError

    try:
        yield
    except typer.Exit:
        raise
    except UsageError as err:
        fail(str(err), EXIT_USAGE)
    except FormatError as err:
        fail(str(err), EXIT_ERROR)
    except KeyboardInterrupt:
        fail("interrupted; no output file was written", EXIT_ERROR)
    except (OSError, RuntimeError, ValueError) as err:
        fail(f"{err.__class__.__name__}: {err}", EXIT_ERROR)
