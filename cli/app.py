"""The Typer application and the error handling shared by every verb."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

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
# A run stopped by a signal exits 128 + the signal's number, as a shell reports it.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT (Ctrl-C) or SIGTERM (see :func:`handle_signals`).

    A BaseException, not a KeyboardInterrupt: ``except Exception`` clauses let it
    through, and so does Click's own KeyboardInterrupt handler ("Aborted!", exit 1),
    so that :func:`mdsens.cli.main` reports it in one line with exit code
    ``128 + signum``. ``with`` blocks and ``finally`` clauses on the way run as for
    any exception: :func:`mdsens.io.atomic_h5` deletes its temporary file, the
    progress display is closed. ``detail`` is what the verb has to say about its
    output (``mdsens run``: whether a file was written)."""

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.detail = detail

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        return f"interrupted ({self.name}){': ' + self.detail if self.detail else ''}"


def handle_signals() -> None:
    """Make SIGINT and SIGTERM raise :class:`Interrupted` in the main thread.

    Python runs a handler between bytecodes, so a signal that arrives while a
    compiled JAX program runs takes effect when it returns: within one
    relaxation chunk (:func:`mdsens.driver.drive`) or one derivative.
    Only the first signal raises; later ones are ignored while the first one
    unwinds (the cleanup is short). A SIGINT ignored by the parent (a
    background job) stays ignored. Only the console script calls this; the
    library and ``CliRunner`` keep Python's defaults."""
    state = {"raised": False}

    def handler(signum: int, frame: object) -> None:
        if state["raised"]:
            return
        state["raised"] = True
        raise Interrupted(signum)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def log(message: str, quiet: bool = False) -> None:
    """Human-facing log line on stderr (stdout is reserved for results/JSON)."""
    if not quiet:
        print(message, file=sys.stderr)


def fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def exit_interrupted(exc: Interrupted) -> None:
    """Report an interruption in one line on stderr and exit ``128 + signum``."""
    print(exc.message(), file=sys.stderr)
    raise typer.Exit(exc.exit_code)


@contextmanager
def errors(on_interrupt: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn known failures into one-line messages and exit codes.

    An interruption (:class:`Interrupted`, or a plain KeyboardInterrupt where
    :func:`handle_signals` is not installed) exits 130 / 143 with one line;
    ``on_interrupt()``, if given, says what happened to the output."""
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
    except (Interrupted, KeyboardInterrupt) as err:
        exc = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
        if on_interrupt is not None:
            exc.detail = on_interrupt()
        exit_interrupted(exc)
    except (OSError, RuntimeError, ValueError, ArithmeticError, MemoryError) as err:
        # ArithmeticError: e.g. an OverflowError from numpy on --set diameter=1e300,1;
        # MemoryError: e.g. --set n=1000000000000 (numpy refuses the allocation at once).
        fail(f"{err.__class__.__name__}: {err}", EXIT_ERROR)
