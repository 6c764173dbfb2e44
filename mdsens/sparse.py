"""Sparse direct solve of the gauge-fixed Hessian: assembled from the pair blocks, factored once.

The CG path (:mod:`mdsens.linsolve`) never forms the Hessian. This module does:
``H = Σ_pairs (e_i − e_j)(e_i − e_j)ᵀ ⊗ K_ij`` in solver coordinates (the blocks
``L K L`` of :meth:`mdsens.system.System.pair_hessians`, so fractional coordinates
in a periodic box are already accounted for) as a ``scipy.sparse`` matrix, inside a
``jax.pure_callback``, and solves the engine's system

    M = P H P + (I − P),    P = D_held − T Tᵀ,

exactly (to round-off), for every gauge of that form: :func:`mdsens.gauge.translations`
(T the held particles' uniform shifts) and :func:`mdsens.gauge.rigid_body` (shifts and
rotations), D_held the diagonal that zeroes rattler rows.

The algebra. On the rattlers' coordinates M is the identity, so ``x = b`` there. On the
held ones, with A the held–held block of H (rattler rows and columns removed; a held
particle keeps the diagonal term of its contacts with rattlers) and Q = I − T Tᵀ,
M is ``K = Q A Q + T Tᵀ``, so ``x = T Tᵀ b + z`` where z is the solution of the
bordered system ``A z + T μ = Q b``, ``Tᵀ z = 0``. A is singular (the shifts, and the
rotations of a free cluster, when no rattler touches a held particle) or nearly so, and
the bordered system has dense rows, so neither is factored. Instead a few coordinates E
(one per gauge mode, the pivots of a QR of Tᵀ with column pivoting, so that ``Eᵀ T`` is well conditioned) are
grounded: ``S = A + s E Eᵀ`` is sparse and non-singular, CHOLMOD's supernodal Cholesky
(shipped by cvxopt) factors it (S is positive definite at a stable minimum; where it is
not, or cvxopt is missing, SuperLU does, with a symmetric ordering), and the grounding is
undone exactly through the r + m unknowns (μ, ν = Eᵀ z):

    z = S⁻¹Q b − S⁻¹T μ + s S⁻¹E ν,    Tᵀ z = 0,    Eᵀ z = ν,

a dense (r + m)-square system. In the common case no rattler touches a held particle, so
``A T = 0`` (to round-off): then μ = 0 and ``z = Q S⁻¹ Q b``, one solve per right-hand side
and no columns ``S⁻¹[T, E]``. One factorization and the r + m columns ``S⁻¹[T, E]``
serve every right-hand side: a batch under ``vmap`` is one multi-column solve, and the
last two factorizations are kept (found by a checksum of the blocks, the pairs, the
rattlers and the modes, and confirmed against the kept inputs themselves), so the batches
of tangents of :func:`mdsens.sensitivity.forward_fn`, the reverse solve at the same state,
or a second ``--wrt`` factor once. The answer is
refined by one step against M where its relative residual is above ``REFINE_TOL``.

It is a host (CPU) computation: on an accelerator the callback copies the blocks to the
host and back. The JAX CG path stays the one for accelerators.
"""

from __future__ import annotations

import collections
import threading
import time
import zlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import linsolve
from mdsens.system import Params, System

Array = jax.Array

#: factorizations kept (least recently used dropped first); each holds its LU factors
#: (N = 16384 in 2D: ~45 MB) and a copy of its inputs (2.7 MB there)
CACHE_SIZE = 2
_CACHE: "collections.OrderedDict[int, tuple[str, tuple[np.ndarray, ...], _Factor]]" = collections.OrderedDict()
_LOCK = threading.Lock()
_FACTOR_LOCK = threading.Lock()
#: what the host did, for tests and the benchmark: factorizations, solve calls
STATS = {"factorizations": 0, "calls": 0, "hits": 0, "cholmod": 0, "superlu": 0, "prepared": 0, "ahead": 0, "refilled": 0}
#: the factorization: "auto" (CHOLMOD's supernodal Cholesky when cvxopt is installed and S
#: is positive definite, SuperLU otherwise), "cholmod" (an error if it cannot) or "superlu"
BACKEND = "auto"
_CHOLMOD_LOCK = threading.Lock()
#: tangents solved in one host call by :func:`mdsens.sensitivity.forward_fn` (vmapped in
#: batches): at most this many, and at most BATCH_PARTICLES / N, never fewer than two. A
#: batch holds a copy of every per-pair array per tangent (the forward program's
#: temporaries: 26 MB for two tangents at N = 16384). Polydisperse N = 1024, 1024 tangents:
#: one at a time 670 ms, batches of 8 / 16 / 32 / 64 306–311 / 296–381 / 389–394 / 400 ms,
#: all at once 807 ms and 970 against 557 MB peak.
BATCH_SIZE = 16
BATCH_PARTICLES = 1 << 16


