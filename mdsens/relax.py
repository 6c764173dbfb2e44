"""The relaxation driver: FIRE or gradient descent to a force tolerance, fast.

One driver for every system (docs/design.md, "Relaxation"). The minimizer
sees real-space positions and a *neighbor table* ``idx`` (N, K): row i lists
the particles that may interact with i (each pair appears in both rows),
padded with N. Forces come from the pair potential alone, as a gather and a
row sum per particle:

    F_i = −Σ_k φ'(r_ik) (x_i − x_{idx[i,k]}) / r_ik,

with ``φ'`` the elementwise derivative of ``System.pair`` in r — no scatter,
no autodiff through the pair sum. On XLA:CPU this is the cheapest force we
measured (a scatter-add of the pair gradient costs as much as the rest of the
step), and it is the same sum of pair terms as ``System.energy``, so the
minimum is the energy's minimum.

The table comes from mdsens's own cell list over pairs closer than
``cutoff + skin``. It is rebuilt, inside the compiled loop, only when the two
largest displacements since the last build add up to more than ``skin``
(:meth:`Table.moved`). The minimizer's force is taken on the table's
:class:`PairList` — each pair once, gathered back into the rows in table
order — which costs about half of summing the row-padded table. A chunk that overflows the table stops early and is redone
from its start on a reallocated, bigger table, so no step is ever taken on a
truncated list. An interaction without a finite range (Morse) gets the static
table of all other particles (exactly all pairs, never rebuilt).

Compiled chunks are cached per (model, box, minimizer, ftol, skin, table
shape) — the model (:attr:`System.model`), not the System object — so a
second relaxation of the same model — a finite difference, a warm restart, an
optimizer step, another seed built separately — compiles nothing.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import cache, driver, minimize
from mdsens.system import Params, System

Array = jax.Array

DEFAULT_SKIN = 0.3
#: jax-md's cell list from this many particles (an O(N²) table build below:
#: it runs only every few tens of steps, and is cheaper than cells there).
CELL_LIST_THRESHOLD = 512
#: tables are built for ``cutoff × CUTOFF_SLACK`` and reused for cutoffs down to
#: ``1 / CUTOFF_SLACK`` of that.
CUTOFF_SLACK = 1.01
#: from this many particles the table is resized after the first SETTLE_STEPS steps.
RESIZE_THRESHOLD = 4096
SETTLE_STEPS = 300
#: from this many particles (on a cell list), the relaxation renumbers them in
#: cell order first (:func:`spatial_order`)
SORT_THRESHOLD = 16384
#: :func:`pair_list` compares whole rows (N K² elements) up to this size and this
#: table width K, bisects beyond: the comparison is a little faster on narrow 2D tables
#: (N = 128: 0.09 against 0.14 ms; N = 1024: 0.33 against 0.41), the bisection on wide
#: ones (3D, K = 43, N = 512: 0.37 against 0.63 ms) and on large ones, where the N K²
#: gathered entries leave the cache (3D, K = 45–53: N = 4096 1.8 against 12 ms, 8192
#: 4.1 against 30 ms).
PAIR_COUNT_LIMIT = 1 << 24
PAIR_COUNT_WIDTH = 32
#: pair-list capacities are rounded up to a multiple of this
PAIR_CAPACITY_STEP = 16
#: a table build keeps each row's near candidates by :func:`compact_rows` where its
#: candidate rows are at least this many times the table's capacity, else by a sort of
#: the whole rows (which costs about the same on narrow rows: 2D cells)
COMPACT_RATIO = 2
#: :meth:`Table.build_pairs` keeps compacted cell-list rows in candidate order from this
#: dimension on: in 3D (27 cells, N = 16384) a rebuild 15–16 → 12.6–13.5 ms; in 2D (9
#: cells, K ≤ 32, where :func:`pair_list` counts instead of bisecting) it costs more
#: than the sort it saves (N = 16384: 4.9 against 4.1 ms)
CANDIDATE_ORDER_DIM = 3
#: :func:`compact_rows` finds each entry's 32-candidate word by comparing it with every
#: word's end up to this many comparisons a row (K × words), by bisection beyond
COMPACT_COMPARE_LIMIT = 2048


class RelaxStats(NamedTuple):
    """capacity: table entries per particle (K); reallocations: overflows
    recovered; rebuilds: table rebuilds inside the loop; cell_list: whether
    the table came from cells; newton_steps, cg_iterations, newton_s: the
    Newton polish (0 without); fallback: a Newton step failed and the
    minimizer finished."""

    capacity: int
    reallocations: int
    rebuilds: int
    cell_list: bool
    newton_steps: int = 0
    cg_iterations: int = 0
    newton_s: float = 0.0
    fallback: bool = False


class Relaxed(NamedTuple):
    """``x``: real-space x* (periodic: in [0, L)); ``info``; ``compile_s``;
    ``idx``: the table at x*, rows sorted (every pair within its interaction
    range — the cutoff, or the sum of the radii, :attr:`System.radius` — is in it);
    ``stats``."""

    x: Array
    info: minimize.RelaxInfo
    compile_s: float
    idx: Array
    stats: RelaxStats


# -- forces from a table ------------------------------------------------------------


def table_separations(system: System, x: Array, idx: Array, params: Params):
    """For each table entry: ``(dr, r2, rows, j, valid)`` — the minimum-image
    separation ``x_i − x_j`` (N, K, d), its square length, the row index as a
    column (N, 1), the neighbor index with padding pointed at the row itself
    (so r = 0 there, masked by the callers), and the padding mask."""
    n = system.n
    valid = idx < n
    rows = jnp.arange(n, dtype=idx.dtype)[:, None]
    j = jnp.where(valid, idx, rows)
    dr = x[:, None, :] - x[j]
    if system.periodic:
        box = params["box"]
        dr = dr - box * jnp.round(dr / box)
    return dr, jnp.sum(dr * dr, axis=-1), rows, j, valid


def pair_force_fn(system: System) -> Callable[[Array, Array, Params], Array]:
    """``force(x, idx, θ) -> (N, d)``: real-space forces summed over the table ``idx``."""

    def force(x: Array, idx: Array, params: Params) -> Array:
        dr, r2, rows, j, valid = table_separations(system, x, idx, params)
        r = jnp.sqrt(jnp.where(r2 > 0, r2, 1.0))
        # i as a column: the model's per-particle lookups (species, diameter)
        # gather N values, not N·K.
        dphi = jax.grad(lambda r_: jnp.sum(system.pair(r_, rows, j, params)))(r)
        terms = jnp.where(valid & (r2 > 0), dphi / r, 0.0)[..., None] * dr
        # Summed column by column, in table order: padding and pairs beyond the
        # cutoff add exact zeros, so the force is bitwise the same whatever
        # the table's capacity or build point (a resumed or reallocated run
        # retraces the uninterrupted one step for step); a tree reduction
        # along K would regroup the terms with K.
        total = terms[:, 0]
        for k in range(1, idx.shape[1]):
            total = total + terms[:, k]
        return -total

    return force


def table_energy(system: System, x: Array, idx: Array, params: Params, order: Array | None = None) -> Array:
    """``E = ½ Σ_i Σ_k φ(r_ik)`` over the table (each pair is in two rows);
    ``order``: the model's index of each row when ``x`` is renumbered
    (:class:`PairList`)."""
    dr, r2, rows, j, valid = table_separations(system, x, idx, params)
    r = jnp.sqrt(jnp.where(r2 > 0, r2, 1.0))
    phi = system.pair(r, rows, j, params) if order is None else system.pair(r, order[rows], order[j], params)
    return 0.5 * jnp.sum(jnp.where(valid & (r2 > 0), phi, 0.0))


class PairList(NamedTuple):
    """The table's pairs once each, for the force (built from a table at each rebuild).

    i, j: (P,) the pairs ``i < j`` closer than ``cutoff + skin``, padded with
        ``(0, 0)`` (zero separation: zero force); P is a capacity (a shape).
    gather: (N, K) for each table entry ``(i, k)``, where that pair's force on
        ``i`` sits in the signed stack ``[f; −f; 0]`` of the P pair forces:
        ``p`` when ``idx[i, k] > i``, ``P + p`` when it is below ``i``, ``2P``
        (a zero) on padding. Rows keep the table's order.
    overflow: more pairs than P, or a table that is not symmetric (a
        truncated row).
    order: None, or (N,) when the relaxation runs on renumbered particles
        (spatial order, :func:`spatial_order`): the model's index of each
        particle, so that per-particle data (species, diameters) stay in the
        model's numbering.
    mi, mj: with ``order``, ``order[i]`` and ``order[j]``, taken at the
        build: what the pair function is given.
    """

    i: Array
    j: Array
    gather: Array
    overflow: Array
    order: Array | None = None
    mi: Array | None = None
    mj: Array | None = None

    def model_pairs(self) -> tuple[Array, Array]:
        """The pairs' indices in the model's numbering."""
        return (self.i, self.j) if self.order is None else (self.mi, self.mj)


def sort_order(key: Array, bound: int) -> Array:
    """``argsort(key, stable=True)`` of integer keys in ``[0, bound)``, as one
    single-operand sort of ``key · n + index`` where that fits the integer
    width (XLA:CPU sorts one array about 6× faster than it argsorts: N = 70,000,
    4.4 against 28 ms), else ``jnp.argsort``."""
    n = key.shape[0]
    wide = jax.dtypes.canonicalize_dtype(jnp.int64) == jnp.int64
    if bound * n < 2**31:
        dtype = jnp.int32
    elif wide and bound * n < 2**62:
        dtype = jnp.int64
    else:
        return jnp.argsort(key).astype(jnp.int32)
    packed = key.astype(dtype) * n + jnp.arange(n, dtype=dtype)
    return (jnp.sort(packed) % n).astype(jnp.int32)


class _Layout(NamedTuple):
    """Where each particle sits in the candidate rows of a cell list
    (:meth:`Table._candidates`): its cell, the cell's grid coordinates, each
    cell's start of the range of each of its 3^d neighbor cells in its
    candidate row (cells, 3^d), and the particle's rank within its cell's
    range. Particle p of cell c' is candidate ``starts[c, r] + rank[p]`` of
    every particle of cell c, r the place of c' among c's neighbor cells."""

    cell: Array
    coords: Array
    starts: Array
    rank: Array


def compact_rows(cand: Array, near: Array, capacity: int, n: int,
                 sort: bool = True) -> tuple[Array, ...]:
    """Each row's candidates where ``near`` holds, sorted and padded with ``n`` to
    ``capacity`` — ``jnp.sort(jnp.where(near, cand, n), axis=1)[:, :capacity]`` —
    and whether some row has more than ``capacity`` (then the rows hold some
    ``capacity`` of them, not the smallest: the caller rebuilds bigger); jittable.

    Sorting a wide row costs O(width log width) comparisons; this packs each
    row's ``near`` into 32-bit words, finds the word and then the bit (by
    popcount bisection) of each of the ``capacity`` entries, and sorts only
    those: 3D bidisperse, N = 1024, padded cells: a 540-wide row, 43 kept, 1.2
    against 5.6 ms a build; N = 8192: 12.5 against 45 ms.

    ``sort=False``: the kept candidates in candidate order instead (padding
    still last), and also the packed words ``bits`` (N, words) of ``near`` and
    how many near candidates precede each word, ``below`` (N, words): the
    table slot of candidate s of row i is ``below[i, s // 32]`` plus the bits
    of ``bits[i, s // 32]`` under ``s % 32`` (:func:`candidate_slots`)."""
    rows, width = cand.shape
    full, tail = divmod(width, 32)
    words = full + (tail > 0)
    one = jnp.uint32(1)

    def pack(mask, length):  # distinct bits: their sum is their or
        return jnp.sum(mask.astype(jnp.uint32) << jnp.arange(length, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)

    # the last word holds the ``tail`` candidates beyond the full words (no padded copy of the rows)
    parts = [pack(near[:, :full * 32].reshape(rows, full, 32), 32)] if full else []
    parts += [pack(near[:, full * 32:], tail)[:, None]] if tail else []
    bits = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    count = jax.lax.population_count(bits).astype(jnp.int32)
    ends = jax.lax.associative_scan(jnp.add, count, axis=1)  # near candidates up to each word's end
    total = ends[:, -1]
    k = jnp.arange(capacity, dtype=jnp.int32)
    # entry k lies in the first word whose end exceeds k
    if capacity * words <= COMPACT_COMPARE_LIMIT:
        word = jnp.sum(ends[:, None, :] <= k[None, :, None], axis=-1, dtype=jnp.int32)
    else:
        lo = jnp.zeros((rows, capacity), jnp.int32)
        hi = jnp.full((rows, capacity), words - 1, jnp.int32)
        for _ in range(max(1, (words - 1).bit_length())):
            mid = (lo + hi) // 2
            below = jnp.take_along_axis(ends, mid, axis=1) <= k
            lo, hi = jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)
        word = lo
    word = jnp.minimum(word, words - 1)
    rank = (k - jnp.take_along_axis(ends - count, word, axis=1)).astype(jnp.uint32)  # its rank in the word
    b = jnp.take_along_axis(bits, word, axis=1)
    bit = jnp.zeros_like(b)  # the largest bit with at most ``rank`` near candidates below it
    for step in (16, 8, 4, 2, 1):
        trial = bit + jnp.uint32(step)
        bit = jnp.where(jax.lax.population_count(b & ((one << trial) - one)) <= rank, trial, bit)
    kept = jnp.take_along_axis(cand, word * 32 + bit.astype(jnp.int32), axis=1)
    kept = jnp.where(k < total[:, None], kept, n)
    if not sort:
        return kept, jnp.any(total > capacity), bits, ends - count
    return jnp.sort(kept, axis=1), jnp.any(total > capacity)


def candidate_slots(bits: Array, below: Array, rows: Array, candidate: Array) -> Array:
    """The table slot of candidate ``candidate`` of row ``rows`` (same shapes) in
    a table kept in candidate order (:func:`compact_rows` with ``sort=False``):
    the near candidates before it."""
    word = jnp.clip(candidate >> 5, 0, bits.shape[1] - 1)
    under = (jnp.uint32(1) << (candidate & 31).astype(jnp.uint32)) - jnp.uint32(1)
    return below[rows, word] + jax.lax.population_count(bits[rows, word] & under).astype(jnp.int32)


def pair_list(idx: Array, n: int, capacity: int, order: Array | None = None,
              mirror: Array | None = None) -> PairList:
    """The :class:`PairList` of a table ``idx`` (rows sorted, padded with ``n``;
    jittable): O(N K log K), run at each rebuild only. ``order``: see
    :class:`PairList`. ``mirror`` (N, K): for rows in any order (padding
    last), where each entry's row sits in the row of its neighbor — the
    mirror entry's slot, which a sorted table finds by bisection."""
    rows = jnp.arange(n, dtype=idx.dtype)[:, None]
    valid = idx < n
    upper = valid & (idx > rows)
    lower = valid & (idx < rows)
    width = idx.shape[1]
    # An upper entry's rank in the upper part of the table is the upper entries
    # of the rows before it (a cumsum over N, not over the N K entries:
    # XLA:CPU's cumsum is slow) plus those before it in its row: a sorted row
    # is its lower entries, then its upper ones, then padding, so that is its
    # column less its row's lower count; in a row in another order, a scan.
    n_upper = jnp.sum(upper, axis=1, dtype=jnp.int32)
    before = jnp.cumsum(n_upper) - n_upper
    if mirror is None:
        n_lower = jnp.sum(lower, axis=1, dtype=jnp.int32)
        rank = jnp.arange(width, dtype=jnp.int32)[None, :] - n_lower[:, None]
    else:
        ones = upper.astype(jnp.int32)
        rank = jax.lax.associative_scan(jnp.add, ones, axis=1) - ones
    pos = before[:, None] + rank
    count = before[-1] + n_upper[-1]
    slot = jnp.where(upper, pos, capacity)  # beyond the end: dropped
    # One scatter of the entries' flat positions (padding: entry (0, 0)'s own
    # row, a zero pair), then gathers.
    entry = jnp.zeros(capacity, jnp.int32).at[slot.ravel()].set(
        jnp.arange(idx.size, dtype=jnp.int32), mode="drop")
    real = jnp.arange(capacity) < count
    first = jnp.where(real, entry // width, 0).astype(idx.dtype)
    second = jnp.where(real, idx.ravel()[entry], 0).astype(idx.dtype)
    # A lower entry (i, k) with j = idx[i, k] < i is the pair (j, i): i's slot
    # in row j (sorted) is the count of j's neighbors below i — all K compared
    # at once for small narrow tables, by bisection on wide or large ones
    # (PAIR_COUNT_LIMIT).
    j = jnp.where(lower, idx, 0)
    if mirror is not None:
        lo = mirror
    elif width <= PAIR_COUNT_WIDTH and idx.size * width <= PAIR_COUNT_LIMIT:
        lo = jnp.sum(idx[j] < rows[:, :, None], axis=-1, dtype=jnp.int32)
    else:
        lo = jnp.zeros(idx.shape, jnp.int32)
        hi = jnp.full(idx.shape, width, jnp.int32)
        for _ in range(max(1, math.ceil(math.log2(width + 1)))):
            mid = (lo + hi) // 2
            below = idx[j, jnp.minimum(mid, width - 1)] < rows
            lo, hi = jnp.where(below, mid + 1, lo), jnp.where(below, hi, mid)
            lo = jnp.minimum(lo, hi)
    at = jnp.minimum(lo, width - 1)
    found = idx[j, at] == rows
    gather = jnp.where(upper, pos, jnp.where(lower, capacity + pos[j, at], 2 * capacity))
    overflow = (count > capacity) | jnp.any(lower & ~found)
    if order is None:
        return PairList(first, second, gather.astype(jnp.int32), overflow)
    return PairList(first, second, gather.astype(jnp.int32), overflow, order, order[first], order[second])


def pair_list_force_fn(system: System) -> Callable[[Array, PairList, Params], Array]:
    """``force(x, pairs, θ) -> (N, d)``: the forces of :func:`pair_force_fn`, each
    pair's term computed once (a half-size, unpadded list) and gathered back
    into the table's rows.

    Per step this costs about half of the full table's force on XLA:CPU (2D
    bidisperse, N = 16384: 2.3 vs 4.8 ms), because a row-padded table pays for
    its widest row and for each pair twice. The sum over a particle's entries
    runs in table order, so — as with the table — pairs beyond the cutoff and
    padding add exact zeros and the force does not depend on the table's
    capacity or build point."""

    def force(x: Array, pairs: PairList, params: Params) -> Array:
        dr = x[pairs.i] - x[pairs.j]
        if system.periodic:
            box = params["box"]
            dr = dr - box * jnp.round(dr / box)
        r2 = minimize.squared_length(dr)
        r = jnp.sqrt(jnp.where(r2 > 0, r2, 1.0))
        i, j = pairs.model_pairs()
        dphi = jax.grad(lambda r_: jnp.sum(system.pair(r_, i, j, params)))(r)
        f = jnp.where(r2 > 0, dphi / r, 0.0)[:, None] * dr
        signed = jnp.concatenate([f, -f, jnp.zeros((1, f.shape[1]), f.dtype)])
        terms = signed[pairs.gather]
        total = terms[:, 0]
        for k in range(1, pairs.gather.shape[1]):
            total = total + terms[:, k]
        return -total

    return force


def pairs_from_table(idx: Array, n: int) -> np.ndarray:
    """(2, M) int32 pairs ``i < j`` of a table (the format of :meth:`System.with_pairs`)."""
    idx = np.asarray(idx)
    i = np.repeat(np.arange(n), idx.shape[1])
    j = idx.ravel()
    keep = (j < n) & (i < j)
    return np.stack([i[keep], j[keep]]).astype(np.int32)


# -- the table ------------------------------------------------------------------------


class Neighbors(NamedTuple):
    """The table and what its rebuild needs; every capacity is a shape, so a
    compiled loop is specialised to it and a bigger one is a new compile.

    idx: (N, K) neighbors of each particle, padded with N.
    reference: (N, d) positions at the last build.
    cells: (0, W) on a cell list (W: candidates per particle, the cell
        capacity, carried as a shape only); (0, 0) when the table is built
        from all pairs.
    overflow: True when the last build did not fit (K or W too small).
    """

    idx: Array
    reference: Array
    cells: Array
    overflow: Array


def _all_others(n: int) -> np.ndarray:
    rows = np.arange(n)[:, None]
    cols = np.arange(n - 1)[None, :]
    return (cols + (cols >= rows)).astype(np.int32)


class Table:
    """Builds and refreshes the neighbor table of one system at one box: the
    particles closer than ``cutoff + skin``, from a cell list of side at least
    ``cutoff + skin`` (periodic boxes at least three cells wide, from
    :data:`CELL_LIST_THRESHOLD` particles) or from all pairs; every other
    particle when the interaction has no cutoff."""

    def __init__(self, system: System, params: Params, skin: float = DEFAULT_SKIN, cutoff: float | None = None,
                 metric_reach: float | None = None, radius: Callable[[Params], Array] | None = None):
        self.n, self.dim = system.n, system.dim
        self.skin = float(skin)
        # A table for a larger cutoff than the interaction's holds extra pairs
        # (whose force is zero), never too few: any cutoff up to this one may use it.
        self.cutoff = float(system.cutoff(params)) if cutoff is None else float(cutoff)
        self.static = not math.isfinite(self.cutoff)
        self.periodic = system.periodic
        self.reach = self.cutoff + self.skin
        #: the distance a pair is listed within, measured after the ``deform``
        #: of a build (a fixed-pressure cell, :mod:`mdsens.barostat`); the grid
        #: is sized by ``reach`` in the undeformed box. Without a deform: reach.
        self.metric_reach = self.reach if metric_reach is None else float(metric_reach)
        self.box = np.asarray(params["box"], dtype=float) if self.periodic else None
        self.grid = None
        self._build = jax.jit(self.build, static_argnums=(1, 2))
        self._counts = jax.jit(self._both_counts, static_argnums=1)  # deform None or (d, d): one trace each
        self._sticky = (0, 0)
        self._sticky_pairs, self._last_pairs = 0, (None, 0)
        if not self.static and self.periodic and self.n >= CELL_LIST_THRESHOLD:
            grid = np.floor(self.box / self.reach).astype(int)
            if np.all(grid >= 3):
                self.grid = grid
                self.neighbor_cells = self._neighbor_cells(grid)
        #: ``radius(θ) -> (N,)`` (:attr:`System.radius`), on a cell list: a build given
        #: the radii lists each pair within ``radius_i + radius_j + skin`` (at most
        #: :attr:`reach`). All-pairs tables (few particles) keep one reach: their pair
        #: count then follows θ less (a design that changes diameters compiles once).
        self.radius = radius if self.grid is not None else None

    @property
    def cell_list(self) -> bool:
        return self.grid is not None

    @staticmethod
    def _neighbor_cells(grid: np.ndarray) -> np.ndarray:
        """(n_cells, 3^d): each cell and its periodic neighbors (distinct: grid ≥ 3)."""
        dim = len(grid)
        coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, dim)
        offsets = np.stack(np.meshgrid(*[[-1, 0, 1]] * dim, indexing="ij"), -1).reshape(-1, dim)
        around = (coords[:, None, :] + offsets[None, :, :]) % grid
        strides = np.cumprod([1] + list(grid[:0:-1]))[::-1]
        return (around @ strides).astype(np.int32)

    def _box(self, box: Array | None) -> Array:
        """The box of a build: the table's own (a compile-time constant), or
        ``box`` — a traced per-member box of an ensemble batch (:mod:`mdsens.ensemble`),
        at least as large as the table's own in every direction, so that its
        cells (``box / grid``) still span ``cutoff + skin``."""
        return jnp.asarray(self.box) if box is None else box

    def _wrap(self, dr: Array, box: Array | None) -> Array:
        if not self.periodic:
            return dr
        box = self._box(box)
        return dr - box * jnp.round(dr / box)

    def _strides(self) -> np.ndarray:
        """(d,) int32: a cell's flat index from its grid coordinates (row-major)."""
        return np.cumprod([1] + list(self.grid[:0:-1]))[::-1].astype(np.int32)

    def _grid_coords(self, x: Array, box: Array | None = None) -> Array:
        """(N, d) each particle's cell's grid coordinates."""
        grid = jnp.asarray(self.grid)
        return jnp.clip(jnp.floor(x / self._box(box) * grid).astype(jnp.int32), 0, grid - 1)

    def _cell_of(self, x: Array, box: Array | None = None) -> Array:
        return self._grid_coords(x, box) @ jnp.asarray(self._strides())

    def cells_on_host(self, x: Any) -> np.ndarray:
        """:meth:`_cell_of` at the table's own box, in NumPy: sizing a table and
        ordering the particles before a relaxation compiles nothing. The same
        cells: XLA:CPU divides by the box as a product with its reciprocal,
        and so does this (``tests/test_first_run.py`` compares the two)."""
        grid = np.asarray(self.grid)
        c = np.clip(np.floor(np.asarray(x) * (1.0 / self.box) * grid).astype(np.int32), 0, grid - 1)
        return c @ self._strides()

    def counts_on_host(self, x: Any, radius: Any = None) -> tuple[int, int]:
        """(the most neighbors any particle has, the number of pairs) within
        ``reach`` at ``x`` (minimum image in a periodic box), from a k-d tree
        on the host: what the compiled :meth:`_both_counts` counts without a
        deform, without compiling a program of the table's candidates for
        every new system (~1.5 s at N = 1024); with ``radius`` (N,), the pairs
        within their own reach (:meth:`_near`). Only sizes capacities: a pair
        exactly at ``reach`` may count on one side and not the other, and a
        chunk whose table overflows is redone on a wider one anyway."""
        from scipy.spatial import cKDTree

        x = np.asarray(x, dtype=float)
        if self.periodic:
            x = np.mod(x, self.box)
            x = np.where(x >= self.box, x - self.box, x)  # mod may round up to the box
            tree = cKDTree(x, boxsize=self.box)
        else:
            tree = cKDTree(x)
        pairs = tree.query_pairs(self.reach, output_type="ndarray")
        if radius is not None and len(pairs):
            radius = np.asarray(radius, dtype=float)
            dr = x[pairs[:, 0]] - x[pairs[:, 1]]
            if self.periodic:
                dr -= self.box * np.round(dr / self.box)
            reach = np.minimum(radius[pairs[:, 0]] + radius[pairs[:, 1]] + self.skin, self.reach)
            pairs = pairs[np.sum(dr * dr, axis=1) < reach * reach]
        if len(pairs) == 0:
            return 0, 0
        near = np.bincount(pairs.ravel(), minlength=self.n)
        return int(near.max()), int(len(pairs))

    def _count_pairs(self, x: Any, cell_capacity: int, deform: Array | None, radius: Any = None) -> tuple[int, int]:
        if deform is None:
            return self.counts_on_host(x, radius)
        return tuple(int(c) for c in self._counts(jnp.asarray(x), cell_capacity, deform))

    def _candidates(self, x: Array, cell_capacity: int, box: Array | None = None,
                    layout: bool = False) -> tuple[Array, ...]:
        """(N, width) candidate neighbors (padded with N), the cells, and
        whether some particle had more than ``cell_capacity`` candidates;
        with ``layout`` (a cell list) also :class:`_Layout`, where each
        particle sits in the candidate rows."""
        n = self.n
        if self.grid is None:
            if self.static:
                return jnp.asarray(_all_others(n)), jnp.zeros((0, 0), jnp.int32), jnp.zeros((), bool)
            return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (n, n)), jnp.zeros((0, 0), jnp.int32), \
                jnp.zeros((), bool)
        n_cells = int(np.prod(self.grid))
        coords = self._grid_coords(x, box)
        cell = coords @ jnp.asarray(self._strides())  # :meth:`_cell_of`
        order = sort_order(cell, n_cells)
        counts = jnp.zeros(n_cells, jnp.int32).at[cell].add(1)
        first = jnp.cumsum(counts) - counts
        # The particles sorted by cell, each cell a contiguous range: slot s of a
        # cell's candidate row is the s-th particle of its 3^d cells taken one
        # after another — no per-cell padding, so about a third of a padded
        # cell array's width (2D, N = 16384: 38 against 90 candidates; 3D,
        # N = 8192: 200 against 594). Computed once per cell and copied to its
        # particles (a cell holds a few), the ranges' running sums unrolled
        # (XLA:CPU's cumsum is a slow reduce-window), and each slot's source
        # selected range after range by elementwise comparisons rather than
        # gathered by a range index (N = 16384: 2D 4.7 → 1.2 ms, 3D 12 → 3.8 ms).
        width = cell_capacity
        around = jnp.asarray(self.neighbor_cells)  # (cells, 3^d)
        slot = jnp.arange(width, dtype=jnp.int32)[None, :]
        start = jnp.zeros(n_cells, jnp.int32)  # where range k begins in the row
        starts = [start]
        offset = jnp.broadcast_to(first[around[:, 0]][:, None], (n_cells, width))  # source − slot
        for k in range(1, around.shape[1]):
            start = start + counts[around[:, k - 1]]
            starts.append(start)
            # an empty range starts where the next one does, which then wins
            offset = jnp.where(slot >= start[:, None], (first[around[:, k]] - start)[:, None], offset)
        total = start + counts[around[:, -1]]
        per_cell = jnp.where(slot < total[:, None], order[jnp.clip(slot + offset, 0, n - 1)].astype(jnp.int32), n)
        out = per_cell[cell], jnp.zeros((0, width), jnp.int32), jnp.max(total) > width
        if not layout:
            return out
        # a particle's place in its cell's range: its place in the sorted order less the cell's first
        rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
        return out + (_Layout(cell, coords, jnp.stack(starts, axis=1), rank - first[cell]),)

    def _near(self, x: Array, cand: Array, box: Array | None, deform: Array | None,
              radius: Array | None = None) -> Array:
        """(N, width) which candidates lie within reach (after ``deform``); with
        ``radius`` (N,), within ``radius_i + radius_j + skin`` (at most the reach)."""
        n = self.n
        rows = jnp.arange(n, dtype=jnp.int32)[:, None]
        other = jnp.where(cand < n, cand, rows)
        dr = self._wrap(x[:, None, :] - x[other], box)
        reach = self.reach
        if deform is not None:
            dr = jnp.sum(dr[..., None, :] * deform, axis=-1)
            reach = self.metric_reach
        if radius is not None:
            reach = jnp.minimum(radius[:, None] + radius[other] + self.skin, reach)
        return (cand < n) & (cand != rows) & (minimize.squared_length(dr) < reach * reach)

    def build(self, x: Array, capacity: int, cell_capacity: int, box: Array | None = None,
              deform: Array | None = None, radius: Array | None = None) -> Neighbors:
        """The table at ``x`` with ``capacity`` entries per particle (jittable);
        ``deform`` (d, d): list the pairs within :attr:`metric_reach` of
        ``deform @ Δx`` instead (a deformed cell; the grid must still span it);
        ``radius`` (N,): each pair within its own reach (:meth:`_near`)."""
        n = self.n
        cand, cells, cell_overflow = self._candidates(x, cell_capacity, box)
        if self.static:
            return Neighbors(cand, x, cells, cell_overflow)
        near = self._near(x, cand, box, deform, radius)
        # Compaction: the near candidates, sorted by index. Rows at least twice
        # the capacity (3D's 27 cells, all pairs) go through
        # compact_rows; narrower ones (2D's 9 cells) are sorted whole,
        # which on XLA:CPU was measured cheaper than top_k, a cumsum-and-scatter
        # or compact_rows there. A row overflows when a near candidate sorts
        # beyond the capacity: read off the sorted rows, since a separate count
        # of ``near`` made XLA compute the distances twice (N = 16384: 53 → 27
        # ms per build).
        width = cand.shape[1]
        if width >= COMPACT_RATIO * capacity:  # wide candidate rows (3D cells, all pairs)
            key, overflow = compact_rows(cand, near, capacity, n)
            return Neighbors(key, x, cells, cell_overflow | overflow)
        key = jnp.sort(jnp.where(near, cand, n), axis=1)
        if capacity < width:
            overflow = jnp.any(key[:, capacity] < n)
            key = key[:, :capacity]
        else:
            overflow = jnp.zeros((), bool)
            key = jnp.concatenate([key, jnp.full((n, capacity - width), n, key.dtype)], axis=1)
        return Neighbors(key, x, cells, cell_overflow | overflow)

    def build_pairs(self, x: Array, capacity: int, cell_capacity: int, pair_capacity: int,
                    order: Array | None = None, radius: Array | None = None) -> tuple[Neighbors, PairList]:
        """The table at ``x`` and its :class:`PairList` (jittable; ``order``: see
        :class:`PairList`), what the relaxation rebuilds. Where
        :meth:`build` would compact wide cell-list rows (3D), the rows are kept
        in candidate order instead of sorted, and each entry's mirror slot is
        computed from where the cells put the particles (:class:`_Layout`),
        not found by bisection: the sort and the bisection were ~11 of a
        rebuild's ~19 ms at 3D N = 16384. A force summed in candidate order
        depends on the cells at the build, so a resumed relaxation rebuilds
        where the saved table was built (:func:`relax`'s checkpoints carry it).
        ``radius``: as for :meth:`build`."""
        n = self.n
        if (self.grid is None or self.static or self.dim < CANDIDATE_ORDER_DIM
                or cell_capacity < COMPACT_RATIO * capacity):
            nb = self.build(x, capacity, cell_capacity, radius=radius)
            pl = pair_list(nb.idx, n, pair_capacity, order)
            return nb._replace(overflow=nb.overflow | pl.overflow), pl
        cand, cells, cell_overflow, lay = self._candidates(x, cell_capacity, None, layout=True)
        idx, overflow, bits, below = compact_rows(cand, self._near(x, cand, None, None, radius), capacity, n,
                                                  sort=False)
        # row i's entry j = idx[i, k] (i among j's candidates): i's cell is j's
        # neighbor cell r, with (coords_i − coords_j + 1) mod grid its offset + 1
        # in each direction, enumerated as in :meth:`_neighbor_cells`
        # (j's coordinates from its cell: one gather of the (N, K) entries, not d)
        j = jnp.minimum(idx, n - 1)
        cell_j = lay.cell[j]
        r = jnp.zeros_like(cell_j)
        for a, (g, stride) in enumerate(zip(self.grid.tolist(), self._strides().tolist())):
            step = lay.coords[:, None, a] - (cell_j // stride) % g + 1
            r = 3 * r + jnp.where(step >= g, step - g, jnp.where(step < 0, step + g, step))
        mirror = candidate_slots(bits, below, j, lay.starts[cell_j, r] + lay.rank[:, None])
        pl = pair_list(idx, n, pair_capacity, order, mirror)
        return Neighbors(idx, x, cells, cell_overflow | overflow | pl.overflow), pl

    def capacities(self, x: Array, grow: float = 1.0, shrink: bool = False,
                   deform: Array | None = None, radius: Any = None) -> tuple[int, int]:
        """(K, C): table and cell capacities for positions ``x``, from the counts
        there (×1.25 and ×1.5 + 2, times ``grow``).

        Capacities only grow for a given Table (and the Table is cached with the
        compiled chunk): a warm restart from a relaxed state, which has fewer
        neighbors than a random start, reuses the compiled loop instead of
        compiling one for a smaller table; ``shrink`` sizes them afresh."""
        if shrink:
            self._sticky = (0, 0)
        if self.static:
            return self.n - 1, 0
        cell_capacity = 0
        if self.grid is not None:
            cell_capacity = max(self._sticky[1], self.cell_capacity(self.cells_on_host(x), grow))
        count, pairs = self._count_pairs(x, cell_capacity, deform, radius)
        self._last_pairs = ((x, cell_capacity, deform, radius), pairs)  # for pair_capacity at the same x
        capacity = max(self._sticky[0], int(math.ceil(count * 1.25 * grow)) + 1)
        if self.grid is None:
            capacity = min(capacity, self.n)
        self._sticky = (capacity, cell_capacity)
        return capacity, cell_capacity

    def allocate(self, x: Array, grow: float = 1.0, shrink: bool = False) -> Neighbors:
        """A table built at ``x`` (sized by :meth:`capacities`)."""
        x = jnp.asarray(x)
        if self.static:
            return self.build(x, self.n - 1, 0)
        return self._build(x, *self.capacities(x, grow, shrink))

    def cell_capacity(self, cells: np.ndarray, grow: float = 1.0) -> int:
        """The second capacity of a build from the cell of each particle (any
        leading batch shape): the most candidates any particle has in its 3^d
        cells, ×1.2 + 2, times ``grow``."""
        cells = np.asarray(cells).reshape(-1, self.n)
        size = int(np.prod(self.grid))
        counts = [np.bincount(c, minlength=size) for c in cells]
        most = max(int(k[self.neighbor_cells].sum(axis=1).max()) for k in counts)
        return int(math.ceil(most * 1.2 * grow)) + 2

    def placeholder(self, x: Array, capacity: int, cell_capacity: int) -> Neighbors:
        """An empty table of the given capacities, to be built inside the compiled
        loop (pass ``stale=True``): no separate compile of the build."""
        x = jnp.asarray(x)
        if self.static:
            return self.build(x, self.n - 1, 0)
        n = self.n
        cells = (0, 0) if self.grid is None else (0, cell_capacity)
        # NumPy constants: passed to the compiled chunk, no eager program each
        return Neighbors(np.full((n, capacity), n, np.int32), x, np.full(cells, n, np.int32),
                         np.zeros((), bool))

    def _near_counts(self, x: Array, cell_capacity: int, box: Array | None = None,
                     deform: Array | None = None) -> Array:
        """(N,) how many particles lie within ``cutoff + skin`` of each."""
        cand, _, _ = self._candidates(x, cell_capacity, box)
        return jnp.sum(self._near(x, cand, box, deform), axis=1)

    def _both_counts(self, x: Array, cell_capacity: int, deform: Array | None = None) -> tuple[Array, Array]:
        near = self._near_counts(x, cell_capacity, None, deform)
        return jnp.max(near), jnp.sum(near) // 2

    def count(self, x: Array, cell_capacity: int, box: Array | None = None) -> Array:
        """The most neighbors any particle has at ``x`` (jittable)."""
        return jnp.max(self._near_counts(x, cell_capacity, box))

    def pair_capacity(self, x: Array, cell_capacity: int, grow: float = 1.0, shrink: bool = False,
                      deform: Array | None = None, radius: Any = None) -> int:
        """P, the :class:`PairList` capacity for positions ``x``: the pairs within
        ``cutoff + skin`` there ×1.2 (× ``grow``). Their number is about the
        density's, whatever the configuration, so it barely changes during a
        relaxation; like the table's, it only grows for a given Table."""
        if shrink:
            self._sticky_pairs = 0
        if self.static:
            return self.n * (self.n - 1) // 2
        at, pairs = self._last_pairs
        if at is None or at[0] is not x or at[1] != cell_capacity or at[2] is not deform or at[3] is not radius:
            pairs = self._count_pairs(x, cell_capacity, deform, radius)[1]
        # a multiple of PAIR_CAPACITY_STEP: the force's pair arrays are then vectorised
        # without a tail (2D N = 16384: 0.37 ms a force at P = 55369, 0.27 at 55376)
        capacity = -(-(int(math.ceil(pairs * 1.2 * grow)) + 8) // PAIR_CAPACITY_STEP) * PAIR_CAPACITY_STEP
        self._sticky_pairs = min(max(self._sticky_pairs, capacity), self.n * (self.n - 1) // 2)
        return self._sticky_pairs

    def pair_placeholder(self, capacity: int, width: int, order: Array | None = None) -> PairList:
        """An empty :class:`PairList` of the given capacities (built in the loop)."""
        zeros = np.zeros(capacity, np.int32)
        gather = np.full((self.n, width), 2 * capacity, np.int32)
        if order is None:
            return PairList(zeros, zeros, gather, np.zeros((), bool))
        return PairList(zeros, zeros, gather, np.zeros((), bool), np.asarray(order, np.int32), zeros, zeros)

    def moved(self, x: Array, nbrs: Neighbors, box: Array | None = None) -> Array:
        """Whether the table may miss a pair closer than the cutoff: the two
        largest displacements since its build add up to more than ``skin``.

        A pair's distance changes by at most the sum of its two particles'
        displacements, so until then every pair within the cutoff was within
        ``cutoff + skin`` at the build. (The usual test, the largest
        displacement against ``skin / 2``, is the same bound with both taken
        as the largest; a relaxation's largest displacements are often a few
        rattlers, and the sum rebuilds less often.)"""
        if self.static:
            return jnp.zeros((), bool)
        dx = self._wrap(x - nbrs.reference, box)
        d2 = minimize.squared_length(dx)
        first = jnp.max(d2)
        # The second largest without an argmax (a two-operand reduce on XLA:CPU:
        # N = 131072, this test took 671 µs with one against 162 µs): the largest
        # again where it is attained twice, else the largest below it.
        ties = jnp.sum(d2 == first, dtype=jnp.int32)
        second = jnp.where(ties > 1, first, jnp.max(jnp.where(d2 < first, d2, 0.0)))
        return jnp.sqrt(first) + jnp.sqrt(second) > self.skin


def overflowed(nbrs: Neighbors) -> bool:
    return bool(np.asarray(nbrs.overflow))


# -- the driver --------------------------------------------------------------------------


def _minimizer(system: System, table: Table, method: str, pairs: bool = False,
               max_displacement: float | None = None) -> minimize.Minimizer:
    """The minimizer on a table (``env = (θ, idx)``) or, with ``pairs``, on its
    :class:`PairList` (``env = (θ, pair_list)``)."""
    force = pair_list_force_fn(system) if pairs else pair_force_fn(system)
    shift = minimize.periodic_shift if system.periodic else minimize.free_shift

    def force_fn(x: Array, env: tuple[Params, Array]) -> Array:
        return force(x, env[1], env[0])

    def shift_fn(x: Array, dx: Array, env: tuple[Params, Array]) -> Array:
        return shift(x, dx, env[0])

    return minimize.make(method, shift_fn, force_fn=force_fn, max_displacement=max_displacement)


class _Compiled(NamedTuple):
    minimizer: minimize.Minimizer
    advance: Callable
    executables: dict

    def chunk(self, state: Any, nbrs: Any, pairs: PairList, params: Params, until: Array,
              stale: Array) -> tuple[Callable, float]:
        """The chunk compiled for these shapes (once per table and pair capacity),
        and the seconds its compile took (0.0 when cached)."""
        key = (nbrs.idx.shape, nbrs.cells.shape, pairs.i.shape, pairs.order is None, state.x.dtype)
        return driver.compiled(self.executables, key,
                               lambda: self.advance.lower(state, nbrs, pairs, params, until, stale))


#: relaxation programs kept in process, keyed by model and options (least
#: recently used dropped first); each holds its table and compiled chunks
PROGRAM_LIMIT = 32
_CACHE: "OrderedDict[Hashable, list[tuple[Table, _Compiled]]]" = OrderedDict()


def _programs(system: System, params: Params, method: str, ftol: float, skin: float,
              max_displacement: float | None = None) -> tuple[Table, _Compiled]:
    """The table and the jitted init and chunk functions, cached per model
    (:attr:`System.model`: a new build of the same model, another seed or θ,
    shares them) and box, minimizer, tolerance, skin and specialised constants:
    a second relaxation compiles nothing. The compiled functions close over the
    model's :attr:`~mdsens.system.Model.template` only; the table's sticky
    capacities are lower bounds (the force does not depend on them, an
    overflow still reallocates), so sharing a table between systems of one
    model changes shapes, never results."""
    box = tuple(np.asarray(params["box"]).tolist()) if system.periodic else None
    cutoff = float(system.cutoff(params))
    # The model's code-path parameters (the soft-sphere α) become constants of
    # the compiled loop: one program per value (System.specialize).
    constants = {name: float(params[name]) for name in system.specialize
                 if name in params and np.ndim(params[name]) == 0}
    key = (system.model, method, float(ftol), float(skin), box, tuple(sorted(constants.items())),
           None if max_displacement is None else float(max_displacement))
    entries = _CACHE.get(key)
    if entries is not None:
        _CACHE.move_to_end(key)
        for table, programs in entries:
            # A cached table serves a slightly smaller cutoff too (a finite
            # difference in a diameter, a design step): no new compile.
            if cutoff <= table.cutoff <= CUTOFF_SLACK**2 * cutoff or (math.isinf(cutoff) and table.static):
                return table, programs
    table = Table(system, params, skin, cutoff * CUTOFF_SLACK if math.isfinite(cutoff) else None,
                  radius=system.radius)
    model = system.model.template  # what the programs close over: the model, no run's numbers
    mini = _minimizer(model, table, method, pairs=True, max_displacement=max_displacement)

    def advance(state: Any, nbrs: Any, pairs: PairList, params: Params, until: Array, stale: Array):
        """Steps until converged, ``until``, stalled, or the table (or its pair
        list) overflows; returns ``(state, table, pairs, rebuilds, max|F|, stalled, E)``.

        Two loops, so that a step pays no branch: the inner one steps on a fixed
        table until :meth:`Table.moved` says it may miss a pair; the outer one rebuilds the table and re-evaluates
        the force that the inner loop took on the old one (one extra force per
        rebuild, about one step in thirty). ``stale`` (a fresh start, an empty
        table of the right shape) builds the table and the force first, so
        that nothing but this loop is compiled."""
        params = {**params, **constants}

        def go(s, nb):
            return minimize.running(mini, s, ftol, until) & ~nb.overflow

        def inner(c):
            def body(c):
                s, nb, pl, _, rebuilds = c
                s = mini.step(s, (params, pl))
                return s, nb, pl, table.moved(s.x, nb), rebuilds

            return jax.lax.while_loop(lambda c: go(c[0], c[1]) & ~c[3], body, c)

        def rebuild(s, nb, pl, rebuilds, at):
            radius = None
            if table.radius is not None:  # in the relaxation's numbering
                radius = table.radius(params)
                radius = radius if pl.order is None else radius[pl.order]
            nb, pl = table.build_pairs(at, nb.idx.shape[1], nb.cells.shape[1], pl.i.shape[0], pl.order, radius)
            return mini.step_force(s, (params, pl)), nb, pl, rebuilds + 1

        def outer(c):
            s, nb, pl, stale_, rebuilds, placeholder = c
            # a placeholder is built where it says (a resumed run: where the saved
            # table was built, so that the rows come out in the same order), a
            # table that moved too far where the particles are now
            at = jnp.where(placeholder, nb.reference, s.x)
            s, nb, pl, rebuilds = jax.lax.cond(stale_, rebuild, lambda *a: a[:4], s, nb, pl, rebuilds, at)
            return inner((s, nb, pl, jnp.zeros((), bool), rebuilds)) + (jnp.zeros((), bool),)

        first = (state, nbrs, pairs, stale | table.moved(state.x, nbrs), jnp.zeros((), jnp.int32), stale)
        # A stale table is rebuilt (and the force taken) even when the loop would
        # stop at once: a converged start must not report a blank force.
        s, nb, pl, _, rebuilds, _ = jax.lax.while_loop(lambda c: go(c[0], c[1]) | c[3], outer, first)
        return (s, nb, pl, rebuilds, minimize.max_force(s.force), mini.stalled(s),
                table_energy(model, s.x, nb.idx, params, pl.order))

    programs = _Compiled(mini, jax.jit(advance), {})
    _CACHE.setdefault(key, []).append((table, programs))
    _CACHE.move_to_end(key)
    while len(_CACHE) > PROGRAM_LIMIT:
        _CACHE.popitem(last=False)
    return table, programs


def relax(
    system: System,
    params: Params,
    x0: Array | None = None,
    method: str = "fire",
    ftol: float = 1e-10,
    max_steps: int = 100_000,
    chunk: int = 2_000,
    callback: Callable[[int, float, float], None] | None = None,
    skin: float = DEFAULT_SKIN,
    polish: float | None = None,
    checkpoint: Callable[[dict[str, np.ndarray]], None] | None = None,
    checkpoint_every: float = 60.0,
    resume: dict[str, np.ndarray] | None = None,
    max_displacement: float | None = None,
    snapshot: Callable[[np.ndarray, float], None] | None = None,
) -> Relaxed:
    """Relax ``system`` at parameters ``params`` from real-space ``x0``
    (default: its initial positions) until ``max_i |F_i| < ftol`` or
    ``max_steps``, in compiled chunks of ``chunk`` steps with
    ``callback(step, max_force, elapsed_s)`` between them.

    ``polish``: a coarser force tolerance at which the minimizer hands over to
    damped Newton steps (:func:`newton_polish`); the minimizer takes over again
    from wherever a Newton step fails. None: the minimizer alone.

    ``checkpoint(state)`` is called with the minimizer's whole state (NumPy
    arrays: positions, velocities, FIRE's dt, α and counters, the step) at a
    chunk boundary at least every ``checkpoint_every`` seconds; ``resume``
    (such a state) continues from it instead of starting at ``x0``. A
    checkpoint also holds the table's build point, and the resumed run builds
    its first table there (the same table: in 3D its rows, and with them the
    force's order of summation, follow the cells at the build), so a resumed
    run takes exactly the steps of an uninterrupted one.

    ``max_displacement``: FIRE's per-step cap on any coordinate's move
    (:func:`mdsens.minimize.fire`; None, the default: none).

    ``snapshot(x, max_force)``: called with the positions (real space, NumPy, the
    model's numbering) after each chunk that ends below max|F| = :data:`SNAPSHOT_NEAR`;
    from there the chunks are at most :data:`SNAPSHOT_CHUNK` steps (the same steps:
    chunk length does not change the trajectory), so that one comes shortly before
    the end (what :class:`mdsens.sparse.Ahead` analyses beside the relaxation)."""
    params = {k: jnp.asarray(v) for k, v in params.items()}
    x = jnp.asarray(system.positions if x0 is None else x0)
    if system.periodic:
        # on the host (NumPy's mod is XLA's: fmod, then + box where the signs differ)
        x = jnp.asarray(np.mod(np.asarray(x), np.asarray(params["box"])))
    saving = (checkpoint, checkpoint_every, resume)
    if polish is None or polish <= ftol:
        return _descend(system, params, x, method, ftol, max_steps, chunk, callback, skin, saving, max_displacement,
                        snapshot)
    if checkpoint is not None or resume is not None:
        raise ValueError("checkpoints are not supported with the Newton polish")
    coarse = _descend(system, params, x, method, polish, max_steps, chunk, callback, skin,
                      max_displacement=max_displacement, snapshot=snapshot)
    if not bool(coarse.info.converged):
        return coarse
    t = time.perf_counter()
    x, info, newton = newton_polish(system, params, coarse.x, ftol, skin)
    stats = coarse.stats._replace(newton_steps=newton.steps, cg_iterations=newton.cg_iterations,
                                  newton_s=time.perf_counter() - t - newton.compile_s)
    compile_s = coarse.compile_s + newton.compile_s
    steps = coarse.info.steps + newton.steps
    if bool(info.converged) or int(steps) >= max_steps:
        return Relaxed(x, info._replace(steps=steps), compile_s, newton.idx, stats)
    # A Newton step failed to descend (an indefinite Hessian, a contact
    # change): the minimizer finishes from there.
    rest = _descend(system, params, x, method, ftol, max_steps - int(steps), chunk, callback, skin,
                    max_displacement=max_displacement, snapshot=snapshot)
    stats = rest.stats._replace(newton_steps=newton.steps, cg_iterations=newton.cg_iterations,
                                newton_s=stats.newton_s, fallback=True)
    return Relaxed(rest.x, rest.info._replace(steps=rest.info.steps + steps), compile_s + rest.compile_s,
                   rest.idx, stats)


#: below this max|F| a relaxation with a ``snapshot`` hands its positions over after each
#: chunk, and its chunks are at most :data:`SNAPSHOT_CHUNK` steps (2D bidisperse N = 1024,
#: seeds 0–3: the contact network is that of x* from max|F| ≈ 1e-6, a few hundred steps
#: before the end at ftol 1e-10)
SNAPSHOT_NEAR = 1e-4
SNAPSHOT_CHUNK = 250


def _placeholders(table: Table, x: Array, grow: float = 1.0, order: np.ndarray | None = None,
                  radius: np.ndarray | None = None) -> tuple[Neighbors, PairList]:
    """An empty table and pair list sized for ``x`` (``radius``: the radii in
    the relaxation's numbering, or None), built inside the chunk."""
    capacity, cell_capacity = table.capacities(x, grow, radius=radius)
    return (table.placeholder(x, capacity, cell_capacity),
            table.pair_placeholder(table.pair_capacity(x, cell_capacity, grow, radius=radius), capacity, order))


def spatial_order(table: Table, x: Array) -> np.ndarray:
    """(N,) int32 the particles sorted by cell (row-major), stably: renumbered
    so, neighbors sit close in memory. A random start's order scatters every
    pair's gathers over the whole position array; at N = 131072 (2D) one
    force costs 46 ms in cell order against 78 ms in random order, a build
    128 against 184 and a pair list 124 against 227 (``bench/cpu/order_probe.py``)."""
    return np.argsort(table.cells_on_host(x), kind="stable").astype(np.int32)


def renumbered(a: np.ndarray, order: np.ndarray | None, inverse: bool = False) -> np.ndarray:
    """A per-particle array in the relaxation's numbering (``inverse``: back in
    the model's); anything else unchanged."""
    a = np.asarray(a)
    if order is None or a.ndim == 0 or a.shape[0] != order.shape[0]:
        return a
    if not inverse:
        return a[order]
    out = np.empty_like(a)
    out[order] = a
    return out


def table_in_model_numbering(idx: Array, order: np.ndarray | None) -> Array:
    """A table built on renumbered particles (or rows in candidate order,
    :meth:`Table.build_pairs`), with rows and entries in the model's
    numbering (rows sorted, padded with N)."""
    idx = np.asarray(idx)
    if order is None:
        return jnp.asarray(np.sort(idx, axis=1))
    n = order.shape[0]
    entries = np.where(idx < n, order[np.minimum(idx, n - 1)], n)
    return jnp.asarray(np.sort(renumbered(entries, order, inverse=True), axis=1).astype(idx.dtype))


def _descend(system: System, params: Params, x: Array, method: str, ftol: float, max_steps: int, chunk: int,
             callback: Callable[[int, float, float], None] | None, skin: float,
             saving: tuple[Any, float, dict | None] = (None, 60.0, None),
             max_displacement: float | None = None,
             snapshot: Callable[[np.ndarray, float], None] | None = None) -> Relaxed:
    """The minimizer in compiled chunks (:func:`mdsens.driver.drive`), from
    real-space ``x`` (or a resumed state)."""
    checkpoint, checkpoint_every, resume = saving
    start = time.perf_counter()
    table, programs = _programs(system, params, method, ftol, skin, max_displacement)
    mini = programs.minimizer
    if resume is not None:
        x = jnp.asarray(resume["x"])
        if "capacity" in resume:  # the same table shapes: the same compiled arithmetic
            capacity = [int(c) for c in np.ravel(resume["capacity"])]
            table._sticky = tuple(max(a, b) for a, b in zip(table._sticky, capacity[:2]))
            if len(capacity) > 2:
                table._sticky_pairs = max(table._sticky_pairs, capacity[2])
    # Large systems relax renumbered in cell order (a resumed run in the order
    # it was saved with: the same sums, the same steps); what leaves this
    # function (positions, table, checkpoints) is in the model's numbering.
    order = None
    if resume is not None and "order" in resume:
        order = np.asarray(resume["order"], np.int32)
    elif resume is None and table.cell_list and system.n >= SORT_THRESHOLD:
        order = spatial_order(table, x)
    x = jnp.asarray(renumbered(x, order))
    radius = None  # per-particle reach, for sizing the table on the host
    if table.radius is not None:
        radius = renumbered(np.asarray(table.radius({k: np.asarray(v) for k, v in params.items()}), float), order)
    # the table is (Neighbors, PairList), empty at first: the chunk builds it
    # and takes the force (bitwise the saved one)
    tables = _placeholders(table, x, order=order, radius=radius)
    if resume is not None and "reference" in resume:  # rebuilt where the saved table was built
        tables = (tables[0]._replace(reference=jnp.asarray(renumbered(resume["reference"], order), x.dtype)),
                  tables[1])
    state = mini.blank(x)
    if resume is not None:
        missing = set(state._fields) - set(resume)
        if missing:
            raise ValueError(f"checkpoint lacks {', '.join(sorted(missing))} (another minimizer?)")
        state = state._replace(**{k: jnp.asarray(renumbered(resume[k], order), dtype=getattr(state, k).dtype)
                                  for k in state._fields})
    setup_s = time.perf_counter() - start

    near = [np.inf]  # the last chunk's max|F|: near the end, short chunks for the snapshots

    def program(state, tables, until, stale):
        executable, seconds = programs.chunk(state, *tables, params, np.int32(until), np.bool_(stale))

        def run(state, tables, until, stale):
            if snapshot is not None and near[0] < SNAPSHOT_NEAR:
                until = min(until, int(state.step) + SNAPSHOT_CHUNK)
            s, nb, pl, rebuilds, fmax, stalled, energy = executable(
                state, *tables, params, np.int32(until), np.bool_(stale))
            overflow = overflowed(nb)
            if overflow:  # inf/NaN positions: no table fits
                diverged = not bool(jnp.all(jnp.isfinite(s.x)))
            else:
                diverged = not math.isfinite(float(fmax))
            return driver.Chunk(s, (nb, pl), int(s.step), overflow, float(fmax) < ftol, bool(stalled), diverged,
                                rebuilds=int(rebuilds), out=(fmax, energy))

        return run, seconds

    def widen(state, tables, report, attempt):
        return _placeholders(table, state.x, grow=1.5**attempt, order=order, radius=radius)

    def resize(state, tables):
        # A random start has overlapping clusters and needs a wide table; a few
        # hundred steps later most particles have far fewer neighbors. Large
        # systems resize the table once there: fewer entries per step pay for
        # one more compile (N = 16384: capacity 29 → 14).
        nbrs, _ = tables
        capacity, cell_capacity = table.capacities(state.x, shrink=True, radius=radius)
        if capacity < 0.75 * nbrs.idx.shape[1]:
            pair_capacity = table.pair_capacity(state.x, cell_capacity, shrink=True, radius=radius)
            return table.placeholder(state.x, capacity, cell_capacity), \
                table.pair_placeholder(pair_capacity, capacity, order)
        table._sticky = (nbrs.idx.shape[1], nbrs.cells.shape[1])
        return None

    def report(chunk, elapsed):
        near[0] = float(chunk.out[0])
        if snapshot is not None and near[0] < SNAPSHOT_NEAR:
            snapshot(renumbered(np.asarray(chunk.state.x), order, inverse=True), near[0])
        if callback is not None:
            callback(chunk.step, near[0], elapsed)

    def save(state, tables):
        nbrs, pairs = tables
        checkpoint({**{k: renumbered(v, order, inverse=True) for k, v in state._asdict().items()},
                    "capacity": np.asarray([nbrs.idx.shape[1], nbrs.cells.shape[1], pairs.i.shape[0]]),
                    "reference": renumbered(np.asarray(nbrs.reference), order, inverse=True),
                    **({} if order is None else {"order": order})})

    settle = SETTLE_STEPS if system.n >= RESIZE_THRESHOLD and not table.static else 0
    done = driver.drive(state, tables, program, widen, chunk=chunk, max_steps=max_steps, step=int(state.step),
                        settle=settle, resize=resize, callback=None if callback is None and snapshot is None else report,
                        checkpoint=None if checkpoint is None else save, checkpoint_every=checkpoint_every)
    state, (nbrs, _), (fmax, energy) = done.state, done.table, done.last.out
    x = jax.block_until_ready(state.x)
    if order is not None:
        x = jnp.asarray(renumbered(x, order, inverse=True))
    info = minimize.RelaxInfo(state.step, fmax, energy, np.asarray(float(fmax) < ftol))
    stats = RelaxStats(int(nbrs.idx.shape[1]), done.reallocations, done.rebuilds, table.cell_list)
    return Relaxed(x, info, setup_s + done.compile_s, table_in_model_numbering(nbrs.idx, order), stats)


# -- Newton polish -------------------------------------------------------------------------


class NewtonInfo(NamedTuple):
    steps: int
    cg_iterations: int
    compile_s: float
    idx: Array


def _table_hessian(system: System, x: Array, idx: Array, params: Params) -> Array:
    """(N, K, d, d): ``∂²φ/∂r²`` of each table entry (zero on padding), real space."""
    dr, r2, rows, j, valid = table_separations(system, x, idx, params)

    def pair_energy(r_vec: Array, a: Array, b: Array) -> Array:
        d2 = jnp.sum(r_vec**2)
        return system.pair(jnp.sqrt(jnp.where(d2 > 0, d2, 1.0)), a, b, params)

    rows_b = jnp.broadcast_to(rows, idx.shape)
    k = jax.vmap(jax.vmap(jax.hessian(pair_energy)))(dr, rows_b, j)
    return jnp.where((valid & (r2 > 0))[..., None, None], k, 0.0)


#: CG tolerance of a Newton step (relative to |F|): each step gains ~3 digits.
NEWTON_RTOL = 1e-3
NEWTON_MAX_STEPS = 12
#: Two Newton steps in a row that each leave max|F| above this fraction of
#: their start end the polish (the minimizer finishes): near a minimum a step
#: gains digits; steps that gain less are on a non-convex stretch, where the
#: Hessian has a negative eigenvalue (measured: N = 1024 at max|F| = 1e-4,
#: λ_min = −1.6e-4; N = 16384 at 1e-6, where twelve steps of ~660 CG
#: iterations each took max|F| only from 1e-6 to 3e-7 before this rule). One
#: weak step is allowed: at N = 4096 from 1e-6 a damped first step reached
#: 5.7e-7 and the next 7e-11.
NEWTON_MIN_GAIN = 0.5


def _newton_program(system: System) -> Callable:
    """One damped Newton step: ``(x, nbrs, params) -> (x', f', ok, cg_iterations)``
    (:func:`newton_polish` compiles it once per model and shapes, :func:`mdsens.cache.program`).

    Levenberg–Marquardt: solve ``(H + μI) δ = F`` with ``μ = max|F|`` (per unit
    length²) by block-Jacobi-preconditioned CG on the table's pair blocks —
    positive definite for any μ > 0, so translations and rattlers need no gauge
    (their force components are zero or are resolved by μ) — then backtrack
    ``t = 1, ½, …`` until the step does not climb (E within round-off of the
    start) and lowers max|F|. ``ok`` is False when no step length does."""
    from mdsens import linsolve

    force = pair_force_fn(system)
    shift = minimize.periodic_shift if system.periodic else minimize.free_shift
    n, d = system.n, system.dim

    def step(x: Array, nbrs: Neighbors, params: Params):
        idx = nbrs.idx
        f = force(x, idx, params)
        fmax = minimize.max_force(f)
        e0 = table_energy(system, x, idx, params)
        blocks = _table_hessian(system, x, idx, params)
        mu = fmax
        valid = idx < n
        j = jnp.where(valid, idx, jnp.arange(n, dtype=idx.dtype)[:, None])
        eye = jnp.eye(d, dtype=x.dtype)
        diag = jnp.sum(blocks, axis=1) + mu * eye
        inverse = jnp.linalg.inv(diag)

        def matvec(v: Array) -> Array:
            # Broadcast-and-sum, not einsum: XLA:CPU's batched 2×2 dot_general
            # was measured ~10× slower than this elementwise form.
            dv = v[:, None, :] - v[j]
            return jnp.sum(blocks * dv[:, :, None, :], axis=(1, 3)) + mu * v

        solve = linsolve.cg(rtol=NEWTON_RTOL, maxiter=10 * n * d,
                            preconditioner=lambda r: jnp.sum(inverse * r[:, None, :], axis=2))
        delta, info = solve(matvec, f)
        slack = 1e-12 * jnp.abs(e0) + 1e-300

        def attempt(t):
            x1 = shift(x, t * delta, params)
            f1 = force(x1, idx, params)
            e1 = table_energy(system, x1, idx, params)
            return x1, f1, (e1 <= e0 + slack) & (minimize.max_force(f1) < fmax)

        def cond(c):
            t, tries, ok = c[0], c[1], c[4]
            return (~ok) & (tries < 10)

        def body(c):
            t, tries = c[0], c[1]
            x1, f1, ok = attempt(t)
            return (0.5 * t, tries + 1, x1, f1, ok)

        init = (jnp.asarray(1.0, x.dtype), 0, x, f, jnp.zeros((), bool))
        _, _, x1, f1, ok = jax.lax.while_loop(cond, body, init)
        return jnp.where(ok, x1, x), jnp.where(ok, f1, f), ok, info.iterations, fmax

    return step


def newton_polish(system: System, params: Params, x: Array, ftol: float, skin: float = DEFAULT_SKIN,
                  max_steps: int = NEWTON_MAX_STEPS) -> tuple[Array, minimize.RelaxInfo, NewtonInfo]:
    """Damped Newton steps from a nearly relaxed ``x`` until ``max|F| < ftol``,
    a failed step, or ``max_steps``: the same minimum FIRE converges to (a step
    never climbs), in a few Hessian solves instead of the minimizer's slow
    tail. The table is refreshed whenever a particle has moved ``skin / 2``."""
    start = time.perf_counter()
    table, _ = _programs(system, params, "fire", ftol, skin)
    nbrs = table.allocate(x)
    model = system.model

    def program(x: Array, nbrs: Neighbors, params: Params) -> tuple[Callable, float]:
        # once per model and shapes: a second polish (another seed, θ) compiles nothing
        return cache.program(("relax.newton", model), lambda: _newton_program(model.template), x, nbrs, params)

    compiled, _ = program(x, nbrs, params)
    capacity = nbrs.idx.shape
    compile_s = time.perf_counter() - start
    steps = cg = 0
    fmax = float("inf")
    f = None
    weak = 0
    while steps < max_steps:
        x_new, f, ok, iterations, start_fmax = compiled(x, nbrs, params)
        cg += int(iterations)
        if not bool(ok):
            break
        steps += 1
        x = x_new
        fmax = float(minimize.max_force(f))
        if fmax < ftol:
            break
        weak = weak + 1 if fmax > NEWTON_MIN_GAIN * float(start_fmax) else 0
        if weak == 2:
            break  # not in Newton's basin yet: the minimizer takes over
        if bool(table.moved(x, nbrs)):
            nbrs = table.allocate(x)
            if nbrs.idx.shape != capacity:
                t = time.perf_counter()
                compiled, _ = program(x, nbrs, params)
                capacity = nbrs.idx.shape
                compile_s += time.perf_counter() - t
    # E and max|F| at the end, compiled per model too (evaluated eagerly, a new
    # build's own pair function would be traced again)
    final, c = cache.program(("relax.newton_end", model), lambda: lambda x_, i_, p_: (
        table_energy(model.template, x_, i_, p_), minimize.max_force(pair_force_fn(model.template)(x_, i_, p_))),
        x, nbrs.idx, params)
    energy, last = final(x, nbrs.idx, params)
    compile_s += c
    if f is None or fmax == float("inf"):
        fmax = float(last)
    info = minimize.RelaxInfo(jnp.asarray(steps, jnp.int32), jnp.asarray(fmax), energy, jnp.asarray(fmax < ftol))
    return x, info, NewtonInfo(steps, cg, compile_s, nbrs.idx)

