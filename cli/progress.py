"""Relaxation progress on stderr, only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import Callable


def relaxation_progress(ftol: float, quiet: bool) -> Callable[[int, float, float], None] | None:
    """A ``callback(step, max_force, elapsed_s)`` for :func:`mdsens.minimize.run_chunked`,
    or None when quiet or not on a terminal."""
    if quiet or not sys.stderr.isatty():
        return None

    def show(step: int, fmax: float, elapsed: float) -> None:
        print(f"\r  step {step:>8d}   max|F| {fmax:9.2e} (ftol {ftol:.0e})   {elapsed:7.1f} s",
              end="", file=sys.stderr, flush=True)

    return show


def finish(callback: Callable | None) -> None:
    if callback is not None:
        print(file=sys.stderr)
