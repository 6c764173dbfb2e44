"""Relaxation progress on stderr, only when stderr is a terminal.

A rich live line: steps, ``max|F|`` against ``ftol`` with a bar on a log scale
(from the first reported force down to ``ftol``), elapsed time. The engine
calls it between jitted chunks (:func:`mdsens.driver.drive`), so it
costs one device sync per chunk and nothing inside the loop.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable


class RelaxationProgress:
    """``callback(step, max_force, elapsed_s)``; :meth:`close` ends the display."""

    def __init__(self, ftol: float, console: Any = None) -> None:
        from rich.console import Console

        self.ftol = float(ftol)
        self.console = console if console is not None else Console(stderr=True)
        self.first: float | None = None
        self._progress = None
        self._task = None

    def fraction(self, fmax: float) -> float:
        """Progress in log(max|F|) from the first reported force to ftol, in [0, 1]."""
        if self.first is None or fmax <= self.ftol:
            return 1.0 if fmax <= self.ftol else 0.0
        span = math.log(self.first / self.ftol)
        if span <= 0:
            return 1.0
        return min(max(math.log(self.first / fmax) / span, 0.0), 1.0)

    def _start(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("relaxing"),
            BarColumn(bar_width=30),
            TextColumn("step {task.fields[step]:>9,d}"),
            TextColumn("max|F| {task.fields[fmax]:9.2e} → ftol {task.fields[ftol]:.0e}"),
            TextColumn("{task.fields[elapsed]:7.1f} s"),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("relax", total=1.0, step=0, fmax=float("nan"), ftol=self.ftol,
                                            elapsed=0.0)

    def __call__(self, step: int, fmax: float, elapsed: float) -> None:
        if self.first is None:
            self.first = max(float(fmax), self.ftol)
            self._start()
        self._progress.update(self._task, completed=self.fraction(float(fmax)), step=int(step), fmax=float(fmax),
                               elapsed=float(elapsed))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def relaxation_progress(ftol: float, quiet: bool) -> Callable[[int, float, float], None] | None:
    """A ``callback(step, max_force, elapsed_s)`` for :func:`mdsens.relax.relax` (between the
    chunks of :func:`mdsens.driver.drive`),
    or None when quiet or not on a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    return RelaxationProgress(ftol)


def finish(callback: Callable | None) -> None:
    """End the live display (a no-op for None)."""
    close = getattr(callback, "close", None)
    if close is not None:
        close()
