"""The host loop around a compiled relaxation chunk, shared by every relaxation
(docs/design.md, "Relaxation").

:func:`mdsens.relax.relax` (fixed box), :func:`mdsens.barostat.relax` (fixed
pressure) and the two batched relaxations (:func:`mdsens.ensemble.relax_batch`,
:func:`mdsens.barostat.relax_batch`) each compile a chunk — steps until
converged, a step bound, a stall, or a neighbor table that overflowed — and
hand it to :func:`drive`, which owns everything between chunks:

* the chunk's step bound (``settle`` steps for the first chunk when a table
  resize is due, then ``chunk``; never past ``max_steps``);
* an overflowed chunk is redone from its start on a wider table (the caller's
  ``widen``), at most :data:`MAX_REALLOCATIONS` times in a run;
* once, after the first chunk of ``settle`` steps, the caller's ``resize``;
* fixed pressure: a cell that shrank past its grid (``regrid``) keeps the
  state and gets a new table (new programs);
* rebuilds and reallocations counted, compile time (the first call of a new
  shape, :func:`compiled`) added up and left out of the elapsed time;
* ``callback`` after each accepted chunk, checkpoints every
  ``checkpoint_every`` seconds and where the step budget ran out;
* the stop: converged, stalled, non-finite, or ``max_steps``.

The caller supplies only what is its own: how to compile and run one chunk
for the current table (``program``, which reads the chunk's outputs into a
:class:`Chunk`), how to size a wider table, how to resize it, how to regrid,
and the checkpoint's payload. Nothing here runs inside a compiled loop: the
per-step arithmetic is the caller's chunk, unchanged.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, NamedTuple

#: overflowed chunks redone in one run before :func:`drive` gives up
MAX_REALLOCATIONS = 20


class Chunk(NamedTuple):
    """What one compiled chunk reported, read off its outputs by the caller.

    state, table: where the chunk ended (``table``: whatever the caller carries
        between chunks — a table and pair list, a capacity); a redone chunk's
        are dropped.
    step: the step reached (batches: the most any member took).
    overflow: the table (or pair list) did not fit: redo the chunk.
    converged: ``max|F| < ftol`` (batches: every member converged or stalled).
    stalled: the minimizer stopped making progress.
    diverged: non-finite positions or force (with ``overflow``: no table can
        fit, so the run stops there instead of widening).
    regrid: fixed pressure: the cell shrank past the table's grid.
    rebuilds: table rebuilds inside the chunk.
    out: the rest of the chunk's outputs (max|F|, E, ...), for the caller.
    """

    state: Any
    table: Any
    step: int
    overflow: bool = False
    converged: bool = False
    stalled: bool = False
    diverged: bool = False
    regrid: bool = False
    rebuilds: int = 0
    out: Any = None


class Driven(NamedTuple):
    """The end of :func:`drive`: the last accepted ``state`` and ``table``, the
    ``last`` chunk's report, ``compile_s``, ``reallocations`` (chunks redone
    on a wider table) and ``rebuilds``."""

    state: Any
    table: Any
    last: Chunk
    compile_s: float
    reallocations: int
    rebuilds: int


#: ``program(state, table, until, stale) -> (run, compile_s)``: ``run(state,
#: table, until, stale) -> Chunk`` runs the chunk compiled for these shapes
Program = Callable[[Any, Any, int, bool], "tuple[Callable[[Any, Any, int, bool], Chunk], float]"]


def compiled(cache: dict, key: Hashable, lower: Callable[[], Any]) -> tuple[Callable, float]:
    """``cache[key]``, compiled from ``lower()`` (a ``jax.stages.Lowered``) on
    first use, and the seconds that compile took (0.0 when cached)."""
    if key in cache:
        return cache[key], 0.0
    t = time.perf_counter()
    cache[key] = lower().compile()
    return cache[key], time.perf_counter() - t


def drive(state: Any, table: Any, program: Program, widen: Callable[[Any, Any, Chunk, int], Any], *,
          chunk: int, max_steps: int, step: int = 0, settle: int = 0,
          resize: Callable[[Any, Any], Any] | None = None,
          regrid: Callable[[Chunk], Any] | None = None,
          callback: Callable[[Chunk, float], None] | None = None,
          checkpoint: Callable[[Any, Any], None] | None = None, checkpoint_every: float = 60.0,
          clock: Callable[[], float] = time.perf_counter) -> Driven:
    """Run compiled chunks from ``state`` (at ``step``) on ``table`` until the
    stop (module docstring).

    ``program(state, table, until, stale)`` gives the chunk for these shapes
    and the seconds spent compiling it; ``stale`` is True when ``table`` is a
    new, empty one that the chunk must build first (the start, after
    ``widen``, ``resize`` or ``regrid``). ``widen(state, table, report,
    attempt)``: a wider table for redoing the chunk that ``report`` overflowed,
    from its start ``state`` (``attempt``: the run's reallocations so far,
    1, 2, ...); RuntimeError after :data:`MAX_REALLOCATIONS`. ``settle``: the
    first chunk's length when ``resize(state, table)`` is to run after it (a
    new table, or None to keep this one). ``regrid(report)``: the new table
    after a chunk that reported ``regrid`` (its state is kept). ``callback(report,
    elapsed_s)`` after each accepted chunk, ``elapsed_s`` leaving out compiles.
    ``checkpoint(state, table)`` after an unconverged chunk, at least every
    ``checkpoint_every`` seconds and at the stop."""
    compile_s = 0.0
    reallocations = rebuilds = 0
    stale = True
    start = last_save = clock()
    while True:
        until = min(step + (settle or chunk), max_steps)
        run, seconds = program(state, table, until, stale)
        compile_s += seconds
        report = run(state, table, until, stale)
        if report.regrid:
            # The state stands (the chunk stopped at a rebuild); a new grid from there.
            state, step, stale = report.state, report.step, True
            rebuilds += report.rebuilds
            table = regrid(report)
            continue
        if report.overflow and report.diverged:
            state, table = report.state, report.table  # no table fits inf/NaN: stop, not converged
            break
        if report.overflow:
            # Redo this chunk from its start on a wider table, built there.
            reallocations += 1
            if reallocations > MAX_REALLOCATIONS:
                raise RuntimeError(f"neighbor table overflowed {MAX_REALLOCATIONS} times; giving up")
            table, stale = widen(state, table, report, reallocations), True
            continue
        state, table, step, stale = report.state, report.table, report.step, False
        rebuilds += report.rebuilds
        if callback is not None:
            callback(report, clock() - start - compile_s)
        done = report.converged or report.stalled or report.diverged or step >= max_steps
        if checkpoint is not None and not report.converged and (
                done or clock() - last_save >= checkpoint_every):
            # Periodically, and where the step budget ran out: a run can go on from there.
            checkpoint(state, table)
            last_save = clock()
        if done:
            break
        if settle:
            settle = 0
            resized = resize(state, table)
            if resized is not None:
                table, stale = resized, True
    return Driven(state, table, report, compile_s, reallocations, rebuilds)