def batch_size(n: int) -> int:
    """The tangents per host call for N = ``n`` particles (above)."""
    return max(2, min(BATCH_SIZE, BATCH_PARTICLES // max(n, 1)))
#: a solve whose relative residual against K is above this is refined by one step (CHOLMOD's
#: first solve is at 1e-14–1e-13 for N = 1024–131072 in 2D, and a step changes it by ~1e-14)
REFINE_TOL = 1e-12
#: max|A T| ≤ NULL_TOL · max|A|: the gauge modes are A's null space (no rattler touches a
#: held particle), so the solve needs no grounding correction
NULL_TOL = 1e-13


def clear_cache() -> None:
    """Forget every kept factorization (the benchmark times a cold solve this way)."""
    with _LOCK:
        _CACHE.clear()


def warm_up() -> None:
    """Import and run the host side once on a two-particle problem (SciPy's sparse
    modules, CHOLMOD): a fresh process pays ~0.1 s for it on its first factorization
    (N = 1024: four times the derivative). :func:`mdsens.job.execute` calls it in a
    thread beside the relaxation. Touches neither the cache nor :data:`STATS`."""
    import scipy.linalg  # noqa: F401
    import scipy.sparse as sp
    import scipy.sparse.linalg  # noqa: F401

    a = sp.csc_matrix((np.array([2.0, -1.0, -1.0, 2.0]), (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))), shape=(2, 2))
    a.sum_duplicates()
    a @ np.ones((2, 1))
    scipy.linalg.lu_factor(np.eye(2))
    np.linalg.svd(np.eye(2))
    factor = _cholesky(2, np.array([2.0, -1.0, 2.0]), np.array([0, 1, 1]), np.array([0, 0, 1]))
    if factor is not None:
        factor.solve(np.ones((2, 1)))


def warm_up_beside() -> threading.Thread:
    """:func:`warm_up` in a daemon thread, started; join it before timing a derivative."""
    def run() -> None:
        try:
            warm_up()
        except Exception:  # noqa: BLE001 -- only a head start: the derivative imports what it needs itself
            pass

    thread = threading.Thread(target=run, name="mdsens-sparse-warm-up", daemon=True)
    thread.start()
    return thread


def null_modes(system: System, q: Array, params: Params, rattler: Array,
               project: Callable[[Array], Array]) -> Array:
    """(N, d, g): the gauge's null space as ``(I − P) g`` of the rigid motions ``g``
    (the d shifts; in free space also the d(d−1)/2 rotations), unit-normalised first.

    Built with the engine's own projector, so the modes the solve removes are the ones
    ``P`` removes (a degenerate rotation that the gauge dropped comes out as zero and is
    dropped again here)."""
    n, d = system.n, system.dim
    dtype = q.dtype
    held = (~rattler).astype(dtype)[:, None]
    gens = [held * jnp.zeros((n, d), dtype).at[:, k].set(1.0) for k in range(d)]
    if not system.periodic:
        x = system.to_real(q, params)
        centered = held * (x - jnp.sum(held * x, axis=0) / jnp.maximum(jnp.sum(held), 1.0))
        for a in range(d):
            for c in range(a + 1, d):
                gens.append(jnp.zeros((n, d), dtype).at[:, a].set(-centered[:, c]).at[:, c].set(centered[:, a]))
    out = []
    for g in gens:
        norm = jnp.linalg.norm(g)
        g = g / jnp.where(norm > 0, norm, 1.0)
        out.append(g - project(g))
    return jnp.stack(out, axis=-1)


def solver(system: System, q: Array, params: Params, rattler: Array,
           project: Callable[[Array], Array]) -> Callable[[Callable[[Array], Array], Array], tuple[Array, linsolve.SolveInfo]]:
    """The sparse direct solve at ``(q, θ)``: ``solve(matvec, b) -> (x, SolveInfo)``
    like :func:`mdsens.linsolve.cg`. ``matvec`` (the engine's M) is used only for the
    reported true residual; ``project`` is the gauge ``P`` that M was built with.
    ``iterations`` is 0; ``converged`` says the answer is finite."""
    q, params = jax.lax.stop_gradient(q), jax.lax.stop_gradient(params)
    k, i, j = system.pair_hessians(q, params)
    modes = null_modes(system, q, params, rattler, project)
    held = ~jnp.asarray(rattler)
    i, j = i.astype(jnp.int32), j.astype(jnp.int32)
    # for the geometric ordering (:func:`_geometric_order`): where the particles are (q,
    # the solver coordinates) and the box's sides (zeros in free space)
    sides = (jnp.broadcast_to(params["box"], (system.dim,)) if system.periodic
             else jnp.zeros(system.dim)).astype(q.dtype)

    def solve(matvec: Callable[[Array], Array], b: Array) -> tuple[Array, linsolve.SolveInfo]:
        x = jax.pure_callback(_host_solve, jax.ShapeDtypeStruct(b.shape, b.dtype),
                              k.astype(b.dtype), i, j, held, modes.astype(b.dtype), q, sides, b,
                              vmap_method="expand_dims")
        info = linsolve.SolveInfo(jnp.asarray(0, jnp.int32), linsolve._true_residual(matvec, x, b),
                                  jnp.all(jnp.isfinite(x)))
        return x, info

    # One host call for a whole batch of right-hand sides (one multi-column triangular
    # solve): :func:`mdsens.sensitivity.forward_fn` vmaps its tangents for this solve,
    # in batches of up to this many (a run's two diameters: one call).
    solve.batch_size = batch_size(system.n)
    return solve


# -- host side ------------------------------------------------------------------------------

_CORE_RANK = (3, 1, 1, 1, 3, 2, 1, 2)  # k, i, j, held, modes, place, sides, b


def _host_solve(k, i, j, held, modes, place, sides, b):
    """Numpy on the host. Arguments may carry leading batch axes (``vmap`` with
    ``expand_dims``, one per level: size 1 where unbatched); each distinct matrix is
    factored once, and unbatched matrices serve the whole batch in one multi-column solve."""
    args = [np.asarray(a) for a in (k, i, j, held, modes, place, sides, b)]
    leads = [a.shape[:a.ndim - r] for a, r in zip(args, _CORE_RANK)]
    batch = np.broadcast_shapes(*leads)
    count = int(np.prod(batch)) if batch else 1
    mats = len(args) - 1  # the matrix's arguments, then b
    core_b = args[mats].shape[args[mats].ndim - 2:]

    def pick(a, lead, index):  # the entry of ``a`` for the batch index, without copying ``a``
        offset = len(batch) - len(lead)
        return a[tuple(index[offset + t] if n > 1 else 0 for t, n in enumerate(lead))]

    if all(int(np.prod(lead)) == 1 for lead in leads[:mats]):
        rhs = np.broadcast_to(args[mats], batch + core_b).reshape((count,) + core_b)
        out = _factor(*(a.reshape(a.shape[len(lead):]) for a, lead in zip(args[:mats], leads[:mats]))).solve(rhs)
    else:
        out = np.empty((count,) + core_b, args[mats].dtype)
        for m, index in enumerate(np.ndindex(*batch)):
            parts = [pick(a, lead, index) for a, lead in zip(args[:mats], leads[:mats])]
            out[m] = _factor(*parts).solve(pick(args[mats], leads[mats], index)[None])[0]
    return out.reshape(batch + core_b)


def _factor(k, i, j, held, modes, place=None, sides=None) -> "_Factor":
    """The kept factorization of this matrix, or a new one (kept). Looked up by a CRC-32
    of the inputs (~7 GB/s, against ~1.4 GB/s for BLAKE2: 0.4 against 1.9 ms for the
    2.7 MB of N = 16384 in 2D, paid by every host call) and confirmed by comparing the
    inputs themselves, so a checksum collision can never return another matrix's factor.
    ``place`` and ``sides`` (the positions, for the ordering) are optional: without them
    the ordering is minimum degree's."""
    given = (k, i, j, held, modes) + ((place, sides) if place is not None else ())
    arrays = tuple(np.ascontiguousarray(a) for a in given)
    crc = zlib.crc32(BACKEND.encode())
    for a in arrays:
        crc = zlib.crc32(a.data, zlib.crc32(str((a.shape, a.dtype.str)).encode(), crc))
    # One factorization at a time: a program with two solves on one matrix (a run's
    # forward and reverse derivatives) may call back for both at once, and the second
    # must find the first's factor, not factor again beside it.
    with _FACTOR_LOCK:
        return _lookup_or_factor(crc, arrays)


def _lookup_or_factor(crc: int, arrays: tuple[np.ndarray, ...]) -> "_Factor":
    with _LOCK:
        STATS["calls"] += 1
        found = _CACHE.get(crc)
        if found is not None and found[0] == BACKEND and all(
                x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(found[1], arrays)):
            _CACHE.move_to_end(crc)
            STATS["hits"] += 1
            return found[2]
    factor = _Factor(*arrays)
    kept = tuple(np.array(a, copy=True) for a in arrays)  # the callback's arguments may be XLA's buffers
    with _LOCK:
        STATS["factorizations"] += 1
        _CACHE[crc] = (BACKEND, kept, factor)
        _CACHE.move_to_end(crc)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return factor


class _Cholesky:
    """CHOLMOD's factor L Lᵀ = P S Pᵀ (cvxopt), with SuperLU's ``solve`` interface, and S
    itself (its lower triangle, a cvxopt ``spmatrix``) for products."""

    def __init__(self, factor, s):
        self.factor, self.s = factor, s

    def solve(self, b: np.ndarray) -> np.ndarray:
        from cvxopt import cholmod, matrix

        out = matrix(np.asarray(b, np.float64))  # a copy: CHOLMOD solves in place
        cholmod.solve(self.factor, out)
        return np.array(out)

    def apply(self, y: np.ndarray) -> np.ndarray:
        """``S y`` for columns y (size, nrhs)."""
        from cvxopt import base, matrix

        y = np.asarray(y, np.float64)
        out = np.empty_like(y)
        for c in range(y.shape[1]):
            col = matrix(np.ascontiguousarray(y[:, c]))
            res = matrix(0.0, (y.shape[0], 1))
            base.symv(self.s, col, res, uplo="L")
            out[:, c] = np.asarray(res).ravel()
        return out


def _cholesky(size: int, values: np.ndarray, rows: np.ndarray, cols: np.ndarray,
              order: np.ndarray | None = None, factor=None, pattern=None) -> "_Cholesky | None":
    """CHOLMOD's supernodal Cholesky of the symmetric matrix whose lower-triangle entries
    are ``values`` at ``(rows, cols)`` (duplicates summed), in the fill-reducing ordering
    ``order`` (a permutation of the rows) or, without one, CHOLMOD's own (AMD);
    ``None`` if cvxopt (which ships CHOLMOD) is not installed or the matrix is not
    positive definite (then the caller falls back to SuperLU). ``factor``: a factor of
    a matrix with exactly this pattern (:func:`prepare`), refactored in place: no
    symbolic analysis, and its memory is already touched; ``pattern``: that matrix and
    the triplet behind each of its values, filled instead of built."""
    try:
        from cvxopt import cholmod, matrix, spmatrix
    except ImportError:
        return None
    if pattern is not None:
        a, ccs = pattern
        a.V = matrix(np.asarray(values, np.float64)[ccs])
    else:
        a = spmatrix(matrix(np.ascontiguousarray(values, np.float64)), matrix(np.ascontiguousarray(rows, np.int64)),
                     matrix(np.ascontiguousarray(cols, np.int64)), (size, size))
    with _CHOLMOD_LOCK:  # cvxopt's options are one module-level dict: set ours, put the caller's back
        saved = dict(cholmod.options)
        cholmod.options.clear()
        cholmod.options["supernodal"] = 2
        try:
            if factor is None and order is None:
                factor = cholmod.symbolic(a, uplo="L")
            elif factor is None:  # the given ordering alone (nmethods 0 would try AMD beside it)
                cholmod.options["nmethods"] = 1
                factor = cholmod.symbolic(a, p=matrix(np.ascontiguousarray(order, np.int64)), uplo="L")
            # (a factor given: analysed ahead for this pattern, refactored in place)
            cholmod.numeric(a, factor)
        except ArithmeticError:  # not positive definite
            return None
        finally:
            cholmod.options.clear()
            cholmod.options.update(saved)
    return _Cholesky(factor, a)


def _nested_dissection(nh: int, upper: np.ndarray, lower: np.ndarray) -> np.ndarray | None:
    """METIS's nested dissection (``pymetis``) of the particle graph: ``p[k]`` the
    particle ordered k-th; ``None`` without pymetis."""
    try:
        import pymetis
    except ImportError:
        return None
    import scipy.sparse as sp

    if np.size(upper) == 0:
        return np.arange(nh, dtype=np.int64)
    ends = np.concatenate([upper, lower]).astype(np.int64)
    other = np.concatenate([lower, upper]).astype(np.int64)
    graph = sp.csr_matrix((np.ones(ends.size), (ends, other)), shape=(nh, nh))  # each edge once, both ways
    graph.sort_indices()  # the same input (and ordering) whatever order the pairs came in
    try:
        perm, _ = pymetis.nested_dissection(adjacency=pymetis.CSRAdjacency(graph.indptr, graph.indices))
    except Exception:  # noqa: BLE001 — an ordering is an optimisation: minimum degree then
        return None
    perm = np.asarray(perm, np.int64)
    return perm if np.array_equal(np.sort(perm), np.arange(nh)) else None


#: From this dimension and this many held particles on, the particle ordering is METIS's
#: nested dissection where pymetis is installed: in 3D its fill is far below minimum
#: degree's (3D bidisperse, a run's two diameters, `--solver sparse`, fresh processes,
#: session 14: N = 2048 100 against 118–130 ms, 4096 274–307 against 498–533 ms, 8192
#: 0.87–0.95 against 2.04–2.13 s), break-even at N = 1024 (38–41 against 39–41 ms) and
#: a little slower below (512: 20 against 16–17 ms); in 2D METIS itself costs more than
#: it saves (N = 16384: 61 ms for 45–52 → 40–48 ms of CHOLMOD).
NESTED_DISSECTION_DIM = 3
NESTED_DISSECTION_MIN_N = 1024


#: the ordering of the factorization: "auto" (the geometric nested dissection where the
#: positions are given, from :data:`GEOMETRIC_MIN_N`; else as :func:`_particle_order`
#: says), "geometric", "amd", "metis"
ORDERING = "auto"
#: the geometric dissection stops at boxes of about this many particles
GEOMETRIC_LEAF = 16
#: "auto" orders geometrically from this many held particles on, by dimension (never in
#: 3D). In 2D its fill (a tenth to a quarter above minimum degree's) costs more in the
#: solves than the cheaper ordering saves at N = 16384 (a run's forward and reverse
#: derivative, session 18: 68–77 against 65–71 ms), and saves ~0.2 s of the ~0.96 s that
#: ordering and factoring take at 131072, of which the solves give back part: forward and
#: reverse in one program, alternating in one process, 1.27 against 1.33 s (medians of
#: five). In 3D its fill is a third above METIS's, which
#: the solves pay for: `mdsens run bidisperse --set dim=3 --set n=N`, two runs each,
#: N = 1024 36–38 against 38 ms, 4096 333–341 against 260–281 ms.
GEOMETRIC_MIN_N = {2: 65536}


def _geometric_order(place: np.ndarray, sides: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """Nested dissection of the particle graph by bisecting space: ``p[k]`` the particle
    ordered k-th.

    Space is halved L times (L = log2(n / :data:`GEOMETRIC_LEAF`)), each time across the
    axis whose cells are then longest, so each particle gets an L-bit code whose first ℓ
    bits name its cell at level ℓ (in a periodic box the unit cell, so a pair that wraps
    round the box crosses a wall as any other does; in free space the particles' bounding
    box). A pair whose codes first differ at bit ℓ crosses a level-ℓ wall: its end nearer
    that wall joins the level-ℓ separator (each particle the shallowest it is asked for).
    Every cell's particles come before its separator, and a separator after both of the
    cells it parts (a post-order of the bisection tree), so no fill joins two cells.

    O(N L + pairs) in NumPy, where minimum degree and METIS work on the graph: measured
    against them on bidisperse packings at x* (ordering + CHOLMOD's symbolic and numeric
    factorization, ms; session 18), 2D N = 1024 1.4–1.5 (AMD 1.6), 16384 ~36 (AMD ~40,
    METIS 28 + 57 to order), 131072 36 + 704 (AMD 187 + 775, METIS 643 + 574); 3D
    N = 1024 0.5 + 15.3 (AMD 1.1 + 16.9), 4096 2 + 294–304 (AMD 4 + 467, METIS 136 + 199).
    Its fill is a third above METIS's (thicker separators) and, in 2D, a tenth to a
    quarter above minimum degree's: the solves pay for it, so "auto" orders this way only
    where the ordering's cost dominates (:data:`GEOMETRIC_MIN_N`)."""
    nh, d = place.shape
    u = np.asarray(place, np.float64)
    sides = np.asarray(sides, np.float64)
    periodic = bool(np.all(sides > 0))
    if periodic:  # a periodic box: fractional coordinates
        u = u - np.floor(u)
    else:  # free space: the bounding box
        lo, hi = u.min(axis=0), u.max(axis=0)
        sides = np.maximum(hi - lo, np.finfo(np.float64).tiny)
        u = (u - lo) / sides
    levels = max(0, int(np.ceil(np.log2(max(nh, 1) / GEOMETRIC_LEAF))))
    code = np.zeros(nh, np.int64)
    cuts = np.zeros(d, np.int64)
    axis, scale = np.zeros(max(levels, 1), np.int64), np.ones(max(levels, 1))
    for lev in range(levels):
        a = int(np.argmax(sides / 2.0 ** cuts))  # the axis along which the cells are longest
        cuts[a] += 1
        axis[lev], scale[lev] = a, 2.0 ** cuts[a]
        bit = (np.minimum(u[:, a] * 2.0 ** cuts[a], 2.0 ** cuts[a] - 1)).astype(np.int64) & 1
        code = (code << 1) | bit
    upper, lower = np.asarray(upper, np.int64), np.asarray(lower, np.int64)
    differ = code[upper] ^ code[lower]
    cross = differ != 0
    level = levels - np.frexp(differ[cross].astype(np.float64))[1]  # the first differing bit
    # the separator takes the end nearer the wall it crosses (in units of this level's cells)
    up, down = upper[cross], lower[cross]
    a, f = axis[level], scale[level]
    t_up = u[up, a] * f
    step = u[down, a] * f - t_up
    if periodic:
        step -= f * np.round(step / f)
    wall = np.ceil(np.minimum(t_up, t_up + step))
    near_up = np.abs(wall - t_up) <= np.abs(step) - np.abs(wall - t_up)
    ends = np.where(near_up, up, down)
    separator = np.full(nh, levels, np.int64)
    np.minimum.at(separator, ends, level)
    shift = levels - separator
    key = ((code >> shift) << shift) | ((np.int64(1) << shift) - 1)  # the cell's last code
    return np.lexsort((-separator, key)).astype(np.int64)


def _geometric(nh: int, d: int) -> bool:
    """Whether the ordering of ``nh`` held particles in ``d`` dimensions is the geometric
    one (where the positions are given)."""
    return ORDERING == "geometric" or (ORDERING == "auto" and nh >= GEOMETRIC_MIN_N.get(d, np.inf))


def _particle_order(nh: int, upper: np.ndarray, lower: np.ndarray, d: int, place: np.ndarray | None = None,
                    sides: np.ndarray | None = None) -> np.ndarray | None:
    """A fill-reducing ordering of the ``nh * d`` coordinates: of the particle graph
    (an edge per held–held pair ``(upper, lower)``, ``upper > lower``), each particle's
    d coordinates kept together. Where the positions are given (``place``, ``sides``:
    what the solve passes), the geometric nested dissection (:func:`_geometric_order`)
    from :data:`GEOMETRIC_MIN_N`, unless :data:`ORDERING` says otherwise; else AMD
    (cvxopt's) in 2D and for few particles, METIS's nested dissection (pymetis, where
    installed) from :data:`NESTED_DISSECTION_DIM` and
    :data:`NESTED_DISSECTION_MIN_N`. The graph has d² times fewer
    entries than the coordinates', so AMD costs less than CHOLMOD's own on the
    coordinates, and the fill is the same (2D bidisperse at x*: N = 16384, 24 against
    26 ms numeric); ``None`` without cvxopt."""
    try:
        from cvxopt import amd, matrix, spmatrix
    except ImportError:
        return None
    if nh == 0:
        return None
    if place is not None and _geometric(nh, d):
        p = _geometric_order(place, sides, upper, lower)
        return (p[:, None] * d + np.arange(d)).ravel()
    if ORDERING == "metis" or (ORDERING == "auto" and d >= NESTED_DISSECTION_DIM and nh >= NESTED_DISSECTION_MIN_N):
        p = _nested_dissection(nh, upper, lower)
        if p is not None:
            return (p[:, None] * d + np.arange(d)).ravel()
    particle = np.arange(nh, dtype=np.int64)
    pattern = spmatrix(1.0, matrix(np.concatenate([np.asarray(upper, np.int64), particle])),
                       matrix(np.concatenate([np.asarray(lower, np.int64), particle])), (nh, nh))
    p = np.asarray(amd.order(pattern, uplo="L"), np.int64).ravel()
    return (p[:, None] * d + np.arange(d)).ravel()


def _held_index(held: np.ndarray) -> tuple[int, np.ndarray]:
    """``(nh, index)``: the held particles' count and each particle's place among them
    (−1 for a rattler, and for the padding index N)."""
    nh = int(held.sum())
    index = np.full(held.size + 1, -1, np.int64)
    index[np.flatnonzero(held)] = np.arange(nh)
    return nh, index


def _structure(nh: int, d: int, upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where A's lower-triangle entries sit, as :class:`_Factor` lists them: ``(rows,
    cols)``, first each held particle's diagonal block (its lower triangle, particle
    after particle), then each held–held pair's whole d × d block at (upper, lower)."""
    dd = d * d
    row_of, col_of = np.divmod(np.arange(dd), d)
    low = row_of >= col_of
    nd, nb = nh * int(low.sum()), int(np.size(upper)) * dd
    rows = np.empty(nd + nb, np.int64)
    cols = np.empty(nd + nb, np.int64)
    first = np.arange(nh, dtype=np.int64) * d
    rows[:nd] = (first[:, None] + row_of[low]).ravel()
    cols[:nd] = (first[:, None] + col_of[low]).ravel()
    np.add((np.asarray(upper, np.int64) * d)[:, None], row_of, out=rows[nd:].reshape(-1, dd))
    np.add((np.asarray(lower, np.int64) * d)[:, None], col_of, out=cols[nd:].reshape(-1, dd))
    return rows, cols


# -- analysed ahead ---------------------------------------------------------------------------
#
# A run's one factorization is made on fresh memory after the relaxation: at 2D N = 16384
# the ordering (~7–9 ms) and CHOLMOD's symbolic analysis (~7–8 ms) come first, and the
# numeric factorization pays the page faults of its new factor (~48 ms in a run against ~24
# on memory already touched). All three depend only on the pattern (which pairs of held
# particles interact), and a relaxation's contact network stops changing well before its
# end (2D N = 1024, seeds 0–3: the same contacts as at x* from max|F| ≈ 1e-6 on). So
# :class:`Ahead` predicts the pattern from the relaxation's positions there, on the host, in
# a thread beside the relaxation, and :func:`prepare` orders it, analyses it and factors
# the identity on it; a factorization whose pattern is exactly that one refactors in the
# prepared factor (the same ordering and analysis it would have computed itself, so the
# same numbers bit for bit). A prediction that misses costs nothing but the thread's work.


class _Prepared(NamedTuple):
    held: np.ndarray  # (N,) bool
    key: np.ndarray  # the held–held pairs, sorted (:func:`_pair_key`)
    d: int
    settings: tuple  # (BACKEND, ORDERING) when prepared
    geometric: bool  # the ordering came from the positions
    order: np.ndarray | None
    factor: object  # CHOLMOD's factor (cvxopt), numeric on the identity of the pattern
    pairs: tuple[np.ndarray, np.ndarray]  # (upper, lower) in the order given
    matrix: object  # the identity's cvxopt spmatrix: the pattern, refilled through .V
    ccs: np.ndarray | None  # the triplet behind each of its column-compressed values (None: duplicates)


#: prepared analyses kept (the latest: a new pattern's analysis replaces it, the old
#: factor dropped first, so at most one factor's memory is held beside the relaxation)
PREPARED_LIMIT = 1
_PREPARED: list[_Prepared] = []


def _pair_key(nh: int, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(upper, np.int64) * max(nh, 1) + np.asarray(lower, np.int64))


def prepare(held: np.ndarray, i: np.ndarray, j: np.ndarray, d: int, place: np.ndarray | None = None,
            sides: np.ndarray | None = None) -> bool:
    """Order and analyse, ahead of the derivative, the held–held block of the pairs
    ``(i, j)`` (those whose Hessian block will not vanish; the particles' numbering,
    ``held`` (N,) bool), and factor the identity on its pattern, so that the factor's
    memory is allocated and touched. Kept (the latest :data:`PREPARED_LIMIT`) for a
    factorization of exactly this pattern, which then refactors in it. ``place`` and
    ``sides`` as the solve passes them (the geometric ordering). False where there is
    nothing to prepare (no cvxopt, SuperLU forced, no held particle)."""
    try:
        from cvxopt import matrix, spmatrix
    except ImportError:
        return False
    held = np.array(held, bool)
    nh, index = _held_index(held)
    if BACKEND == "superlu" or nh == 0:
        return False
    ii, jj = index[np.asarray(i, np.int64)], index[np.asarray(j, np.int64)]
    both = (ii >= 0) & (jj >= 0)
    upper, lower = np.maximum(ii[both], jj[both]), np.minimum(ii[both], jj[both])
    key = _pair_key(nh, upper, lower)
    settings = (BACKEND, ORDERING)
    with _LOCK:
        if any(e.d == d and e.settings == settings and np.array_equal(e.held, held) and np.array_equal(e.key, key)
               for e in _PREPARED):
            return True
    with _LOCK:  # the older analyses go before this one's factor is allocated
        del _PREPARED[:max(0, len(_PREPARED) - PREPARED_LIMIT + 1)]
    held_place = None if place is None else np.asarray(place)[held]
    order = _particle_order(nh, upper, lower, d, held_place, sides)
    rows, cols = _structure(nh, d, upper, lower)
    size = nh * d
    # which triplet each of the matrix's column-compressed values is (no duplicates: the
    # diagonal blocks and one block per pair), so that a factorization whose triplets come
    # in this same order fills the matrix through .V instead of building it again
    ccs = np.asarray(spmatrix(matrix(np.arange(rows.size, dtype=np.float64)), matrix(rows), matrix(cols),
                              (size, size)).V, np.float64).ravel().astype(np.int64)
    if ccs.size != rows.size:  # a pair listed twice: its entries are summed, so never filled this way
        ccs = None
    identity = _cholesky(size, (rows == cols).astype(np.float64), rows, cols, order)
    if identity is None:
        return False
    entry = _Prepared(held, key, d, settings, held_place is not None and _geometric(nh, d), order, identity.factor,
                      (upper, lower), identity.s, ccs)
    with _LOCK:
        _PREPARED.append(entry)
        del _PREPARED[:-PREPARED_LIMIT]
        STATS["prepared"] += 1
    return True


def _take_prepared(held: np.ndarray, d: int, upper: np.ndarray, lower: np.ndarray,
                   place: np.ndarray | None, sides: np.ndarray | None) -> tuple | None:
    """``(order, factor, pattern)`` of a prepared analysis of exactly this pattern (removed
    from the kept ones: the factorization refactors in it), or None; ``pattern`` is the
    prepared matrix and the triplet behind each of its values, where the triplets come in
    this same order (then the values are written into it), else None. Where positions chose the ordering
    (geometric), it is computed again from these positions and must be the prepared one:
    the answer never depends on where the relaxation was when it was prepared."""
    with _LOCK:
        entries = list(_PREPARED)
    nh, key = int(held.sum()), None
    settings = (BACKEND, ORDERING)
    for e in entries:
        if e.d != d or e.settings != settings or e.key.size != np.size(upper) or not np.array_equal(e.held, held):
            continue
        key = _pair_key(nh, upper, lower) if key is None else key
        if not np.array_equal(e.key, key):
            continue
        if e.geometric and not np.array_equal(_particle_order(nh, upper, lower, d, place, sides), e.order):
            continue
        same = e.ccs is not None and np.array_equal(e.pairs[0], upper) and np.array_equal(e.pairs[1], lower)
        with _LOCK:
            at = [k for k, x in enumerate(_PREPARED) if x is e]  # by identity (== compares arrays)
            if not at:
                continue  # taken meanwhile
            del _PREPARED[at[0]]
            STATS["ahead"] += 1
            STATS["refilled"] += int(same)
        return e.order, e.factor, (e.matrix, e.ccs) if same else None
    return None


def clear_prepared() -> None:
    """Forget every prepared analysis."""
    with _LOCK:
        _PREPARED.clear()


def predicted_pattern(system: System, q: np.ndarray, params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the derivative's factorization at ``q`` (solver coordinates) will see,
    predicted on the host: ``(held, i, j)``, the particles that are not rattlers and the
    pairs whose Hessian block does not vanish — within ``radius_i + radius_j`` where the
    system gives radii (soft spheres), else within the cutoff. The rattlers as
    :func:`mdsens.observables.rattlers` finds them: fewer than d + 1 contacts with held
    particles, repeated; a system with radii has its contacts where its pairs interact
    (soft spheres: overlap), one without asks its contact rule. The pairs ``i < j`` in
    the derivative's order (by i, then j). A prediction only: :func:`prepare`'s analysis
    serves a factorization only if the pattern is exactly its."""
    p = {k: np.asarray(v) for k, v in params.items()}
    q = np.asarray(q, np.float64)
    radius = None if system.radius is None else np.asarray(system.radius(p), np.float64)
    # within the cutoff, by i then j (its k-d tree from N = 2: block 1)
    i, j = (np.asarray(a, np.int64) for a in system.interacting_pairs(q, p, block=1))
    dq = q[i] - q[j]
    if system.periodic:
        dq = (dq - np.round(dq)) * np.broadcast_to(p["box"], (system.dim,))
    r = np.sqrt(np.einsum("md,md->m", dq, dq))
    if radius is not None:
        live = r < radius[i] + radius[j]
    else:
        live = r < float(system.cutoff(p))
    i, j, r = i[live], j[live], r[live]  # in the order the derivative lists them (i < j, by i then j)
    held = np.ones(system.n, bool)
    if system.contact is not None:
        c = np.ones(i.size, bool) if system.radius is not None else np.asarray(system.contact(r, i, j, p), bool)
        ci, cj = i[c], j[c]
        need = system.dim + 1
        while True:
            z = np.bincount(ci, weights=held[cj], minlength=system.n) + np.bincount(cj, weights=held[ci],
                                                                                      minlength=system.n)
            new = held & (z >= need)
            if np.array_equal(new, held):
                break
            held = new
    return held, i, j


#: :class:`Ahead` prepares from positions below this max|F| (the relaxation hands them
#: over from :data:`mdsens.relax.SNAPSHOT_NEAR`)
AHEAD_BELOW = 1e-6
#: ... for at most this many particles. 2D N = 131072 (`mdsens run`, one run each against
#: the previous code): derivatives 0.90 against 1.18 s, but its contacts were still
#: changing below max|F| 1e-6, so six patterns were predicted and prepared (~1.1 s each,
#: ~0.15–0.29 s a prediction) on a second core that XLA uses at that size: relaxation
#: 74.7 against 72.3 s, peak RSS 2.31 against 1.40 GB (two prepared factors kept then).
AHEAD_MAX_N = 65536


def ahead_pays(system: System) -> bool:
    """Whether a run of ``system`` with the sparse solve prepares its factorization
    beside the relaxation (:class:`Ahead`): up to :data:`AHEAD_MAX_N` particles."""
    return system.n <= AHEAD_MAX_N


class Ahead:
    """The factorization of a run's derivative, prepared beside its relaxation:
    ``offer`` (the relaxation's ``snapshot`` hook) takes positions and max|F|, and from
    :data:`AHEAD_BELOW` on a thread predicts the pattern there
    (:func:`predicted_pattern`) and analyses it (:func:`prepare`), always the latest
    positions offered; ``wait()`` joins it (the seconds waited, which a run counts as
    derivative time). cvxopt holds the GIL while CHOLMOD works, so the relaxation's
    loop may wait for the current call at a chunk's end (N = 16384: ~25 ms)."""

    def __init__(self, system: System, params: Params):
        self.system = system
        self.params = {k: np.asarray(v) for k, v in params.items()}
        self._lock = threading.Lock()
        self._pending: np.ndarray | None = None
        self._thread: threading.Thread | None = None
        self._running = False

    def offer(self, x: np.ndarray, max_force: float) -> None:
        """Real-space positions ``x`` (the model's numbering) at ``max_force``."""
        if not max_force < AHEAD_BELOW:
            return
        with self._lock:
            self._pending = np.array(x, np.float64, copy=True)
            if self._running:
                return  # the thread takes it when it is done with the one before
            self._running = True
            self._thread = threading.Thread(target=self._work, name="mdsens-sparse-ahead", daemon=True)
            self._thread.start()

    def analyse(self, x: np.ndarray) -> bool:
        """Predict and prepare at real-space positions ``x``, here and now (what the
        thread does with each offer); :func:`prepare`'s answer."""
        system, params = self.system, self.params
        sides = (np.broadcast_to(params["box"], (system.dim,)).astype(np.float64) if system.periodic
                 else np.zeros(system.dim))
        q = np.mod(x / sides, 1.0) if system.periodic else np.asarray(x, np.float64)
        held, i, j = predicted_pattern(system, q, params)
        return prepare(held, i, j, system.dim, q, sides)

    def _work(self) -> None:
        while True:
            with self._lock:
                x, self._pending = self._pending, None
                if x is None:
                    self._running = False
                    return
            try:
                self.analyse(x)
            except Exception:  # noqa: BLE001 -- only a head start: the factorization analyses itself
                pass

    def wait(self) -> float:
        start = time.perf_counter()
        thread = self._thread
        if thread is not None:
            thread.join()
        return time.perf_counter() - start


def _from_lower(vals: np.ndarray, rows: np.ndarray, cols: np.ndarray, size: int):
    """The symmetric SciPy CSC matrix whose lower triangle has ``vals`` at
    ``(rows, cols)`` (duplicates summed), its strict lower part mirrored above."""
    import scipy.sparse as sp

    lower = sp.csc_matrix((vals, (rows, cols)), shape=(size, size))
    a = (lower + sp.tril(lower, -1).T).tocsc()
    a.sum_duplicates()
    return a


def _pins(t: np.ndarray) -> np.ndarray:
    """One coordinate per column of the orthonormal ``t`` (size, r), where ``Eᵀ t`` is best
    conditioned: the row pivots of a Gram–Schmidt over the rows of ``t`` (QR with column
    pivoting of ``tᵀ``), each time the row with the largest remaining norm. (LAPACK's
    dgeqp3 through SciPy chose the same way but took 3.1 against 0.9 ms at 2D N = 16384.)"""
    w = np.array(t, dtype=np.float64, copy=True)
    pins = []
    for _ in range(t.shape[1]):
        norms = np.einsum("ij,ij->i", w, w)
        p = int(np.argmax(norms))
        pins.append(p)
        v = w[p] / np.sqrt(norms[p])
        w -= np.outer(w @ v, v)
    return np.sort(np.asarray(pins, np.int64))


class _Factor:
    """The factorization of the grounded held–held block, the grounding's correction, the modes."""

    def __init__(self, k, i, j, held, modes, place=None, sides=None):
        n, d = held.shape[0], k.shape[-1]
        dtype = np.float64  # also for a float32 run: the host computes in float64, the answer is cast back
        self.held = held.astype(bool)
        nh, index = _held_index(self.held)
        self.n, self.d, self.nh, self.dtype = n, d, nh, dtype
        size = nh * d
        self.failed = False
        self._a = None  # A as a SciPy matrix: SuperLU's path builds it, CHOLMOD's never needs it
        if nh == 0:  # every particle a rattler: M is the identity
            return
        # A's lower triangle in d × d blocks, each entry once, as triplets (vals, rows, cols):
        # a diagonal block sums the blocks of its particle's pairs (a held end of a pair with
        # a rattler included), by bincount; a held–held pair puts −k at (max, min), its
        # transpose where the pair runs the other way. Pairs whose block vanishes (beyond
        # the cutoff, padding) are left out, and so are rattler ends: all by mask, without
        # compacting the blocks first.
        dd = d * d
        kf = k.reshape(-1, dd)
        live = kf.any(axis=1)
        ii, jj = index[i], index[j]
        hi, hj = live & (ii >= 0), live & (jj >= 0)
        both = hi & hj
        ends = np.concatenate([np.where(hi, ii, nh), np.where(hj, jj, nh)])  # bin nh: dropped
        dvals = np.empty((nh, dd), dtype)
        for c in range(dd):
            col = np.ascontiguousarray(kf[:, c], dtype)
            dvals[:, c] = np.bincount(ends, weights=np.concatenate([col, col]), minlength=nh + 1)[:nh]
        row_of, col_of = np.divmod(np.arange(dd), d)  # block entry c = (row_of[c], col_of[c])
        low = row_of >= col_of
        ib, jb = ii[both], jj[both]
        upper, lower_p = np.maximum(ib, jb), np.minimum(ib, jb)
        nd = nh * int(low.sum())
        rows, cols = _structure(nh, d, upper, lower_p)
        vals = np.empty(rows.size, dtype)
        vals[:nd] = dvals[:, low].ravel()
        # The blocks are Hessians, symmetric, so the block at (upper, lower) is −K whichever
        # end of the pair is the upper one: no transpose (at N = 131072 it took 24 ms).
        np.negative(kf[both], out=vals[nd:].reshape(-1, dd))
        # T: an orthonormal basis of the gauge modes on the held coordinates
        # The gauge keeps a mode whose singular value is above sqrt(eps) of the largest; a
        # dropped one comes back as round-off, ~eps: cut between the two, at eps^(3/4).
        cut = float(np.finfo(modes.dtype).eps) ** 0.75
        raw = modes[self.held].reshape(size, -1).astype(np.float64)
        u, sv, _ = np.linalg.svd(raw, full_matrices=False)
        keep = sv > cut * (sv.max() if sv.size and sv.max() > 0 else 1.0)
        t = u[:, keep]
        r = t.shape[1]
        pins = _pins(t)
        m = pins.size
        diag = dvals[:, row_of == col_of].ravel()
        s = float(np.mean(np.abs(diag))) if diag.size else 1.0
        s = s if s > 0 and np.isfinite(s) else 1.0
        lu = None
        if BACKEND in ("auto", "cholmod"):
            # S = A + s E Eᵀ: s on the pins' diagonal entries, added in place for the
            # factorization (which copies them) and taken back exactly after
            slot = np.cumsum(low) - 1  # a block entry's place among the lower ones
            on_pins = (pins // d) * int(low.sum()) + slot[(pins % d) * (d + 1)]
            kept = vals[on_pins].copy()
            vals[on_pins] += s
            held_place = None if place is None else place[self.held]
            # analysed beside the relaxation (:func:`prepare`), if its pattern was this one
            try:
                ahead = _take_prepared(self.held, d, upper, lower_p, held_place, sides) if _PREPARED else None
            except Exception:  # noqa: BLE001 -- only a head start: never the reason a solve fails
                ahead = None
            try:
                if ahead is not None:
                    lu = _cholesky(size, vals, rows, cols, *ahead)
                else:
                    lu = _cholesky(size, vals, rows, cols, _particle_order(nh, upper, lower_p, d, held_place, sides))
            finally:
                vals[on_pins] = kept
            if lu is None and BACKEND == "cholmod":
                raise RuntimeError("sparse.BACKEND = 'cholmod' but CHOLMOD (cvxopt) is not installed "
                                   "or the matrix is not positive definite")
        if lu is None:
            import scipy.sparse as sp
            import scipy.sparse.linalg as spla

            self._a = a = _from_lower(vals, rows, cols, size)
            grounded = a + sp.csc_matrix((np.full(m, s, dtype), (pins, pins)), shape=(size, size))
            try:
                lu = spla.splu(grounded.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                               options={"SymmetricMode": True})
            except RuntimeError:
                try:  # not positive definite (a saddle, a floppy network): partial pivoting
                    lu = spla.splu(grounded.tocsc(), permc_spec="MMD_AT_PLUS_A")
                except RuntimeError:
                    self.failed = True
                    return
            with _LOCK:
                STATS["superlu"] += 1
        else:
            with _LOCK:
                STATS["cholmod"] += 1
        self.lu, self.t, self.pins, self.s, self.r = lu, t.astype(dtype), pins, s, r
        # The common case: no rattler touches a held particle, so A T = 0 to round-off (a
        # block row of A sums to zero). Then μ = 0, and S z' = Q b has the solution
        # z' = z + T c with Eᵀ z' = 0, so z = Q z': one solve, no columns S⁻¹[T, E].
        at = self._apply_a(self.t)
        scale = max(float(np.max(np.abs(dvals), initial=0.0)), float(np.max(np.abs(vals[nd:]), initial=0.0)))
        self.null = r > 0 and float(np.max(np.abs(at), initial=0.0)) <= NULL_TOL * scale
        if self.null:
            self.small = None
            return
        e = np.zeros((size, m), dtype)
        e[pins, np.arange(m)] = 1.0
        y = lu.solve(np.concatenate([t.astype(dtype), e], axis=1)) if r + m else np.zeros((size, 0), dtype)
        yt, ye = y[:, :r], y[:, r:]
        small = np.block([[t.T @ yt, -s * (t.T @ ye)], [yt[pins], np.eye(m) - s * ye[pins]]])
        import scipy.linalg

        self.yt, self.ye = yt, ye
        try:
            self.small = scipy.linalg.lu_factor(small) if r + m else None
            self.failed = not np.all(np.isfinite(small))
        except (ValueError, np.linalg.LinAlgError):
            self.failed = True

    def _apply_a(self, y: np.ndarray) -> np.ndarray:
        """``A y`` for columns y (size, nrhs): SciPy's product where A was built (SuperLU),
        else ``S y − s E Eᵀ y`` with CHOLMOD's S."""
        if self._a is not None:
            return self._a @ y
        out = self.lu.apply(y)
        out[self.pins] -= self.s * y[self.pins]
        return out

    @property
    def a(self):
        """The held–held block A as a SciPy CSC matrix (built on demand from S where
        CHOLMOD factored it; for inspection, the solve does not need it); None where
        every particle is a rattler or no factorization was made."""
        if self._a is None and isinstance(getattr(self, "lu", None), _Cholesky):
            colptr, rows, vals = (np.asarray(x).ravel() for x in self.lu.s.CCS)
            size = self.nh * self.d
            cols = np.repeat(np.arange(size), np.diff(colptr))
            diag = rows == cols
            vals = vals.copy()
            vals[diag & np.isin(rows, self.pins)] -= self.s  # S − s E Eᵀ
            self._a = _from_lower(vals, rows, cols, size)
        return self._a

    def _held_solve(self, bh: np.ndarray) -> np.ndarray:
        """``K⁻¹ bh`` for columns bh (size, nrhs), K = Q A Q + T Tᵀ."""
        import scipy.linalg

        t = self.t
        coef = t.T @ bh
        qb = bh - t @ coef
        z0 = self.lu.solve(np.ascontiguousarray(qb))
        if self.null:
            return t @ coef + z0 - t @ (t.T @ z0)
        if self.small is not None:
            rhs = np.concatenate([t.T @ z0, z0[self.pins]], axis=0)
            mu_nu = scipy.linalg.lu_solve(self.small, rhs)
            z0 = z0 - self.yt @ mu_nu[:self.r] + self.s * (self.ye @ mu_nu[self.r:])
        return t @ coef + z0

    def _held_apply(self, y: np.ndarray) -> np.ndarray:
        """``K y`` (size, nrhs)."""
        t = self.t
        ty = t.T @ y
        qy = y - t @ ty
        aqy = self._apply_a(qy)
        return aqy - t @ (t.T @ aqy) + t @ ty

    def solve(self, rows: np.ndarray) -> np.ndarray:
        """``M⁻¹ b`` for each ``b`` in ``rows`` (nrhs, N, d)."""
        out = np.array(rows, dtype=rows.dtype, copy=True)
        if self.failed:
            out[...] = np.nan
            return out
        if self.nh == 0:
            return out
        size = self.nh * self.d
        bh = rows[:, self.held].reshape(rows.shape[0], size).T.astype(self.dtype)
        y = self._held_solve(bh)
        residual = bh - self._held_apply(y)
        scale = np.maximum(np.linalg.norm(bh, axis=0), np.finfo(self.dtype).tiny)
        if np.max(np.linalg.norm(residual, axis=0) / scale) > REFINE_TOL:
            y = y + self._held_solve(residual)  # one refinement step
        out[:, self.held] = y.T.reshape(rows.shape[0], self.nh, self.d).astype(out.dtype)
        return out
